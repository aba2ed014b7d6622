"""Test-time augmentation and ddddocr on the held-out split of finished runs.

    python bench/tta.py RUN [RUN ...] [--out bench/results/tta]

For each run: this checkout's evaluate.py --json without and with --tta (the file the run is read
through, as evaluate.py chooses it), and ddddocr 1.6.1 as it ships on the same held-out images,
case-insensitively. One row per run in results.csv under --out; a run already there is skipped.
"""
import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import ddddocr_accuracy
from seeds import ROOT, append_row, commit

FIELDS = ["run", "commit", "model", "count", "correct", "whole_string_accuracy", "seconds", "tta_correct",
          "tta_whole_string_accuracy", "tta_seconds", "ddddocr_correct", "ddddocr_whole_string_accuracy"]


def evaluate(run_dir, *extra):
    started = time.perf_counter()
    scored = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(run_dir), "--json", *extra],
                            capture_output=True, text=True, check=True)
    return json.loads(scored.stdout), time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tta"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = set()
    if table.exists():
        with open(table, newline="") as f:
            done = {row["run"] for row in csv.DictReader(f)}
    for run_dir in map(Path, args.runs):
        if str(run_dir.resolve()) in done:
            continue
        plain, seconds = evaluate(run_dir)
        tta, tta_seconds = evaluate(run_dir, "--tta")
        peer = ddddocr_accuracy(run_dir)
        row = {"run": str(run_dir.resolve()), "commit": commit(ROOT), "model": plain["model"], "count": plain["count"],
               "correct": plain["correct"], "whole_string_accuracy": f"{plain['whole_string_accuracy']:.4f}",
               "seconds": f"{seconds:.1f}", "tta_correct": tta["correct"],
               "tta_whole_string_accuracy": f"{tta['whole_string_accuracy']:.4f}", "tta_seconds": f"{tta_seconds:.1f}",
               "ddddocr_correct": peer["correct"],
               "ddddocr_whole_string_accuracy": f"{peer['whole_string_accuracy']:.4f}"}
        append_row(table, FIELDS, row)
        print(f"{run_dir}: {row['whole_string_accuracy']} plain, {row['tta_whole_string_accuracy']} with --tta, "
              f"{row['ddddocr_whole_string_accuracy']} ddddocr ({row['count']} held out)", flush=True)


if __name__ == "__main__":
    main()
