"""Small labelled sets: held-out accuracy after every epoch against wall time, before and after
precise BatchNorm statistics and the other small-set defaults, against ddddocr.

    python bench/small_sets.py [--sets standin_4x20 standin_5x19] [--variants before after]
                               [--out bench/results] [--unlabelled N] [--set KEY=VALUE ...]

The sets stand in for the small, hard sets users bring (1,000-2,000 labelled captchas), drawn by
data.py synth: 1,781 captchas of 4 characters from a 20-character lowercase-and-digit charset at
130x52, and 1,040 of 5 characters from a 19-character charset at 200x50 (10% held out). Each
variant trains with train.py and the CPU benchmark config (bench/cpu.yaml), patience spanning the
whole run so that every epoch is seen; `before` trains through bench/bn_lag.py, which also scores
each epoch's weights with recomputed statistics. --unlabelled N draws N more captchas of each
stand-in's kind (another seed) and self-trains on them as data.unlabelled, reporting how many
pseudo-labels each round took and how many are right. Every stage keeps its result under --out, and a
rerun skips what is done.
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import atomic  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import synth  # noqa: E402
from bench import ROOT, add_settings_argument, ddddocr_accuracy, evaluate, python, stage  # noqa: E402
from label_fewer import pseudo_label_accuracy  # noqa: E402
from run import read_export_metadata  # noqa: E402

STANDINS = {
    "standin_4x20": {"count": 1781, "length": 4, "charset": "2345678abcdefgkmnpxy", "size": (52, 130), "seed": 11,
                     "epochs": 20},
    "standin_5x19": {"count": 1040, "length": 5, "charset": "23456789ABCDEFHKMNP", "size": (50, 200), "seed": 12,
                     "epochs": 25},
}
VARIANTS = {  # settings on top of bench/cpu.yaml
    # The defaults before this work: Keras's moving BatchNorm averages, no augmentation, no step minimum.
    "before": ["train.batchnorm_images=0", "train.min_steps=0",
               *(f"train.augment_{name}=0" for name in ("shift", "rotate", "scale", "warp", "blur", "noise"))],
    "after": [],  # the shipped defaults
}


def images(name, out, unlabelled=0):
    """The stand-in's labelled captchas, or with unlabelled=N as many more of its kind (another seed),
    for self-training; drawn captchas' file names hold their labels, to score the pseudo-labels."""
    spec = STANDINS[name]
    folder = out / (f"unlabelled_{unlabelled}" if unlabelled else "images")
    if not folder.exists():
        partial = folder.with_name(folder.name + ".partial")
        synth.draw_set(partial, unlabelled or spec["count"], config.parse_length(spec["length"]), spec["charset"],
                       spec["size"], spec["seed"] + (1000 if unlabelled else 0))
        os.replace(partial, folder)
    return folder


def train(name, variant, folder, out, extra=()):
    spec, run_dir = STANDINS[name], out / "run"
    settings = ["--config", ROOT / "bench" / "cpu.yaml", "--set", f"data.dir={folder}", "--set",
                f"data.length={spec['length']}", "--set", f"train.epochs={spec['epochs']}", "--set",
                f"train.patience={spec['epochs']}", *[a for s in (*VARIANTS[variant], *extra) for a in ("--set", s)]]
    if variant == "before":
        seconds = python("bench/bn_lag.py", "--name", "three_ways", "--run-dir", run_dir,
                         *[a for a in settings[2:]], log=out / "train.log")
    else:
        seconds = python("train.py", "--run-dir", run_dir, *settings, log=out / "train.log")
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    curve, minutes = [], 0.0
    for row in rows:
        minutes += (float(row["epoch_seconds"]) - float(row.get("diagnostic_seconds") or 0)) / 60
        curve.append({"epoch": int(row["epoch"]) + 1, "minutes": round(minutes, 2),
                      "held_out_whole_string_accuracy": float(row["val_whole_string_accuracy"])})
    metadata = json.loads((run_dir / "metadata.json").read_text())
    return {"train_seconds": round(seconds, 1), "train_images": metadata["train_images"],
            "held_out_images": metadata["held_out_images"], "epoch_chosen": metadata["epoch"],
            "recorded_held_out_accuracy": metadata["held_out_whole_string_accuracy"], "curve": curve}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["set"] for r in results})
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        for r in (r for r in results if r["set"] == name):
            axis.plot([p["minutes"] for p in r["curve"]], [100 * p["held_out_whole_string_accuracy"]
                                                          for p in r["curve"]], marker=".", label=r["variant"])
        ddddocr = next(r["ddddocr"] for r in results if r["set"] == name)
        axis.axhline(100 * ddddocr["whole_string_accuracy"], linestyle="--", color="grey", label="ddddocr")
        axis.set(title=name, xlabel="training minutes", ylabel="held-out whole-string %", ylim=(0, 100))
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(STANDINS), default=list(STANDINS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--unlabelled", type=int, default=0, metavar="N",
                        help="self-training: N more captchas of each stand-in's kind as data.unlabelled")
    add_settings_argument(parser, "every run, after the variant's")
    args = parser.parse_args()
    out, results = args.out / "cpu" / "small_sets", []
    for name in args.sets:
        folder, settings, suffix = images(name, out / name), list(args.set), ""
        if args.unlabelled:
            unlabelled = images(name, out / name, args.unlabelled)
            settings.append(f"data.unlabelled={unlabelled}")
            suffix = f"_unlabelled{args.unlabelled}"
            lengths = (STANDINS[name]["length"],) * 2
            truth = {path.name: label for path, label in data.labelled_files(
                unlabelled, None, None, "sensitive", lengths, STANDINS[name]["charset"])[0]}
        for variant in args.variants:
            where = out / name / (variant + suffix)
            where.mkdir(parents=True, exist_ok=True)
            result = {"set": name, "variant": variant + suffix, **stage(
                where / "train.json", lambda: train(name, variant, folder, where, settings))}
            if args.unlabelled:
                result["pseudo_labels"] = pseudo_label_accuracy(where / "run", truth)
            result["ours"] = stage(where / "ours.json", lambda: evaluate(where / "run", where))
            if result["ours"].get("model", "").endswith(".onnx"):  # the run's int8 export: its own recorded score
                check = read_export_metadata(result["ours"]["model"])["held_out_check"]
                result["recorded_held_out_accuracy"] = check["whole_string_accuracy"]
            result["evaluate_agrees"] = result["ours"]["whole_string_accuracy"] == result["recorded_held_out_accuracy"]
            result["ddddocr"] = stage(out / name / "ddddocr.json", lambda: ddddocr_accuracy(where / "run"))
            results.append(result)
    percent = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = ["| set | variant | held-out whole-string after each epoch (cumulative training minutes) | chosen epoch: "
             "recorded = evaluate.py | ddddocr |", "|---|---|---|---|---|"]
    for r in results:
        curve = ", ".join(f"{p['epoch']}: {percent(p['held_out_whole_string_accuracy'])} ({p['minutes']:.0f})"
                          for p in r["curve"])
        lines.append(f"| {r['set']} | {r['variant']} | {curve} | {r['epoch_chosen']}: "
                     f"{percent(r['recorded_held_out_accuracy'])} {'=' if r['evaluate_agrees'] else '!='} "
                     f"{percent(r['ours']['whole_string_accuracy'])} | {percent(r['ddddocr']['whole_string_accuracy'])} |")
    lines += [f"\n{r['set']}, {r['variant']}, self-training round {p['round']}: {p['taken']} pseudo-labels taken, "
              f"{p['right']} of them right" for r in results for p in r.get("pseudo_labels", [])]
    summary = "\n".join(lines)
    print(summary)
    atomic.write_text(out / "results.json", json.dumps(results, indent=2))
    atomic.write_text(out / "results.md", summary + "\n")
    plot(results, out / "time_to_accuracy.png")


if __name__ == "__main__":
    main()
