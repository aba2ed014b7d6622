"""Scoring readings against labels: whole-string accuracy and the figures around it.

One path for every score the project reports: train.py's held-out score after each epoch,
evaluate.py's report, and export.py's held-out check all come from score_readings.
"""
import collections
from pathlib import Path

import numpy as np

import data
from cli import UserError
from config import shown_length
from recognizer import SURE_CONFIDENCE, read_files

COVERAGES = (1.0, 0.95, 0.9, 0.8)


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


def score_readings(labels, readings, charset, length):
    """Labels and the readings of the same images -> score's figures; length: the model's heads."""
    truth = data.encode(labels, charset, length)
    predicted = data.encode([reading.text for reading in readings], charset, length)
    return score(truth, predicted, np.array([reading.confidence for reading in readings]), charset)


def score_items(recognizer, items, root):
    """Reads every (path, label) item -> (report, rows): rows are the wrong readings, most confident first,
    then the items skipped. Unreadable images, missing files and labels the model cannot score are
    counted with their reasons, never scored."""
    meta = recognizer.metadata
    scorable, unscorable = data.split_by_label_problem(items, recognizer.lengths, meta["charset"])
    if not scorable:
        raise UserError(f"none of the {len(items)} labels fit the model (length "
                        f"{shown_length(recognizer.lengths)}, charset "
                        f"{meta['charset']!r}): {data.describe(unscorable, root)}")
    skipped = [(str(p), label, f"unscorable label: {why}") for p, label, why in unscorable]
    labels = {}
    for p, label in scorable:
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
    report = score_readings([labels[p] for p in paths], [readings[p] for p in paths], meta["charset"],
                            meta["length"])
    rows = [{"path": data.shown_path(p, root), "label": labels[p], "prediction": readings[p].text,
             "confidence": readings[p].confidence,
             "suspected_label_error": readings[p].confidence >= SURE_CONFIDENCE}
            for p in paths if readings[p].text != labels[p]]
    rows.sort(key=lambda row: -row["confidence"])
    suspects = [row for row in rows if row["suspected_label_error"]]
    reasons = collections.Counter(reason.split(":")[0] for _, _, reason in skipped)
    report.update({
        "count": len(paths), "skipped": len(skipped), "skipped_reasons": dict(reasons),
        "skipped_items": [{"path": data.shown_path(p, root), "label": label, "reason": reason}
                          for p, label, reason in skipped],
        "suspected_label_errors": {"threshold": SURE_CONFIDENCE, "count": len(suspects), "items": suspects},
        "errors": len(rows),
    })
    return report, rows + [{"path": data.shown_path(p, root), "label": label, "prediction": "", "confidence": "",
                            "suspected_label_error": False, "reason": reason} for p, label, reason in skipped]
