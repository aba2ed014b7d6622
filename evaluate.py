"""Score a trained model on every image of a labelled set: whole-string accuracy and more.

    python evaluate.py --model RUN_DIR_OR_MODEL [--data DIR] [--labels CSV] [--json] [--errors FILE.csv]
                       [--html FILE.html] [--batch-size N] [--tta] [--overwrite]

Without --data it scores the run's held-out split (optionally against the labels of --labels).
With --data it scores any folder, labelled by file name as in training, or by --labels.
--html writes a review page of the wrong readings, to look at them and correct labels (see review.py).
"""
import argparse
import json
import sys
from pathlib import Path

import atomic
import data
import review
import run
from cli import CsvWriter, check_output, run_main
from config import shown_length
from recognizer import DEFAULT_BATCH_SIZE, TEST_TIME_AUGMENTATION_HELP, Recognizer
from scoring import score_items


def print_report(report, source, meta):
    percent = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    print(f"data: {source}")
    print(f"model: {report['model']}{' (8-bit integers)' if meta.get('quantized') else ''}, {meta['backbone']}, "
          f"charset {meta['charset']!r}, "
          f"length {shown_length(run.model_lengths(meta))}, "
          f"input {meta['image_size'][0]}x{meta['image_size'][1]}")
    print(f"scored {report['count']} images, skipped {report['skipped']}"
          + (f" ({', '.join(f'{n} {r}' for r, n in report['skipped_reasons'].items())})" if report["skipped"] else ""))
    print(f"whole-string accuracy: {percent(report['whole_string_accuracy'])} "
          f"({report['correct']}/{report['count']})")
    print("by length: " + "  ".join(f"{row['length']}: {percent(row['whole_string_accuracy'])} "
                                    f"({row['correct']}/{row['count']})" for row in report["accuracy_by_length"]))
    misread = [c for c in report["length_confusion"] if c["true"] != c["read"]]
    if misread:
        print("lengths misread (true -> read): "
              + ", ".join(f"{c['true']}->{c['read']} x{c['count']}" for c in misread))
    print("per position: " + "  ".join(f"{i}: {percent(a)}" for i, a in enumerate(report["per_position_accuracy"], 1)))
    print("per character: " + "  ".join(f"{c!r} {percent(v['accuracy'])} ({v['count']})"
                                        for c, v in report["per_character_accuracy"].items()))
    if report["confusions"]:
        shown = lambda symbol: symbol or "(none)"  # noqa: E731  (the blank: no character there)
        print("most frequent confusions (true -> predicted): "
              + ", ".join(f"{shown(c['true'])}->{shown(c['predicted'])} x{c['count']}" for c in report["confusions"]))
    print("confidence coverage: " + "  ".join(
        f"top {100 * c['coverage']:.0f}%: {percent(c['whole_string_accuracy'])}" for c in report["coverage"]))
    suspects = report["suspected_label_errors"]
    print(f"suspected label errors (wrong at confidence >= {suspects['threshold']}): {suspects['count']}")
    for row in suspects["items"][:20]:
        print(f"  {row['path']}: label {row['label']!r}, read {row['prediction']!r} ({row['confidence']:.4f})")
    for item in report["skipped_items"][:10]:
        print(f"  skipped {item['path']}: {item['reason']}")


def write_errors(path, rows):
    with atomic.opened(path, newline="", encoding="utf-8") as f:
        writer = CsvWriter(f)
        writer.writerow(["path", "label", "prediction", "confidence", "suspected_label_error", "reason"])
        for row in rows:
            confidence = f"{row['confidence']:.6f}" if row["confidence"] != "" else ""
            writer.writerow([row["path"], row["label"], row["prediction"], confidence,
                             "yes" if row["suspected_label_error"] else "", row.get("reason", "")])


def write_review(path, report, rows, items, root, model_arg, meta):
    """The review page of the wrong readings, most confident first, then the items that were not scored,
    each marked with why; every label is in a box to correct, and its download lists every item."""
    cards = [{"path": row["path"], "label": row["label"], "reading": row["prediction"],
              "confidence": row["confidence"] if row["confidence"] != "" else None,
              "suspected": row["suspected_label_error"], "reason": row.get("reason")} for row in rows]
    review.write_page(path, f"Wrong readings of {report['data']}, most confident first", model_arg, root, cards,
                      [(data.shown_path(p, root), label) for p, label in items], meta, report)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, .keras file or export (.onnx, .tflite, "
                                                       "SavedModel folder)")
    parser.add_argument("--data", help="labelled folder to score (default: the run's held-out split)")
    parser.add_argument("--labels", help="filename,label CSV: labels for --data, or for the held-out split")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--errors", help="write wrong and skipped items to this CSV, most confident first")
    parser.add_argument("--html", help="write a review page of the wrong readings, to look at them and correct labels")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--tta", action="store_true", help=TEST_TIME_AUGMENTATION_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --errors or --html file")
    args = parser.parse_args(argv)

    check_output(args.errors, args.overwrite, "--errors", (".csv",))
    check_output(args.html, args.overwrite, "--html", (".html", ".htm"))
    recognizer = Recognizer.load(args.model, args.batch_size, test_time_augmentation=args.tta)
    meta = recognizer.metadata
    if args.data:
        root = Path(args.data)
        items, notes = data.labelled_files(root, args.labels, meta["label_pattern"], meta["case"],
                                           recognizer.lengths, meta["charset"], keep_missing=True)
        source = f"{root} (labels from {args.labels or 'file names'})"
    else:
        root, items, source, notes = run.held_out_items(run.run_dir_of(args.model), args.labels, meta["case"])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    report, rows = score_items(recognizer, items, root)
    unscorable = [item for item in report["skipped_items"] if item["reason"].startswith("unscorable")]
    if unscorable:
        print(f"note: {len(unscorable)} labels do not fit the model and are not scored, such as "
              f"{unscorable[0]['path']} ({unscorable[0]['reason']})", file=sys.stderr)
    report.update({"model": str(recognizer.source), "data": source, "test_time_augmentation": args.tta})
    if args.errors:
        write_errors(args.errors, rows)
    if args.html:
        write_review(args.html, report, rows, items, root, args.model, meta)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, source, meta)
    return 0


if __name__ == "__main__":
    run_main(main)
