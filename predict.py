"""Read captchas with a trained model.

    python predict.py --model RUN_DIR_OR_MODEL PATH... [--output FILE.csv|FILE.jsonl] [--batch-size N] [--overwrite]

A PATH is a folder (read recursively), a file or a glob. Rows are `path,prediction,confidence`;
JSONL adds the confidence of each position. An unreadable file is reported on stderr and
the others are still read; the exit status is then 1.

From Python:
    from predict import Recognizer
    recognizer = Recognizer.load("runs/20260101-120000")
    recognizer.predict(["a.png", open("b.jpg", "rb").read(), pil_image, numpy_array])
"""
import argparse
import csv
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from config import UserError, quiet_backend_startup, run

quiet_backend_startup()
import data  # noqa: E402
from model import load_model, resolve_precision, with_precision  # noqa: E402

DEFAULT_BATCH_SIZE = 64


class Reading(NamedTuple):
    text: str
    confidence: float  # product of the positions' confidences: the chance that the whole string is right
    position_confidences: list


class Recognizer:
    """A trained model with its metadata, which alone decides the charset, length and input size.

    run_batch: uint8 array batch_size x H x W x 3 -> one array of probabilities per position."""

    def __init__(self, run_batch, metadata, batch_size=DEFAULT_BATCH_SIZE):
        self.run_batch, self.metadata, self.batch_size = run_batch, metadata, batch_size
        self.image_size = tuple(metadata["image_size"])

    @classmethod
    def load(cls, path, batch_size=DEFAULT_BATCH_SIZE, precision="auto"):
        """path: a run directory or a .keras file. precision: as train.precision; `auto` computes in
        bfloat16 where the CPU does so natively (faster, and the same text on all but rare near-ties)."""
        model, metadata = load_model(path)
        policy = resolve_precision(precision)
        model = model if policy == "float32" else with_precision(model, policy)
        return cls(model.predict_on_batch, metadata, batch_size)

    def probabilities(self, pixels):
        """uint8 array N x H x W x 3 -> one N x classes array per position. Runs fixed-size batches,
        padding the last, so that the model is compiled once and every batch is computed alike."""
        outputs = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, *batch.shape[1:]), np.uint8)
            padded[:len(batch)] = batch
            outputs.append([np.asarray(p)[:len(batch)] for p in self.run_batch(padded)])
        if not outputs:
            return [np.zeros((0, len(self.metadata["charset"])))] * self.metadata["length"]
        return [np.concatenate(position) for position in zip(*outputs)]

    def read(self, pixels):
        """uint8 array N x H x W x 3 -> list of Reading."""
        probabilities = np.stack(self.probabilities(pixels), axis=1)  # N x length x classes
        indices = probabilities.argmax(axis=-1)
        position_confidences = probabilities.max(axis=-1)
        texts = data.decode(indices, self.metadata["charset"])
        return [Reading(text, float(np.prod(conf)), [float(c) for c in conf])
                for text, conf in zip(texts, position_confidences)]

    def predict(self, images):
        """images: paths, bytes, PIL images or numpy arrays -> list of Reading. Raises data.ImageError."""
        return self.read(np.stack([data.decode_image(image, self.image_size) for image in images])) if images else []


def decode_chunk(paths, size):
    pixels, errors = [], {}
    for path in paths:
        try:
            pixels.append(data.decode_image(path, size))
        except data.ImageError as e:
            errors[path] = str(e)
    return np.stack(pixels) if pixels else np.zeros((0, *size, 3), np.uint8), errors


def read_files(recognizer, paths, desc="reading"):
    """Yields (path, Reading or None, error or None) in order. The next chunk is decoded in a
    thread while the model reads this one."""
    step = recognizer.batch_size * 4
    chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(1) as pool, tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr) as bar:
        pending = pool.submit(decode_chunk, chunks[0], recognizer.image_size) if chunks else None
        for i, chunk in enumerate(chunks):
            pixels, errors = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(decode_chunk, chunks[i + 1], recognizer.image_size)
            readings = iter(recognizer.read(pixels))
            for path in chunk:
                yield (path, None, errors[path]) if path in errors else (path, next(readings), None)
            bar.update(len(chunk))


def check_output(path, overwrite):
    if path is not None and Path(path).suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--output {path}: expected a .csv or .jsonl file")
    if path is not None and Path(path).exists() and not overwrite:
        raise UserError(f"--output {path} exists; pass --overwrite to replace it")


def open_output(path):
    """-> (file to write, function that completes it). A file is written beside its target and
    renamed into place at the end, so an interrupted run never leaves half an output."""
    if path is None:
        return sys.stdout, lambda: None
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    f = open(partial, "w", newline="", encoding="utf-8")

    def finish():
        f.close()
        os.replace(partial, path)

    return f, finish


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or .keras file")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folder, file or glob")
    parser.add_argument("--output", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)

    check_output(args.output, args.overwrite)
    paths, unmatched = data.expand_paths(args.paths)
    for arg in unmatched:
        print(f"{arg}: no such file, folder or matching image", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {' '.join(args.paths)}")
    recognizer = Recognizer.load(args.model, args.batch_size)
    out, finish = open_output(args.output)
    jsonl = args.output is not None and args.output.lower().endswith(".jsonl")
    writer = None if jsonl else csv.writer(out)
    if writer:
        writer.writerow(["path", "prediction", "confidence"])
    failed = len(unmatched)
    for path, reading, error in read_files(recognizer, [str(p) for p in paths]):
        if error:
            failed += 1
            print(f"{path}: {error}", file=sys.stderr)
        elif jsonl:
            out.write(json.dumps({"path": path, "prediction": reading.text, "confidence": round(reading.confidence, 6),
                                  "position_confidences": [round(c, 6) for c in reading.position_confidences]}) + "\n")
        else:
            writer.writerow([path, reading.text, f"{reading.confidence:.6f}"])
    finish()
    if failed:
        print(f"{failed} of {len(paths) + len(unmatched)} inputs could not be read; the other rows are written",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
