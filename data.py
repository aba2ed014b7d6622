"""Captcha files, their labels and their pixels.

Every path that turns an image into model input (training, evaluation, prediction)
goes through decode_image(), so they can never disagree. This module does not
import Keras, so that decoding workers start fast.

    python data.py synth --out DIR --count N [--length 4|4-6] [--charset CHARS] [--size HxW] [--seed S]
"""
import argparse
import csv
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import string
import sys
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from config import LENGTH_RULE, MIN_IMAGE_SIDE, UserError, length_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Captchas are small: refuse larger images from their header, before decoding them.
MAX_PIXELS = 4096 * 4096
# The raster formats Pillow may read; the others are never tried. EPS, for one, would hand the file to
# Ghostscript, a PostScript interpreter, which a server must not run on what it is sent.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO, what cameras write
# Part of the cache key and of a model's metadata: bump it whenever decode_image's output changes.
DECODE_VERSION = 2
# Part of the cache key: bump it whenever the cached digests change.
DIGEST_VERSION = 2
SYNTH_CHARSET = string.digits + string.ascii_uppercase
SYNTH_COUNT = 10_000
SYNTH_SIZE = (64, 128)
# data.image_size: auto keeps the pixel count of the former fixed default, 50x120, and the images' shape.
AUTO_PIXELS = 50 * 120
AUTO_SAMPLE = 1000


class ImageError(ValueError):
    """An image that cannot be read; the message is the reason, in a few words."""


def decode_image(source, size):
    """Any image (path, bytes, PIL image or array) -> uint8 array of shape (height, width, 3).

    Every mode is accepted: 1-bit, grayscale, 16-bit, palette, CMYK, with or without
    transparency (composited on white), and the first frame of an animation.
    """
    return resized(full_size_rgb(source), size)


def resized(image, size):
    height, width = size
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def full_size_rgb(source):
    """Any image -> the RGB PIL image decode_image resizes, or ImageError."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = array_to_image(source)
    else:
        image = open_image(read_bytes(source))
    try:
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(f"too large to be a captcha: {image.width}x{image.height} pixels")
        image.seek(0)
        image.load()
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt image: {e}") from None


def auto_image_size(paths):
    """data.image_size: auto -> ([height, width], width/height). The images' median aspect, from the
    headers of at most AUTO_SAMPLE of them, at about AUTO_PIXELS pixels, each side a multiple of 8
    and at least MIN_IMAGE_SIDE."""
    aspects = []
    for path in paths[::-(-len(paths) // AUTO_SAMPLE) or 1]:  # every k-th, k rounded up: at most AUTO_SAMPLE
        try:
            with open_image(read_bytes(path)) as image:
                aspects.append(image.width / image.height)
        except ImageError:
            continue  # load_images reports it
    aspect = float(np.median(aspects)) if aspects else 120 / 50  # none readable: the run stops on that anyway
    height = (AUTO_PIXELS / aspect) ** 0.5
    return [max(MIN_IMAGE_SIDE, 8 * round(side / 8)) for side in (height, height * aspect)], aspect


def read_bytes(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        content = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                content = f.read()
        except OSError as e:
            raise ImageError(f"unreadable: {e.strerror}") from None
    if not content:
        raise ImageError("empty file")
    return content


def open_image(content):
    """Reads only the header: a decompression bomb is refused before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(content), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError("too large to be a captcha") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt image: {e}") from None


def array_to_image(array):
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, not {array.shape}")
    return Image.fromarray(array if array.dtype == np.uint8 else to_8_bits(array))


def to_8_bits(values):
    """Pixels of any other depth -> uint8, one rule for arrays and files: floats (and booleans) up to 1
    are fractions of white; otherwise values up to 255 are 8-bit and up to 65535 16-bit. Anything
    else is refused, never clipped."""
    values = np.asarray(values)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if values.dtype.kind in "fb" and 0 <= low and high <= 1:
        peak = 1.0
    elif 0 <= low and high <= 65535:  # NaN fails these comparisons too
        peak = 255.0 if high <= 255 else 65535.0
    else:
        raise ImageError(f"pixel values from {low:g} to {high:g}: expected 0..255, 0..65535, or floats in 0..1")
    return np.round(values.astype(np.float64) * (255.0 / peak)).astype(np.uint8)


def to_rgb(image):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float grayscale: scale the full range to 8 bits instead of clipping it.
        image = Image.fromarray(to_8_bits(np.asarray(image)))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated download is an error, not a half-grey captcha


# ---------------------------------------------------------------- files and labels

def find_images(root):
    """Image files under root, recursively, through symlinked folders too. A folder reached a
    second time (a link back up the tree, or two links to one folder) is not read again."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders.sort()  # walk in name order, so that the copy read of a folder linked twice is always the same
        found += [Path(folder) / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def expand_paths(paths):
    """Folders (read recursively), files and globs -> sorted unique paths, and the arguments that matched nothing."""
    found, unmatched = set(), []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            matches = find_images(path)
        elif path.exists():
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(arg, recursive=True)]
            matches = [p for m in matches for p in (find_images(m) if m.is_dir() else [m])]
        if not matches:
            unmatched.append(arg)
        found.update(matches)
    return sorted(found), unmatched


def normalise_label(label, case):
    label = label.strip()
    return {"lower": label.lower(), "upper": label.upper()}.get(case, label)


def label_from_name(path, pattern, fits, lengths):
    """The label in a file name: data.label_pattern if set, else the first of `LABEL`,
    `LABEL_anything` and `anything_LABEL` that fits the expected lengths (shortest, longest) and
    charset, or failing that the lengths alone (so that an error can name the characters that do not fit)."""
    stem = Path(path).stem
    if pattern:
        match = re.fullmatch(pattern, stem)
        if not match:
            return None
        regex = match.re
        return match.group("label") if "label" in regex.groupindex else match.group(1 if regex.groups else 0)
    candidates = [stem, stem.split("_", 1)[0], stem.rsplit("_", 1)[-1]]
    return next((c for c in candidates if fits(c)), None) or next(
        (c for c in candidates if lengths[0] <= len(c.strip()) <= lengths[1]), stem)


def read_labels_csv(csv_path, root, allow_outside=False, keep_missing=False):
    """`filename,label` rows -> ({relative path: label}, notes). Tolerates a BOM, a header,
    extra columns, blank lines, Windows line endings and repeated rows. Rows naming a file
    outside root (`../..`, an absolute path elsewhere) are refused unless allow_outside; rows
    naming a missing file are dropped unless keep_missing."""
    labels, notes, conflicting = {}, [], set()
    missing, outside, repeated = [], [], 0
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise UserError(f"label file not found: {csv_path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{csv_path} is not UTF-8 text") from None
    except OSError as e:  # a folder, a file without read permission
        raise UserError(f"label file {csv_path} cannot be read: {e.strerror}") from None
    if rows and rows[0][0].strip().lower() in ("filename", "file", "path", "image", "name"):
        rows = rows[1:]
    for number, row in enumerate(rows, 1):
        if len(row) < 2:
            raise UserError(f"{csv_path}: row {number} {','.join(row)!r} has no label column")
        name, label = row[0].strip().replace("\\", "/"), row[1].strip()
        if not allow_outside and not is_inside(root, name):
            outside.append(name)
            continue
        if not keep_missing and not (Path(root) / name).is_file():
            missing.append(name)
        elif name in labels and labels[name] != label:
            conflicting.add(name)
        elif name in labels:
            repeated += 1
        labels[name] = label
    for name in conflicting:
        del labels[name]
    for name in missing:
        labels.pop(name, None)
    if outside:
        notes.append(f"{len(outside)} rows name files outside {root}, refused (data.allow_outside_dir=true "
                     f"reads them): {', '.join(outside[:3])}")
    if missing:
        notes.append(f"{len(missing)} rows name missing files, skipped: {', '.join(missing[:3])}")
    if repeated:
        notes.append(f"{repeated} repeated rows ignored")
    if conflicting:
        notes.append(f"{len(conflicting)} files listed twice with different labels, skipped: "
                     f"{', '.join(sorted(conflicting)[:3])}")
    return labels, notes


def is_inside(root, name):
    """Whether root/name stays in root, judged on the path as written: a symlinked folder
    inside root counts as inside, as find_images reads it too."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(os.path.join(root, name))]) == root


def image_files(root):
    """find_images(root); UserError when there are none."""
    files = find_images(root)
    if not files:
        raise UserError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {root}")
    return files


def unreadable_note(failures, paths, root):
    """load_images' failures -> a note naming the first few."""
    first = "; ".join(f"{shown_path(paths[i], root)} ({why})" for i, why in list(failures.items())[:3])
    return f"{len(failures)} unreadable images skipped: {first}"


def labelled_files(root, labels_csv, pattern, case, lengths, charset, allow_outside=False):
    """-> ([(path, label)], notes). lengths: (shortest, longest). Labels are normalised but not yet validated."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    if labels_csv:
        table, notes = read_labels_csv(labels_csv, root, allow_outside)
        items = [(root / name, normalise_label(label, case)) for name, label in sorted(table.items())]
        if not items:
            raise UserError(f"{labels_csv} names no image in {root}")
        return items, notes
    files = image_files(root)

    def fits(label):
        label = normalise_label(label, case)
        return lengths[0] <= len(label) <= lengths[1] and (charset is None or set(label) <= set(charset))

    items = [(path, label_from_name(path, pattern, fits, lengths)) for path in files]
    unmatched = [p for p, label in items if label is None]
    notes = []
    if unmatched:
        notes.append(f"{len(unmatched)} file names do not match data.label_pattern, skipped: "
                     f"{', '.join(shown_path(p, root) for p in unmatched[:3])}")
    items = [(p, normalise_label(label, case)) for p, label in items if label is not None]
    if not items:
        raise UserError(f"no file name in {root} matches data.label_pattern {pattern!r}")
    return items, notes


def label_problem(label, lengths, charset):
    """Why a label cannot be scored or trained on, or None. lengths: (shortest, longest)."""
    if not lengths[0] <= len(label) <= lengths[1]:
        return f"length {len(label)}, not {shown_lengths(lengths)}"
    unknown = sorted(set(label) - set(charset)) if charset is not None else []
    if unknown:
        return f"characters not in the charset: {''.join(unknown)!r}"
    return None


def split_by_label_problem(items, lengths, charset):
    good, bad = [], []
    for path, label in items:
        problem = label_problem(label, lengths, charset)
        (bad if problem else good).append((path, label, problem) if problem else (path, label))
    return good, bad


def shown_lengths(lengths):
    """(4, 4) -> "4"; (4, 6) -> "4-6", as data.length is written."""
    return str(lengths[0]) if lengths[0] == lengths[1] else f"{lengths[0]}-{lengths[1]}"


def shown_path(path, root):
    return os.path.relpath(path, root) if root else str(path)


def describe(bad, root, limit=3):
    """The first few (path, label, problem) triples, for a one-line message."""
    shown = "; ".join(f"{shown_path(p, root)} {label!r} ({why})" for p, label, why in bad[:limit])
    return shown + ("; ..." if len(bad) > limit else "")


def infer_charset(labels):
    return "".join(sorted(set("".join(labels))))


# A run's model and the metadata inside it (model.save_model writes them): charset, length, input size, ...
MODEL_FILE = "model.keras"
METADATA_ENTRY = "captcha.json"


def model_path(path):
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def read_metadata(path):
    """A run directory's or .keras file's metadata, read without Keras."""
    path = model_path(path)
    if not path.exists():
        raise UserError(f"no model at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise UserError(f"{path} is not a model made by train.py (a .keras file carrying {METADATA_ENTRY})") from None


def model_lengths(metadata):
    """A model's (shortest, longest) label length. Its metadata's `length` is the number of heads;
    models made before length ranges have no `min_length`."""
    return metadata.get("min_length", metadata["length"]), metadata["length"]


def class_count(charset, lengths):
    """Classes of each head: the charset's characters and, for a range of lengths only, the blank
    ("no character here"), whose index is len(charset)."""
    return len(charset) + (lengths[0] < lengths[1])


def encode(labels, charset, length):
    """Labels -> N x length class indices, where length is the number of heads: a shorter label is
    padded at the end with the blank, len(charset)."""
    index, blank = {c: i for i, c in enumerate(charset)}, len(charset)
    rows = [[index[c] for c in label] + [blank] * (length - len(label)) for label in labels]
    return np.array(rows, dtype=np.int32).reshape(len(labels), length)


def decode(indices, charset):
    """Class indices -> texts: the characters of each row before its first blank."""
    return ["".join(charset[i] for i in itertools.takewhile(lambda i: i < len(charset), row)) for row in indices]


# ---------------------------------------------------------------- pixels, cached

def read_and_decode(job):
    """-> (pixels, digest, None) or (None, None, reason). The digest is of the decoded pixels at full
    size, not of the file: the same captcha saved as PNG and as BMP is one image; and not of the
    resized pixels, so that the train/test split does not change with data.image_size."""
    path, size = job
    try:
        image = full_size_rgb(path)
        digest = hashlib.sha1(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
        return resized(image, size), digest, None
    except ImageError as e:
        return None, None, str(e)


def decode_files(paths, size, out, desc):
    """Decodes paths into `out`, in parallel; -> (digests, {index: reason})."""
    jobs = [(str(p), tuple(size)) for p in paths]
    digests, failures = [None] * len(paths), {}
    use_pool = len(jobs) >= 2000 and (os.cpu_count() or 1) > 1 and "fork" in multiprocessing.get_all_start_methods()
    pool = multiprocessing.get_context("fork").Pool() if use_pool else None
    try:
        results = pool.imap(read_and_decode, jobs, chunksize=256) if pool else map(read_and_decode, jobs)
        for i, (pixels, digest, error) in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img")):
            if error:
                failures[i] = error
            else:
                out[i], digests[i] = pixels, digest
    finally:
        if pool:
            pool.terminate()
    return digests, failures


def cache_key(paths, size):
    h = hashlib.sha1(f"{DECODE_VERSION}:{DIGEST_VERSION}:{size[0]}x{size[1]}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\n{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_images(paths, size, cache_dir=None, desc="decoding"):
    """Decodes every image once -> (uint8 array N x H x W x 3, sha1 digests of the pixels, {index: reason}).

    With cache_dir, the array is kept there keyed by the files and the size, so a
    second run decodes nothing. It is read into memory when it fits comfortably,
    and memory-mapped from disk otherwise.
    """
    shape = (len(paths), size[0], size[1], 3)
    if cache_dir is None:
        images = np.zeros(shape, np.uint8)
        digests, failures = decode_files(paths, size, images, desc)
        return images, digests, failures
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size)
    array_path, index_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if not index_path.exists():
        partial = cache_dir / f"{key}.{os.getpid()}.partial.npy"
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        digests, failures = decode_files(paths, size, images, desc)
        images.flush()
        del images
        os.replace(partial, array_path)
        write_atomically(index_path, json.dumps({"digests": digests, "failures": failures}))
    index = json.loads(index_path.read_text())
    fits_in_memory = array_path.stat().st_size < 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    images = np.load(array_path, mmap_mode=None if fits_in_memory else "r")
    return images, index["digests"], {int(i): reason for i, reason in index["failures"].items()}


def write_atomically(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def split_train_test(digests, test_fraction, seed, strata=None):
    """Deterministic split of image indices. Identical images (same digest) always land
    on the same side, so a duplicate can never leak the test split into training. Given
    two different images or more, each side holds at least one.

    strata: one key per image (train.py gives each label's length); each stratum, counting a
    group of identical images in the stratum of its first image, gives its own share to the test
    split, so that the split keeps each length's share of the data."""
    groups, strata = {}, [None] * len(digests) if strata is None else strata
    for i, digest in enumerate(digests):
        groups.setdefault(digest, []).append(i)
    stratified = {}
    for digest, members in groups.items():
        stratified.setdefault(strata[members[0]], []).append(digest)
    test = []
    def shuffled(digests):
        return sorted(digests, key=lambda d: hashlib.sha1(f"{seed}:{d}".encode()).hexdigest())

    for stratum in stratified.values():
        target, taken = max(1, round(sum(len(groups[d]) for d in stratum) * test_fraction)), []
        for digest in shuffled(stratum)[:-1]:  # the last group of each stratum always trains
            if len(taken) >= target:
                break
            taken.extend(groups[digest])
        test.extend(taken)
    if not test and len(groups) > 1:  # every stratum is one group: one of them is held out
        test = groups[shuffled(groups)[0]]
    test_set = set(test)
    train = [i for i in range(len(digests)) if i not in test_set]
    return np.array(train, dtype=np.int64), np.array(sorted(test), dtype=np.int64)


# ---------------------------------------------------------------- synthetic captchas

def synthesize(out, count, length=4, charset=SYNTH_CHARSET, size=SYNTH_SIZE, seed=0):
    """Writes `count` captchas drawn by the captcha package as LABEL_NNNNNN.png; the same seed gives the same files.
    length: as data.length, a number or a range like "4-6", whose lengths take equal shares, in turn."""
    shortest, longest = length_range(length)
    from unittest import mock

    import captcha.image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # captcha.image draws all its randomness from the secrets module, which cannot be seeded.
    seeded = SimpleNamespace(randbelow=rng.randrange, randbits=rng.getrandbits, choice=rng.choice)
    generator = captcha.image.ImageCaptcha(width=size[1], height=size[0])
    with mock.patch.object(captcha.image, "secrets", seeded):
        for i in tqdm(range(count), desc=f"writing captchas to {out}", unit="img"):
            label = "".join(rng.choice(charset) for _ in range(shortest + i % (longest - shortest + 1)))
            generator.generate_image(label).save(out / f"{label}_{i:06d}.png")


def undrawable(charset):
    """The characters of charset that synthesize cannot draw: the captcha package's font has no glyph
    for them (CJK, for one), and would draw each as the same empty box."""
    import captcha.image
    from PIL import ImageFont

    font = ImageFont.truetype(captcha.image.DEFAULT_FONTS[0], 40)

    def glyph(character):
        mask = font.getmask(character)
        return mask.size, bytes(mask)

    no_glyph = glyph("\U0010FFFD")  # a private-use code point, which no font draws
    return "".join(character for character in charset if glyph(character) == no_glyph)


def parse_size(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, like 64x128, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_length(text):
    value = int(text) if text.strip().isdigit() else text
    if length_range(value) is None:
        raise argparse.ArgumentTypeError(f"expected {LENGTH_RULE}, got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write synthetic captchas, labelled in their file names")
    synth.add_argument("--out", required=True, help="folder to write into")
    synth.add_argument("--count", type=int, required=True)
    synth.add_argument("--length", type=parse_length, default=4, help="a number, or a range like 4-6 (default 4)")
    synth.add_argument("--charset", default=SYNTH_CHARSET)
    synth.add_argument("--size", type=parse_size, default=SYNTH_SIZE,
                       help=f"HEIGHTxWIDTH, default {SYNTH_SIZE[0]}x{SYNTH_SIZE[1]}")
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    synthesize(args.out, args.count, args.length, args.charset, args.size, args.seed)


if __name__ == "__main__":
    sys.exit(main())
