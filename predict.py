"""Read captchas with a trained model.

    python predict.py --model RUN_DIR_OR_MODEL PATH... [--output FILE.csv|FILE.jsonl] [--html FILE.html]
                      [--least-confident N] [--batch-size N] [--tta] [--overwrite]

A PATH is a folder (read recursively), a file or a glob. Rows are `path,prediction,confidence`;
JSONL adds the confidence of each position. An unreadable file is reported on stderr and
the others are still read; the exit status is then 1. --html writes a review page of the readings,
least confident first, to correct them into labels (see review.py). --least-confident N writes
only the N least confident readings, as a label CSV to correct: the captchas to label next.

The model is a run directory, a .keras file, or an export made by export.py: X.onnx, X.tflite or a
SavedModel folder, with its metadata beside it (X.onnx.json, ...). Which file a run directory is read
through is run.file_to_read's choice. From Python, see recognizer.Recognizer.
"""
import argparse
import contextlib
import json
import os
import sys

import data
import review
from cli import CsvWriter, UserError, check_output, run_main
from atomic import opened
from recognizer import DEFAULT_BATCH_SIZE, TEST_TIME_AUGMENTATION_HELP, Recognizer, least_confident, read_files


def inputs_root(paths):
    """The folder that holds every input: the data.dir that labels written for them are relative to."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def write_review(path, model_arg, paths, read, failed, metadata):
    """The review page of read = [(path, Reading)], least confident first, each reading the label to
    correct, then the files that could not be read (failed = [(path, why)]). Its paths are relative
    to the folder that holds every input, the data.dir to train on."""
    root = inputs_root(paths)
    shown = [(data.shown_path(os.path.abspath(p), root), reading) for p, reading in read]
    cards = [{"path": name, "label": None, "reading": reading.text, "confidence": reading.confidence,
              "suspected": False, "reason": None} for name, reading in sorted(shown, key=lambda item: item[1].confidence)]
    cards += [{"path": data.shown_path(os.path.abspath(p), root), "label": None, "reading": "", "confidence": None,
               "suspected": False, "reason": f"unreadable: {why}"} for p, why in failed]
    review.write_page(path, f"Readings of {len(read)} captchas, least confident first", model_arg, root, cards,
                      [(card["path"], card["reading"]) for card in cards], metadata)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, .keras file or export (.onnx, .tflite, "
                                                       "SavedModel folder)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folder, file or glob")
    parser.add_argument("--output", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    parser.add_argument("--html", help="also write a review page, least confident first, to correct the readings "
                                       "into labels")
    parser.add_argument("--least-confident", type=int, metavar="N",
                        help="write only the N readings the model is least sure of, least sure first, as a label CSV "
                             "(filename,label,confidence) relative to the folder of the inputs: the captchas to "
                             "label next")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--tta", action="store_true", help=TEST_TIME_AUGMENTATION_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output or --html file")
    args = parser.parse_args(argv)

    if args.least_confident is not None and args.least_confident < 1:
        raise UserError(f"--least-confident must be at least 1, got {args.least_confident}")
    check_output(args.output, args.overwrite, "--output", (".csv",) if args.least_confident else (".csv", ".jsonl"))
    check_output(args.html, args.overwrite, "--html", (".html", ".htm"))
    paths, unmatched = data.expand_paths(args.paths)
    for arg in unmatched:
        print(f"{arg}: no such file, folder or matching image", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {' '.join(args.paths)}")
    recognizer = Recognizer.load(args.model, args.batch_size, test_time_augmentation=args.tta)
    jsonl = args.output is not None and args.output.lower().endswith(".jsonl")
    read, failed = [], []
    with output(args.output) as out:
        writer = None if jsonl or args.least_confident else CsvWriter(out)
        if writer:
            writer.writerow(["path", "prediction", "confidence"])
        for path, reading, error in read_files(recognizer, [str(p) for p in paths]):
            if error:
                print(f"{path}: {error}", file=sys.stderr)
                failed.append((path, error))
                continue
            read.append((path, reading))
            if args.least_confident:
                continue  # written once every reading is in
            if jsonl:
                out.write(json.dumps({"path": path, "prediction": reading.text,
                                      "confidence": round(reading.confidence, 6),
                                      "position_confidences": [round(c, 6) for c in reading.position_confidences]})
                          + "\n")
            else:
                writer.writerow([path, reading.text, f"{reading.confidence:.6f}"])
        if args.least_confident:
            chosen = least_confident(read, args.least_confident)
            data.write_labels(out, [(path, reading.text) for path, reading in chosen], inputs_root(paths),
                              [reading.confidence for _, reading in chosen])
    if args.html:
        write_review(args.html, args.model, paths, read, failed, recognizer.metadata)
    if failed or unmatched:
        print(f"{len(failed) + len(unmatched)} of {len(paths) + len(unmatched)} inputs could not be read; the other "
              f"rows are written", file=sys.stderr)
    return 1 if failed or unmatched else 0


@contextlib.contextmanager
def output(path):
    """stdout, or the file at path, which appears whole only once everything is written."""
    if path is None:
        yield sys.stdout
        return
    with opened(path, newline="", encoding="utf-8") as f:
        yield f


if __name__ == "__main__":
    run_main(main)
