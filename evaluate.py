"""Score a trained model on every image of a labelled set: whole-string accuracy and more.

    python evaluate.py --model RUN_DIR_OR_MODEL [--data DIR] [--labels CSV] [--json] [--errors FILE.csv]
                       [--html FILE.html] [--batch-size N] [--overwrite]

Without --data it scores the run's held-out split (optionally against the labels of --labels).
With --data it scores any folder, labelled by file name as in training, or by --labels.
--html writes a review page of the wrong readings, to look at them and correct labels (see review.py).
"""
import argparse
import collections
import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from config import UserError, quiet_backend_startup, run

quiet_backend_startup()
import data  # noqa: E402
import review  # noqa: E402
from predict import DEFAULT_BATCH_SIZE, SURE_CONFIDENCE, Recognizer, check_output, read_files  # noqa: E402

# A wrong reading this sure of itself is more often a wrong label than a wrong reading.
SUSPECT_CONFIDENCE = SURE_CONFIDENCE
COVERAGES = (1.0, 0.95, 0.9, 0.8)


def held_out_items(model_arg, labels_csv, case):
    """The run's held-out split, labelled by the split's own list or by labels_csv. Images
    missing from it stay in the list, to be counted as skipped."""
    run_dir = Path(model_arg) if Path(model_arg).is_dir() else Path(model_arg).parent
    split, config = run_dir / "test_split.csv", run_dir / "config.yaml"
    if not split.exists() or not config.exists():
        raise UserError(f"no held-out split in {run_dir} (test_split.csv and config.yaml): pass --data")
    settings = yaml.safe_load(config.read_text())["data"]
    root, allow_outside = Path(settings["dir"]), settings.get("allow_outside_dir", False)
    if not root.is_dir():
        raise UserError(f"the run's data folder {root} (data.dir in {config}) no longer exists: move it back, "
                        f"or pass --data")
    split_labels, _ = data.read_labels_csv(split, root, allow_outside, keep_missing=True)
    notes = []
    if labels_csv:
        table, notes = data.read_labels_csv(labels_csv, root, allow_outside, keep_missing=True)
        missing = [name for name in split_labels if name not in table]
        if missing:
            raise UserError(f"{labels_csv} has no label for {len(missing)} held-out images, such as {missing[0]}")
        split_labels = {name: table[name] for name in split_labels}
    items = [(root / name, data.normalise_label(label, case)) for name, label in sorted(split_labels.items())]
    return root, items, f"held-out split of {run_dir} ({split})", notes


def score(truth, predicted, confidence, charset):
    """truth, predicted: N x length index arrays, as data.encode makes them; confidence: N. -> the
    report's figures. Past a text's end each position holds the blank, a class like any other."""
    right = predicted == truth
    whole = right.all(axis=1)
    order = np.argsort(-confidence, kind="stable")
    coverage = []
    for fraction in COVERAGES:
        kept = order[:max(1, round(fraction * len(order)))] if len(order) else order
        coverage.append({"coverage": fraction, "min_confidence": float(confidence[kept].min()) if len(kept) else None,
                         "whole_string_accuracy": float(whole[kept].mean()) if len(kept) else None})
    per_character = {}
    for index, char in enumerate(charset):
        mask = truth == index
        if mask.any():
            per_character[char] = {"accuracy": float(right[mask].mean()), "count": int(mask.sum())}
    symbols = list(charset) + [""]  # the blank, "no character here", is the empty string
    confusions = collections.Counter(
        (symbols[t], symbols[p]) for t, p in zip(truth[~right], predicted[~right]))
    true_lengths, read_lengths = (np.sum(x != len(charset), axis=1) for x in (truth, predicted))
    by_length = [{"length": int(n), "whole_string_accuracy": float(whole[true_lengths == n].mean()),
                  "correct": int(whole[true_lengths == n].sum()), "count": int(np.sum(true_lengths == n))}
                 for n in np.unique(true_lengths)]
    length_confusion = collections.Counter(zip(true_lengths.tolist(), read_lengths.tolist()))
    return {
        "whole_string_accuracy": float(whole.mean()) if len(whole) else None,
        "correct": int(whole.sum()),
        "per_position_accuracy": [float(a) for a in right.mean(axis=0)] if len(whole) else [],
        "per_character_accuracy": per_character,
        "confusions": [{"true": t, "predicted": p, "count": n} for (t, p), n in confusions.most_common(10)],
        "accuracy_by_length": by_length,
        "length_confusion": [{"true": t, "read": r, "count": n} for (t, r), n in sorted(length_confusion.items())],
        "coverage": coverage,
    }


def evaluate(recognizer, items, root):
    """Reads every item -> (report, rows). Unreadable images and unscorable labels are
    counted with their reasons, never scored."""
    meta = recognizer.metadata
    scorable, unscorable = data.split_by_label_problem(items, recognizer.lengths, meta["charset"])
    if not scorable:
        raise UserError(f"none of the {len(items)} labels fit the model (length "
                        f"{data.shown_lengths(recognizer.lengths)}, charset "
                        f"{meta['charset']!r}): {data.describe(unscorable, root)}")
    if unscorable:
        print(f"note: {len(unscorable)} labels do not fit the model and are not scored: "
              f"{data.describe(unscorable, root)}", file=sys.stderr)
    skipped = [(str(p), label, f"unscorable label: {why}") for p, label, why in unscorable]
    labels = {}
    for p, label in scorable:  # a file missing from disk is counted as skipped
        if Path(p).is_file():
            labels[str(p)] = label
        else:
            skipped.append((str(p), label, "missing file"))
    readings = {}
    for path, reading, error in read_files(recognizer, list(labels), desc="scoring"):
        if error:
            skipped.append((path, labels[path], f"unreadable: {error}"))
        else:
            readings[path] = reading
    paths = list(readings)
    truth = data.encode([labels[p] for p in paths], meta["charset"], meta["length"])
    predicted = data.encode([readings[p].text for p in paths], meta["charset"], meta["length"])
    confidence = np.array([readings[p].confidence for p in paths])
    report = score(truth, predicted, confidence, meta["charset"])
    rows = [{"path": data.shown_path(p, root), "label": labels[p], "prediction": readings[p].text,
             "confidence": readings[p].confidence,
             "suspected_label_error": readings[p].confidence >= SUSPECT_CONFIDENCE}
            for p in paths if readings[p].text != labels[p]]
    rows.sort(key=lambda row: -row["confidence"])
    suspects = [row for row in rows if row["suspected_label_error"]]
    reasons = collections.Counter(reason.split(":")[0] for _, _, reason in skipped)
    report.update({
        "count": len(paths), "skipped": len(skipped), "skipped_reasons": dict(reasons),
        "skipped_items": [{"path": data.shown_path(p, root), "label": label, "reason": reason}
                          for p, label, reason in skipped],
        "suspected_label_errors": {"threshold": SUSPECT_CONFIDENCE, "count": len(suspects), "items": suspects},
        "errors": len(rows),
    })
    return report, rows + [{"path": data.shown_path(p, root), "label": label, "prediction": "", "confidence": "",
                            "suspected_label_error": False, "reason": reason} for p, label, reason in skipped]


def print_report(report, source, meta):
    percent = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    print(f"data: {source}")
    print(f"model: {report['model']}{' (8-bit integers)' if meta.get('quantized') else ''}, {meta['backbone']}, "
          f"charset {meta['charset']!r}, "
          f"length {data.shown_lengths(data.model_lengths(meta))}, "
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
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", "confidence", "suspected_label_error", "reason"])
        for row in rows:
            confidence = f"{row['confidence']:.6f}" if row["confidence"] != "" else ""
            writer.writerow([row["path"], row["label"], row["prediction"], confidence,
                             "yes" if row["suspected_label_error"] else "", row.get("reason", "")])


def write_review(path, report, rows, items, root, meta):
    """The review page of the wrong readings, most confident first, each label in a box to correct; its
    download lists every scored image."""
    skipped = {item["path"] for item in report["skipped_items"]}
    scored = [(data.shown_path(p, root), label) for p, label in items]
    cards = [{"path": row["path"], "label": row["label"], "reading": row["prediction"], "confidence": row["confidence"],
              "suspected": row["suspected_label_error"]} for row in rows if "reason" not in row]
    review.write_page(path, f"Wrong readings of {report['data']}, most confident first", report["model"], root, cards,
                      [(name, label) for name, label in scored if name not in skipped], meta, SUSPECT_CONFIDENCE,
                      report)


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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --errors or --html file")
    args = parser.parse_args(argv)

    check_output(args.errors, args.overwrite, "--errors", (".csv",))
    if args.html:
        review.check_page_path(args.html, args.overwrite)
    recognizer = Recognizer.load(args.model, args.batch_size)
    meta = recognizer.metadata
    if args.data:
        root = Path(args.data)
        items, notes = data.labelled_files(root, args.labels, meta["label_pattern"], meta["case"],
                                           recognizer.lengths, meta["charset"])
        source = f"{root} (labels from {args.labels or 'file names'})"
    else:
        root, items, source, notes = held_out_items(args.model, args.labels, meta["case"])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    report, rows = evaluate(recognizer, items, root)
    report.update({"model": str(recognizer.source), "data": source})
    if args.errors:
        write_errors(args.errors, rows)
    if args.html:
        write_review(args.html, report, rows, items, root, meta)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, source, meta)
    return 0


if __name__ == "__main__":
    run(main)
