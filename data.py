"""Captcha files, their labels and their pixels.

Every path that turns an image into model input (training, evaluation, prediction)
goes through decode_image(), so they can never disagree. This module does not
import Keras, so that decoding workers start fast.

    python data.py synth --out DIR --count N [--length 4|4-6] [--charset CHARS] [--size HxW] [--seed S]
                         [--like FOLDER]
"""
import argparse
import collections
import csv
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

import atomic
import synth
from cli import CsvWriter, UserError, read_csv_cell, run_main
from config import LENGTH_RULE, MIN_IMAGE_SIDE, parse_length, shipped, shown_length

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Captchas are small: refuse larger images from their header, before decoding them.
MAX_PIXELS = 4096 * 4096
# The raster formats Pillow may read; the others are never tried. EPS, for one, would hand the file to
# Ghostscript, a PostScript interpreter, which a server must not run on what it is sent.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO, what cameras write
# Part of the cache key and of a model's metadata: bump it whenever decode_image's output changes.
DECODE_VERSION = 2
# Part of the cache key: bump it whenever the cached digests or look-alike hashes change.
DIGEST_VERSION = 3
# data.image_size: auto: 50x120's pixel count in the images' shape, widened to width_for_characters.
AUTO_PIXELS = 50 * 120
AUTO_SAMPLE = 1000
FEW_OF_A_LENGTH = 20  # fewer images of a length than this get a warning: too few to learn it, or to score it


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


def width_for_characters(length):
    """The narrowest input width whose backbone map (one column per MIN_IMAGE_SIDE pixels) has a column per
    character and one to spare: characters do not sit on the columns' grid, nor fill the captcha."""
    return MIN_IMAGE_SIDE * (length + 1)


def auto_image_size(paths, length):
    """data.image_size: auto -> ([height, width], why: a line for the log). The images' median aspect,
    from the headers of at most AUTO_SAMPLE of them, at about AUTO_PIXELS pixels, each side a multiple
    of 8 and at least MIN_IMAGE_SIDE; the width at least width_for_characters of the longest captchas
    (`length`): a column of features per position and one to spare."""
    aspects = []
    for path in paths[::-(-len(paths) // AUTO_SAMPLE) or 1]:  # every k-th, k rounded up: at most AUTO_SAMPLE
        try:
            with open_image(read_bytes(path)) as image:
                aspects.append(image.width / image.height)
        except ImageError:
            continue  # load_images reports it
    aspect = float(np.median(aspects)) if aspects else 120 / 50  # none readable: the run stops on that anyway
    height = (AUTO_PIXELS / aspect) ** 0.5
    height, width = (max(MIN_IMAGE_SIDE, 8 * round(side / 8)) for side in (height, height * aspect))
    why = f"the images' median width:height is {aspect:.2f}"
    if width < (least := width_for_characters(length)):
        width = least
        why += (f"; widened to {MIN_IMAGE_SIDE} pixels per character plus {MIN_IMAGE_SIDE}: a column of the "
                f"backbone's map for each, and one to spare")
    return [height, width], why


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


def name_parts(stem):
    """The parts of a file name that may hold its label by default: `LABEL`, `LABEL_anything`, `anything_LABEL`."""
    return stem, stem.split("_", 1)[0], stem.rsplit("_", 1)[-1]


def label_from_name(path, pattern, fits, lengths):
    """The label in a file name: data.label_pattern if set, else the first of name_parts that fits the
    expected lengths [shortest, longest] and charset, or failing that the lengths alone (so that an error
    can name the characters that do not fit)."""
    stem = Path(path).stem
    if pattern:
        match = re.fullmatch(pattern, stem)
        if not match:
            return None
        regex = match.re
        return match.group("label") if "label" in regex.groupindex else match.group(1 if regex.groups else 0)
    candidates = name_parts(stem)
    return next((c for c in candidates if fits(c)), None) or next(
        (c for c in candidates if lengths[0] <= len(c.strip()) <= lengths[1]), stem)


def ambiguous_names(paths, fits):
    """The files whose name could hold the label on either side of `_` (img1_7364: img1 or 7364?):
    [(path, first part, last part)]."""
    found = []
    for path in paths:
        stem, first, last = name_parts(Path(path).stem)
        if not fits(stem) and first != last and fits(first) and fits(last):
            found.append((path, first, last))
    return found


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
        name, label = read_csv_cell(row[0].strip()), read_csv_cell(row[1].strip())
        if "\\" in name and not (Path(root) / name).exists():  # written on Windows
            name = name.replace("\\", "/")
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


def labelled_files(root, labels_csv, pattern, case, lengths, charset, allow_outside=False, keep_missing=False):
    """-> ([(path, label)], notes). lengths: [shortest, longest]. Labels are normalised but not yet validated.
    keep_missing: rows of labels_csv naming missing files stay (evaluate.py counts them), else are dropped."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    if labels_csv:
        table, notes = read_labels_csv(labels_csv, root, allow_outside, keep_missing)
        items = [(root / name, normalise_label(label, case)) for name, label in sorted(table.items())]
        if not items:
            raise UserError(f"{labels_csv} names no image in {root}")
        return items, notes
    files = image_files(root)

    def fits(label):
        label = normalise_label(label, case)
        return lengths[0] <= len(label) <= lengths[1] and (charset is None or set(label) <= set(charset))

    ambiguous = [] if pattern else ambiguous_names(files, fits)
    if ambiguous:
        shown = "; ".join(f"{shown_path(p, root)} ({first!r} or {last!r})" for p, first, last in ambiguous[:3])
        raise UserError(f"{len(ambiguous)} file names in {root} could hold the label on either side of '_', such as "
                        f"{shown}: set data.label_pattern to say which, e.g. '(?P<label>[^_]+)_.*' for the first "
                        f"part or '.*_(?P<label>[^_]+)' for the last, or set data.charset")
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
        return f"length {len(label)}, not {shown_length(lengths)}"
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


def shown_path(path, root):
    return os.path.relpath(path, root) if root else str(path)


def relative_name(path, root):
    """path as a label CSV names it: relative to root, with forward slashes."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def write_labels(f, items, root, confidences=None):
    """[(path, label)] to the open file f as a label CSV that data.labels reads: paths relative to root,
    and each row's confidence where given."""
    writer = CsvWriter(f)
    writer.writerow(["filename", "label", *(["confidence"] if confidences is not None else [])])
    for i, (item_path, label) in enumerate(items):
        writer.writerow([relative_name(os.path.abspath(item_path), os.path.abspath(root)), label,
                         *([f"{confidences[i]:.6f}"] if confidences is not None else [])])


def describe(bad, root, limit=3):
    """The first few (path, label, problem) triples, for a one-line message."""
    shown = "; ".join(f"{shown_path(p, root)} {label!r} ({why})" for p, label, why in bad[:limit])
    return shown + ("; ..." if len(bad) > limit else "")


def infer_charset(labels):
    return "".join(sorted(set("".join(labels))))


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

LOOK_SHAPE = (16, 32)  # the grey thumbnail two images are compared by, to find look-alikes
# Thumbnails correlated at least this much are one captcha saved twice: a JPEG re-encode at quality 75
# or more of the real sets measured correlates above 0.99, and no two different captchas of them did.
LOOK_ALIKE = 0.99


class Decoded(NamedTuple):
    images: np.ndarray  # uint8, N x H x W x 3
    digests: list  # sha1 of each image's decoded pixels at full size; None where it is unreadable
    failures: dict  # index -> why the image is unreadable
    looks: np.ndarray  # float16 N x thumbnail pixels, for look_alikes


def look(image):
    """A full-size RGB image -> its grey thumbnail, zero-mean and of unit length: two captchas whose looks
    correlate at LOOK_ALIKE or more are one captcha, re-encoded, resized or saved in another format."""
    grey = np.asarray(image.convert("L").resize(LOOK_SHAPE[::-1], Image.Resampling.BOX), np.float32).ravel()
    grey -= grey.mean()
    return grey / max(float(np.linalg.norm(grey)), 1e-6)


def look_alikes(looks, others):
    """Which of looks correlate at LOOK_ALIKE or more with any of others -> boolean array."""
    found = np.zeros(len(looks), bool)
    others = np.asarray(others, np.float32)
    for start in range(0, len(looks), 4096) if len(others) else ():
        found[start:start + 4096] = (np.asarray(looks[start:start + 4096], np.float32) @ others.T).max(1) >= LOOK_ALIKE
    return found


def read_and_decode(job):
    """-> (pixels, digest, look, None) or (None, None, None, reason). The digest is of the decoded
    pixels at full size, not of the file: the same captcha saved as PNG and as BMP is one image; and
    not of the resized pixels, so that the train/test split does not change with data.image_size."""
    path, size = job
    try:
        image = full_size_rgb(path)
        digest = hashlib.sha1(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
        return resized(image, size), digest, look(image), None
    except ImageError as e:
        return None, None, None, str(e)


def decode_files(paths, size, out, looks, desc):
    """Decodes paths into `out` and their looks into `looks`, in parallel; -> (digests, {index: reason})."""
    jobs = [(str(p), tuple(size)) for p in paths]
    digests, failures = [None] * len(paths), {}
    use_pool = len(jobs) >= 2000 and (os.cpu_count() or 1) > 1 and "fork" in multiprocessing.get_all_start_methods()
    pool = multiprocessing.get_context("fork").Pool() if use_pool else None
    try:
        results = pool.imap(read_and_decode, jobs, chunksize=256) if pool else map(read_and_decode, jobs)
        for i, (pixels, digest, thumbnail, error) in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img")):
            if error:
                failures[i] = error
            else:
                out[i], digests[i], looks[i] = pixels, digest, thumbnail
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
    """Decodes every image once -> Decoded.

    With cache_dir, the arrays are kept there keyed by the files and the size, so a
    second run decodes nothing. The images are read into memory when they fit comfortably,
    and memory-mapped from disk otherwise.
    """
    shape, look_shape = (len(paths), size[0], size[1], 3), (len(paths), LOOK_SHAPE[0] * LOOK_SHAPE[1])
    if cache_dir is None:
        images, looks = np.zeros(shape, np.uint8), np.zeros(look_shape, np.float16)
        digests, failures = decode_files(paths, size, images, looks, desc)
        return Decoded(images, digests, failures, looks)
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size)
    array_path, looks_path, index_path = (cache_dir / f"{key}{end}" for end in (".npy", ".looks.npy", ".json"))
    if not index_path.exists():
        with atomic.replacing(array_path) as partial:
            images, looks = np.lib.format.open_memmap(partial, "w+", np.uint8, shape), np.zeros(look_shape, np.float16)
            digests, failures = decode_files(paths, size, images, looks, desc)
            images.flush()
            del images
        with atomic.replacing(looks_path) as partial:
            np.save(partial, looks)
        atomic.write_text(index_path, json.dumps({"digests": digests, "failures": failures}))
    index = json.loads(index_path.read_text())
    fits_in_memory = array_path.stat().st_size < 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Decoded(np.load(array_path, mmap_mode=None if fits_in_memory else "r"), index["digests"],
                   {int(i): reason for i, reason in index["failures"].items()}, np.load(looks_path))


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


# ---------------------------------------------------------------- a data set to train on

def is_quick_start_set(folder):
    """Whether folder is the shipped default data.dir: the quick start's own set, drawn on first use."""
    return os.path.abspath(folder) == os.path.abspath(shipped()["data"]["dir"])


def load_dataset(cfg, charset_hint=None):
    """Reads, checks and decodes the data set of cfg; prints a short report. Without data.charset, the
    charset is charset_hint (a continued run's) when every label fits it, else inferred."""
    d = cfg["data"]
    root, lengths = Path(d["dir"]), d["length"]
    if not root.exists() and is_quick_start_set(d["dir"]):
        print(f"{root} does not exist: drawing the quick start's set of {synth.DEFAULT_SET['count']} captchas "
              f"(set data.dir to train on your own)")
        with atomic.replacing(root) as partial:
            synth.draw_set(partial, **{**synth.DEFAULT_SET, "lengths": lengths, "seed": d["seed"],
                                       **({"charset": d["charset"]} if d["charset"] else {})})
    items, notes = labelled_files(root, d["labels"], d["label_pattern"], d["case"], lengths, d["charset"],
                                  d["allow_outside_dir"])
    good, bad = split_by_label_problem(items, lengths, d["charset"])
    if bad:
        hint = ""
        if d["case"] == "sensitive" and d["charset"] and any(
                not label_problem(label.lower(), lengths, d["charset"])
                or not label_problem(label.upper(), lengths, d["charset"]) for _, label, _ in bad):
            hint = "; set data.case=lower or upper to fold the labels' case"
        source = d["labels"] or "file names"
        raise UserError(f"{len(bad)} of {len(items)} labels in {source} do not fit data.length={shown_length(lengths)}"
                        f"{' and data.charset' if d['charset'] else ''}: {describe(bad, root)}{hint}")
    labels = [label for _, label in good]
    fits_hint = charset_hint is not None and set("".join(labels)) <= set(charset_hint)
    charset = d["charset"] or (charset_hint if fits_hint else infer_charset(labels))
    paths = [path for path, _ in good]
    image_size, why = (d["image_size"], None) if d["image_size"] != "auto" else auto_image_size(paths, lengths[1])
    decoded = load_images(paths, image_size, d["cache_dir"], desc=f"decoding {root}")
    digests, failures = decoded.digests, decoded.failures
    valid = np.array([i for i in range(len(paths)) if i not in failures], dtype=np.int64)
    if len(valid) < 2:
        raise UserError(f"{root}: fewer than 2 readable images")
    if len({digests[i] for i in valid}) < 2:
        raise UserError(f"{root}: all {len(valid)} readable images are identical; at least two different ones are "
                        f"needed, one to train on and one to hold out")
    targets = encode(labels, charset, lengths[1])
    train_idx, test_idx = split_train_test([digests[i] for i in valid], d["test_fraction"], d["seed"],
                                           [len(good[i][1]) for i in valid])
    train_idx, test_idx = valid[train_idx], valid[test_idx]
    # The held-out split in evaluate.py's order, by file name, so that both read it in the same batches.
    test_idx = np.array(sorted(test_idx, key=lambda i: relative_name(good[i][0], root)), dtype=np.int64)
    if d["max_train_images"]:
        train_idx = np.sort(np.random.default_rng(d["seed"]).permutation(train_idx)[:d["max_train_images"]])

    charset_source = "" if d["charset"] else ", the continued run's" if fits_hint else ", inferred"
    print(f"data: {len(valid)} images from {root}, labels from {d['labels'] or 'file names'}; "
          f"charset {charset!r} ({len(charset)} characters{charset_source}), "
          f"length {shown_length(lengths)}; {len(train_idx)} to train, {len(test_idx)} held out; input "
          f"{image_size[0]}x{image_size[1]}" + (f" (data.image_size auto: {why})" if why else ""))
    if lengths[0] < lengths[1]:
        counts, held_out = (collections.Counter(len(good[i][1]) for i in indices) for indices in (valid, test_idx))
        print("  lengths: " + ", ".join(f"{n}: {counts[n]} ({held_out[n]} held out)"
                                        for n in range(lengths[0], lengths[1] + 1) if counts[n]))
        few = [n for n in range(lengths[0], lengths[1] + 1) if counts[n] < FEW_OF_A_LENGTH]
        if few:
            print(f"  warning: fewer than {FEW_OF_A_LENGTH} images of length {', '.join(map(str, few[:10]))}"
                  f"{f' and {len(few) - 10} more' if len(few) > 10 else ''}: too few to learn those lengths, "
                  f"or to score them")
    if failures:
        notes.append(unreadable_note(failures, paths, root))
    groups = {}
    for i in valid:
        groups.setdefault(digests[i], []).append(i)
    repeats = [g for g in groups.values() if len(g) > 1]
    if repeats:
        disagree = sum(len({good[i][1] for i in g}) > 1 for g in repeats)
        notes.append(f"{sum(len(g) - 1 for g in repeats)} duplicate images ({len(repeats)} groups, kept on one side "
                     f"of the split; {disagree} groups with disagreeing labels): "
                     f"{', '.join(shown_path(paths[i], root) for i in repeats[0])}")
    for note in notes:
        print(f"  note: {note}")
    fingerprint = hashlib.sha1()
    for side, indices in (("train", train_idx), ("held out", test_idx)):
        for i in indices:
            fingerprint.update(f"{side},{shown_path(paths[i], root)},{good[i][1]},{digests[i]}\n".encode())
    split = {"train_images": len(train_idx), "held_out_images": len(test_idx), "digest": fingerprint.hexdigest(),
             "digest_version": DIGEST_VERSION}
    return {"root": root, "items": good, "images": decoded.images, "looks": decoded.looks, "image_size": image_size,
            "lengths": lengths, "targets": targets, "charset": charset, "train": train_idx, "test": test_idx,
            "digests": digests, "split": split}


def load_unlabelled(cfg, dataset):
    """data.unlabelled's images, decoded like the labelled ones, less the images training reads with
    their labels and the held-out images, which are never pseudo-labelled: the same pixels, and also
    look-alikes of held-out images (a re-encoded or resized copy). (A labelled image left out by
    data.max_train_images may be pseudo-labelled: the benchmarks use that.)"""
    d = cfg["data"]
    root = Path(d["unlabelled"])
    if not root.is_dir():
        raise UserError(f"data.unlabelled: folder not found: {root}")
    try:
        paths = image_files(root)
    except UserError as e:
        raise UserError(f"data.unlabelled: {e}") from None
    decoded = load_images(paths, dataset["image_size"], d["cache_dir"], desc=f"decoding {root}")
    labelled = {dataset["digests"][i] for i in (*dataset["train"], *dataset["test"])}
    readable = [i for i in range(len(paths)) if i not in decoded.failures]
    copies = [i for i in readable if decoded.digests[i] in labelled]
    alike = look_alikes(decoded.looks[readable], dataset["looks"][dataset["test"]])
    near = [i for i, is_alike in zip(readable, alike) if is_alike and decoded.digests[i] not in labelled]
    keep = sorted(set(readable) - set(copies) - set(near))
    print(f"unlabelled: {len(keep)} images from {root} for self-training")
    if decoded.failures:
        print(f"  note: {unreadable_note(decoded.failures, paths, root)}")
    if copies:
        print(f"  note: {len(copies)} are held-out or training images already, skipped")
    if near:
        print(f"  note: {len(near)} look like held-out images (re-encoded or resized copies), skipped: "
              f"{', '.join(shown_path(paths[i], root) for i in near[:3])}")
    return {"root": root, "paths": [paths[i] for i in keep], "images": decoded.images[keep]}


# ---------------------------------------------------------------- python data.py synth

def fitted_style(paths, charset, lengths, seed=0):
    """synth.fit_style over at most synth.FIT_SAMPLE of the readable images at paths, picked by seed ->
    (style, size); says how far the fitted style and the `captcha` package's are from the images."""
    picked = np.random.default_rng(seed).permutation(len(paths))
    images = []
    for i in picked:
        if len(images) == synth.FIT_SAMPLE:
            break
        try:
            images.append(np.asarray(full_size_rgb(paths[i])))
        except ImageError:
            continue
    if not images:
        raise UserError(f"no readable images to fit the synthetic captchas to, among {len(paths)} files")
    style, size, distance, package_distance = synth.fit_style(images, charset, lengths, seed)
    print(f"synthetic captchas fitted to {len(images)} images: {size[0]}x{size[1]}, distance {distance:.1f} "
          f"(the captcha package's style: {package_distance:.1f}"
          f"{', nearer: drawn in it' if style == synth.Style() else ''})")
    return style, size


def parse_size(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, like 64x128, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_length_argument(text):
    lengths = parse_length(int(text) if text.strip().isdigit() else text)
    if lengths is None:
        raise argparse.ArgumentTypeError(f"expected {LENGTH_RULE}, got {text!r}")
    return lengths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("synth", help="write synthetic captchas, labelled in their file names")
    draw.add_argument("--out", required=True, help="folder to write into")
    draw.add_argument("--count", type=int, required=True)
    draw.add_argument("--length", type=parse_length_argument, default=[4, 4],
                      help="a number, or a range like 4-6 (default 4)")
    draw.add_argument("--charset", default=synth.CHARSET)
    draw.add_argument("--size", type=parse_size,
                      help=f"HEIGHTxWIDTH, default {synth.SIZE[0]}x{synth.SIZE[1]}, or with --like the captchas' median")
    draw.add_argument("--seed", type=int, default=0)
    draw.add_argument("--like", metavar="FOLDER",
                      help="draw in the style of the captchas in FOLDER: their size (unless --size), colours, grain, "
                           "fonts, strokes, rotation, dots, arcs and lines, measured and fitted")
    args = parser.parse_args(argv)
    style, size = synth.Style(), synth.SIZE
    if args.like:
        paths = find_images(args.like) if Path(args.like).is_dir() else []
        if not paths:
            raise UserError(f"--like {args.like}: not a folder of images")
        style, size = fitted_style(paths, args.charset, args.length, args.seed)
    synth.draw_set(args.out, args.count, args.length, args.charset, args.size or size, args.seed, style)


if __name__ == "__main__":
    run_main(main)
