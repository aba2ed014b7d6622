"""Synthetic captchas: drawn in the style of the `captcha` package, from a seed, in parallel.

Every image is drawn from its own generator, seeded by the set's seed and its index, so the same
seed gives the same files whatever the number of processes.
"""
import dataclasses
import multiprocessing
import os
import random
import string
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

CHARSET = string.digits + string.ascii_uppercase
SIZE = (64, 128)


def font_files():
    """The fonts every install has: the `captcha` package's own, DroidSansMono."""
    import captcha.image

    return captcha.image.DEFAULT_FONTS


@dataclasses.dataclass(frozen=True)
class Style:
    """How captchas are drawn. The defaults are the `captcha` package's ImageCaptcha, whose sizes are
    given for a captcha REFERENCE_HEIGHT pixels high and scale with the height drawn."""

    font_sizes: tuple = (42, 50, 56)
    offset: tuple = (4, 6)  # each character's random offset in its box, at most (dx, dy)
    rotate: float = 30  # degrees either way
    warp: tuple = ((0.1, 0.3), (0.2, 0.3))  # each character's quad warp, as a fraction of its width and height
    space_probability: float = 0.5  # a blank as wide as a character before each one
    overlap: float = 0.25  # of the average character width, at most
    dots: int = 30
    dot_width: int = 3
    arcs: int = 1
    background: tuple = (238, 255)  # each channel's range
    ink: tuple = (10, 200)
    opaque: bool = False  # ink as opaque as its alpha; else as its brightness, the package's way (dark ink fades)
    smooth: bool = True
    arc_width: int = 1
    lines: int = 0  # straight lines across the image, each in a colour of its own
    line_width: int = 1
    stroke: int = 0  # pixels added around each character's strokes
    noise: float = 0.0  # standard deviation of grey noise over the finished image, in levels of 255


REFERENCE_HEIGHT = 64
# Part of the synthetic start's cache key: bump it whenever the same Style draws differently, or the fit
# (STATISTICS, SEARCHED, FIT_*) chooses differently.
STYLE_VERSION = 3
# The quick start's own set: four digits, drawn small and plain enough that the shipped model learns
# them from random weights within minutes on a laptop CPU.
QUICK_START_STYLE = Style(font_sizes=(44, 48, 52), offset=(2, 2), rotate=8, warp=((0.0, 0.1), (0.0, 0.1)),
                          space_probability=1.0, overlap=0.0, dots=10, dot_width=2, arcs=0, ink=(0, 120), opaque=True)
# The set train.py draws when data.dir is the shipped default and does not exist yet: the quick start's.
DEFAULT_SET = {"count": 2400, "charset": string.digits, "size": (32, 80), "style": QUICK_START_STYLE}


class Drawer:
    """Draws captchas of one size in one Style, its randomness taken from a seeded generator (the
    `captcha` package draws from the `secrets` module, which cannot be seeded)."""

    lookup_table = [int(i * 1.97) for i in range(256)]

    def __init__(self, size, style=Style()):
        self.height, self.width = size
        self.style, scale = style, size[0] / REFERENCE_HEIGHT
        self.fonts = [ImageFont.truetype(f, max(8, round(s * scale))) for f in font_files() for s in style.font_sizes]
        self.dot_width = max(1, round(style.dot_width * scale))
        # The package's arcs are one pixel wide at any size: only wider ones scale.
        self.arc_width = 1 if style.arc_width == 1 else max(1, round(style.arc_width * scale))
        self.line_width = max(1, round(style.line_width * scale))
        self.stroke = round(style.stroke * scale)

    def draw(self, text, rng):
        style = self.style
        background = tuple(rng.randint(*style.background) for _ in range(3))
        colour = (*(rng.randint(*style.ink) for _ in range(3)), rng.randint(220, 255))
        image = self.characters(text, colour, background, rng)
        pen = ImageDraw.Draw(image)
        for _ in range(style.dots):
            x, y = rng.randint(0, self.width), rng.randint(0, self.height)
            pen.line(((x, y), (x - 1, y - 1)), fill=colour, width=self.dot_width)
        for _ in range(style.arcs):
            self.arc(pen, colour, rng)
        for _ in range(style.lines):
            ends = [(rng.randint(0, self.width // 4), rng.randint(0, self.height)),
                    (rng.randint(self.width * 3 // 4, self.width), rng.randint(0, self.height))]
            pen.line(ends, fill=tuple(rng.randint(0, 255) for _ in range(3)), width=self.line_width)
        image = image.filter(ImageFilter.SMOOTH) if style.smooth else image
        if style.noise:
            grain = np.random.default_rng(rng.getrandbits(32)).normal(0, style.noise, (self.height, self.width, 1))
            image = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8))
        return image

    def arc(self, pen, colour, rng):
        w, h = self.width, self.height
        x1 = rng.randint(0, w // 5)
        x2 = rng.randint(w // 5, w)
        y1 = rng.randint(h // 5, h - h // 5)
        y2 = rng.randint(y1, h - h // 5)
        pen.arc([x1, y1, x2, max(y1, y2)], rng.randint(0, 20), rng.randint(160, 200), fill=colour, width=self.arc_width)

    def character(self, char, colour, rng):
        style = self.style
        font = rng.choice(self.fonts)
        _, _, w, h = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox(
            (1, 1), char, font=font, stroke_width=self.stroke)
        dx, dy = rng.randint(0, style.offset[0]), rng.randint(0, style.offset[1])
        im = Image.new("RGBA", (int(w) + dx + 2 * self.stroke, int(h) + dy + 2 * self.stroke))
        ImageDraw.Draw(im).text((dx + self.stroke, dy + self.stroke), char, font=font, fill=colour,
                                stroke_width=self.stroke, stroke_fill=colour)
        box = im.getbbox()
        im = im.crop(box) if box else im
        im = im.rotate(rng.uniform(-style.rotate, style.rotate), Image.Resampling.BILINEAR, expand=True)
        (low_x, high_x), (low_y, high_y) = style.warp
        dx2 = w * rng.random() * (high_x - low_x) + low_x
        dy2 = h * rng.random() * (high_y - low_y) + low_y
        x1, y1, x2, y2 = (int(rng.uniform(-d, d)) for d in (dx2, dy2, dx2, dy2))
        w2, h2 = int(w) + abs(x1) + abs(x2), int(h) + abs(y1) + abs(y2)
        quad = (x1, y1, -x1, h2 - y2, w2 + x2, h2 + y2, w2 - x2, -y1)
        return im.resize((w2, h2)).transform((int(w), int(h)), Image.Transform.QUAD, quad)

    def characters(self, text, colour, background, rng):
        pieces = []
        for char in text:
            if rng.random() > self.style.space_probability:
                pieces.append(self.character(" ", colour, rng))
            pieces.append(self.character(char, colour, rng))
        text_width = sum(piece.size[0] for piece in pieces)
        width = max(text_width, self.width)
        image = Image.new("RGB", (width, self.height), background)
        average = int(text_width / len(text))
        offset = int(average * 0.1)
        for piece in pieces:
            w, h = piece.size
            mask = piece.getchannel("A") if self.style.opaque else piece.convert("L").point(self.lookup_table)
            image.paste(piece, (offset, int((self.height - h) / 2)), mask)
            offset += w - rng.randint(0, int(self.style.overlap * average))
        return image.resize((self.width, self.height)) if width > self.width else image


def label_for(index, lengths, charset, rng):
    """The index-th label of a set: lengths [shortest, longest] take equal shares, in turn."""
    shortest, longest = lengths
    return "".join(rng.choice(charset) for _ in range(shortest + index % (longest - shortest + 1)))


def file_name(label, index, lengths):
    """LABEL_NNNNNNN.png, the index one digit longer than the longest label, so that it can never be
    taken for the label (data.ambiguous_names)."""
    return f"{label}_{index:0{max(6, lengths[1] + 1)}d}.png"


def draw_range(job):
    """Draws images start..stop of a set into its folder (a worker's share)."""
    out, start, stop, lengths, charset, size, seed, style = job
    drawer = Drawer(size, style)
    for index in range(start, stop):
        rng = random.Random(f"{seed}:{index}")
        label = label_for(index, lengths, charset, rng)
        drawer.draw(label, rng).save(Path(out) / file_name(label, index, lengths))
    return stop - start


def draw_set(out, count, lengths=(4, 4), charset=CHARSET, size=SIZE, seed=0, style=Style(), processes=None,
             shorten="--count"):
    """Writes `count` captchas into out as LABEL_NNNNNNN.png, in parallel processes where there are cores
    to spare; the same seed gives the same files. lengths: [shortest, longest]. Says, after the first few,
    about how long the rest will take."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processes = processes or max(1, min(os.cpu_count() or 1, count // 500))
    probe = min(count, 16)
    started = time.perf_counter()
    draw_range((str(out), 0, probe, list(lengths), charset, tuple(size), seed, style))
    rate = probe / (time.perf_counter() - started) * processes
    print(f"drawing {count} captchas on {processes} process{'es' if processes > 1 else ''}: about "
          f"{max(1, round(count / rate))} s (shortened by {shorten})", flush=True)
    chunk = max(1, min(500, -(-(count - probe) // processes)))
    jobs = [(str(out), start, min(count, start + chunk), list(lengths), charset, tuple(size), seed, style)
            for start in range(probe, count, chunk)]
    with tqdm(total=count, initial=probe, desc=f"drawing captchas into {out}", unit="img") as bar:
        if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                for done in pool.imap_unordered(draw_range, jobs):
                    bar.update(done)
        else:
            for job in jobs:
                bar.update(draw_range(job))
    seconds = time.perf_counter() - started
    print(f"drew {count} captchas in {seconds:.1f} s: {count / seconds:.0f} images/s on {processes} "
          f"process{'es' if processes > 1 else ''}")


def undrawable(charset):
    """The characters of charset that draw_set cannot draw: its font has no glyph for them (CJK, for
    one), and would draw each as the same empty box."""
    font = ImageFont.truetype(font_files()[0], 40)

    def glyph(character):
        mask = font.getmask(character)
        return mask.size, bytes(mask)

    no_glyph = glyph("\U0010FFFD")  # a private-use code point, which no font draws
    return "".join(character for character in charset if glyph(character) == no_glyph)


# ---------------------------------------------------------------- a style fitted to the user's captchas

FIT_SAMPLE = 200  # of the user's captchas measured
FIT_DRAWS = 64  # captchas drawn to score each candidate style
FIT_PASSES = 2
# What a candidate style is scored on, per image: how much ink, its colour and strokes, the grain,
# the ink away from the text's rows (lines, arcs) and the lone ink pixels (dots).
STATISTICS = ("ink", "noise", "background_red", "background_green", "background_blue", "ink_red", "ink_green",
              "ink_blue", "run_across", "run_down", "ink_off_text", "lone_ink", "text_height", "text_width")
# Parameters chosen by the score, with their candidates (sizes at REFERENCE_HEIGHT); the rest are measured.
SEARCHED = {"font_scale": (0.7, 0.85, 1.0, 1.15, 1.3), "stroke": (0, 1, 2, 3), "rotate": (0, 8, 16, 30),
            "dots": (0, 15, 40, 100, 250), "arcs": (0, 1, 2), "arc_width": (1, 3, 6), "lines": (0, 2, 4, 8),
            "line_width": (1, 2, 4), "space_probability": (0.6, 1.0), "overlap": (0.0, 0.15, 0.3),
            "smooth": (False, True)}
# Cap height of DroidSansMono as a share of its font size: turns measured text height into a font size.
CAP_HEIGHT = 0.72


def measure(pixels):
    """HxWx3 uint8 captcha -> its STATISTICS, as a dict. Ink: the pixels far from the background (the
    median colour) by more than the grain explains."""
    pixels = pixels.astype(np.float32)
    height, width, _ = pixels.shape
    grey = pixels.mean(2)
    background = np.median(pixels.reshape(-1, 3), 0)
    noise = 1.4826 * float(np.median(np.abs(grey - np.median(grey))))
    ink = np.abs(pixels - background).max(2) > max(48.0, 4 * noise)
    count = max(1, int(ink.sum()))
    colour = np.median(pixels[ink], 0) if ink.any() else background
    starts_across = (ink[:, 1:] & ~ink[:, :-1]).sum() + ink[:, 0].sum()
    starts_down = (ink[1:] & ~ink[:-1]).sum() + ink[0].sum()
    rows, columns = np.nonzero(ink)
    top, bottom = np.percentile(rows, (10, 90)) if len(rows) else (0, 0)
    left, right = np.percentile(columns, (5, 95)) if len(columns) else (0, 0)
    band = ink[int(height * 0.25):int(np.ceil(height * 0.75))].sum()
    padded = np.pad(ink, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return dict(zip(STATISTICS, (
        count / ink.size, noise, *background, *colour, count / max(1, starts_across) / height,
        count / max(1, starts_down) / height, 1 - band / count, (ink & ~neighbours).sum() / count,
        (bottom - top) / height, (right - left) / width)))


def statistics(images):
    return np.array([[measure(image)[name] for name in STATISTICS] for image in images], dtype=np.float64)


def fit_style(images, charset, lengths=(4, 4), seed=0, progress=True):
    """A Style and a size that draw captchas like `images` (HxWx3 uint8 arrays of one scheme), and how far
    they are from them -> (style, (height, width), distance, the `captcha` package style's distance).
    Size, colours and grain are measured; fonts, strokes, rotation, dots, arcs and lines are chosen,
    one parameter at a time, FIT_PASSES times over, by the distance between the mean STATISTICS of
    FIT_DRAWS drawn captchas and of the images, in the images' standard deviations. Where the
    package's own style is nearer, it is the one returned."""
    height = int(np.median([image.shape[0] for image in images]))
    width = int(np.median([image.shape[1] for image in images]))
    real = [np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            for image in images[:FIT_SAMPLE]]
    measured = statistics(real)
    # A floor under each spread, 2% of its range, so that a statistic all the images share exactly (no grain,
    # one background) is matched closely but cannot outweigh the others without limit.
    levels = ("noise", "background_red", "background_green", "background_blue", "ink_red", "ink_green", "ink_blue")
    ranges = np.array([255.0 if name in levels else 1.0 for name in STATISTICS])
    target, spread = measured.mean(0), measured.std(0) + 0.02 * ranges
    column = {name: measured[:, i] for i, name in enumerate(STATISTICS)}
    backgrounds = np.stack([column[f"background_{c}"] for c in ("red", "green", "blue")])
    inks = np.stack([column[f"ink_{c}"] for c in ("red", "green", "blue")])
    low, high = np.percentile(backgrounds, (5, 95)).round().astype(int)
    cap = float(np.median(column["text_height"])) * REFERENCE_HEIGHT / CAP_HEIGHT
    base = {"background": (int(max(0, min(low, high - 8))), int(min(255, max(high, low + 8)))),
            "ink": tuple(int(v) for v in np.percentile(inks, (10, 90)).round()),
            "noise": round(float(np.median(column["noise"])), 1), "offset": (2, 4), "opaque": True,
            "warp": ((0.0, 0.1), (0.0, 0.1)), "dot_width": 2}
    chosen = {"font_scale": 1.0, "stroke": 0, "rotate": 8, "dots": 15, "arcs": 0, "arc_width": 1, "lines": 0,
              "line_width": 1, "space_probability": 1.0, "overlap": 0.15, "smooth": True}

    def style_of(params):
        params = dict(params)
        scale = params.pop("font_scale")
        return Style(**base, **params, font_sizes=tuple(max(6, round(cap * scale * f)) for f in (0.9, 1.0, 1.1)))

    def distance(style):
        drawer = Drawer((height, width), style)
        rng = random.Random(f"fit:{seed}")  # the same labels and draws for every candidate
        drawn = [np.asarray(drawer.draw(label_for(i, lengths, charset, rng), rng)) for i in range(FIT_DRAWS)]
        return float((((statistics(drawn).mean(0) - target) / spread) ** 2).sum())

    best = distance(style_of(chosen))
    steps = [(name, value) for _ in range(FIT_PASSES) for name, values in SEARCHED.items() for value in values]
    for name, value in tqdm(steps, desc="fitting the synthetic captchas' style", unit="style", disable=not progress):
        if chosen[name] == value:
            continue
        score = distance(style_of({**chosen, name: value}))
        if score < best:
            best, chosen = score, {**chosen, name: value}
    package = distance(Style())
    return (style_of(chosen) if best <= package else Style()), (height, width), min(best, package), package
