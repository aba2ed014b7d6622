"""Run-to-run noise: train one real set with several seeds, score each run with evaluate.py, keep a CSV row each.

    python bench/seeds.py --sets henan_4digit thsr_4char [--labels 1000] [--seeds 0 1] [--epochs 2]
                          [--code DIR] [--shared ../shared/data] [--out bench/results/seeds] [--set KEY=VALUE ...]

--code runs the train.py and evaluate.py of another checkout (e.g. a `git worktree` at an older commit),
so that code before and after a change is measured by the same command. data.seed sets the split, the
order of the batches and the initial weights alike. The ImageNet weights cannot be had offline, so
runs start from random weights (model.weights=none) unless --set says otherwise. henan_4digit trains on
its published labels and is scored against its corrected ones (labels_clean.csv).

Each finished run is skipped by a rerun: its row is in results.csv under --out.
"""
import argparse
import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder, label file, clean label file (or None), length; relative to --shared
SETS = {
    "henan_4digit": ("henan_4digit", "labels.csv", "labels_clean.csv", 4),
    "lzu_5digit": ("lzu_5digit/right", None, None, 5),
    "thsr_4char": ("thsr_4char", "labels.csv", None, 4),
    "esaj_5char": ("esaj_5char", "labels.csv", None, 5),
}
FIELDS = ["set", "labels", "seed", "epochs", "code", "commit", "settings", "whole_string_accuracy", "correct", "count",
          "recorded", "chosen_epoch", "minutes"]


def commit(code):
    result = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+changes" if dirty else "")


def append_row(table, fields, row):
    """One row at the end of a CSV, under a header written with its first row."""
    new = not table.exists()
    with open(table, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["henan_4digit"], choices=SETS)
    parser.add_argument("--labels", type=int, default=0, help="data.max_train_images (0 = every training image)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose train.py and evaluate.py run")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "seeds"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more train.py overrides")
    args = parser.parse_args()
    code, shared, out = Path(args.code).resolve(), Path(args.shared).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = set()
    if table.exists():
        with open(table, newline="") as f:
            done = {(r["set"], r["labels"], r["seed"], r["epochs"], r["code"], r["settings"]) for r in csv.DictReader(f)}
    settings = ["model.weights=none", *args.set, *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    for name in args.sets:
        folder, labels, clean, length = SETS[name]
        for seed in args.seeds:
            key = (name, str(args.labels), str(seed), str(args.epochs or ""), str(code), " ".join(settings))
            if key in done:
                continue
            run_dir = out / f"{name}_{args.labels or 'all'}_s{seed}_{hashlib.sha1(repr(key).encode()).hexdigest()[:8]}"
            train_args = [f"data.dir={shared / folder}", f"data.length={length}", f"data.seed={seed}",
                          f"data.max_train_images={args.labels}", *settings,
                          *([f"data.labels={shared / folder / labels}"] if labels else [])]
            started = time.perf_counter()
            with open(run_dir.with_suffix(".log"), "a") as log:
                subprocess.run([sys.executable, str(code / "train.py"), "--run-dir", str(run_dir),
                                *[a for s in train_args for a in ("--set", s)]], stdout=log, stderr=log, check=True)
            minutes = (time.perf_counter() - started) / 60
            scored = subprocess.run([sys.executable, str(code / "evaluate.py"), "--model", str(run_dir), "--json",
                                     *(["--labels", str(shared / folder / clean)] if clean else [])],
                                    capture_output=True, text=True, check=True)
            report = json.loads(scored.stdout)
            metadata = json.loads((run_dir / "metadata.json").read_text())
            row = {"set": name, "labels": args.labels, "seed": seed, "epochs": args.epochs or "", "code": str(code),
                   "commit": commit(code), "settings": " ".join(settings),
                   "whole_string_accuracy": f"{report['whole_string_accuracy']:.4f}", "correct": report["correct"],
                   "count": report["count"], "recorded": f"{metadata['held_out_whole_string_accuracy']:.4f}",
                   "chosen_epoch": metadata["epoch"], "minutes": f"{minutes:.1f}"}
            append_row(table, FIELDS, row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
