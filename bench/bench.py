"""Benchmark on real captchas against the pretrained OCR ddddocr: accuracy, training and prediction speed.

    python bench/bench.py [--mode cpu|gpu] [--sets henan_4digit lzu_5digit synthetic] [--learning-curve]
                          [--shared ../shared/data] [--out bench/results]

For each set it trains with train.py on the train split, scores the held-out split with
evaluate.py, reads the same held-out images with ddddocr (case-insensitively), and times
predict.py against ddddocr on the whole folder, each as a whole process, in the same run.
Every stage keeps its result under --out and a rerun skips the stages already done, so an
interrupted benchmark loses at most the stage it was in. Needs `pip install ddddocr==1.6.1`.
"""
import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

SYNTH_CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SETS = {  # folders relative to --shared; labels_clean scores where the published labels are noisy
    "henan_4digit": {"dir": "henan_4digit", "labels": "henan_4digit/labels.csv",
                     "labels_clean": "henan_4digit/labels_clean.csv", "folder": "henan_4digit/OCR_Dataset",
                     "length": 4, "epochs": {"cpu": 12}},
    "lzu_5digit": {"dir": "lzu_5digit/right", "folder": "lzu_5digit/right", "length": 5, "epochs": {"cpu": 10}},
    # The classic setting: 4 characters of 0-9A-Z at 128x64, drawn by data.py synth.
    "synthetic": {"synth": 10_000, "length": 4, "image_size": [64, 128], "epochs": {"cpu": 10}},
}
LEARNING_CURVE = (250, 500, 1000, 2000)
CURVE_STEPS = 800  # training steps for each learning-curve point (at least train.epochs' worth)


def python(script, *args, log, stdout=None):
    """Runs one of the project's scripts as its own process -> wall-clock seconds. Its stderr goes
    to log, and its stdout too unless given a file of its own."""
    start = time.perf_counter()
    with open(log, "w") as err, open(stdout, "w") if stdout else contextlib.nullcontext(err) as out:
        result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], stdout=out, stderr=err,
                                cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise SystemExit(f"{script} failed ({result.returncode}); see {log}:\n{Path(log).read_text()[-2000:]}")
    return seconds


def stage(path, compute):
    """The result kept at path, or compute() it and keep it there."""
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_atomically(path, json.dumps(result, indent=2))
    return result


def train(spec, shared, out, mode, *settings):
    run_dir, log = out / "run", out / "train.log"
    args = ["--config", ROOT / "bench" / f"{mode}.yaml", "--run-dir", run_dir,
            "--set", f"data.dir={spec['data_dir']}", "--set", f"data.length={spec['length']}",
            "--set", f"data.labels={shared / spec['labels'] if spec.get('labels') else 'null'}"]
    if "image_size" in spec:
        args += ["--set", f"data.image_size={spec['image_size']}"]
    if mode in spec["epochs"]:
        args += ["--set", f"train.epochs={spec['epochs'][mode]}"]
    for setting in settings:
        args += ["--set", setting]
    if (run_dir / "model.keras").exists():
        raise SystemExit(f"{run_dir} was trained, but its timing was not kept: remove it to train it again")
    seconds = python("train.py", *args, log=log)
    with open(run_dir / "history.csv") as f:
        epochs = len(list(csv.DictReader(f)))
    metadata = json.loads((run_dir / "metadata.json").read_text())
    trained = metadata["train_images"]
    return {"train_seconds": round(seconds, 1), "train_images": trained, "epochs_run": epochs,
            "epoch_chosen": metadata["epoch"], "train_images_per_second": round(trained * epochs / seconds, 1)}


def timing_model(shared, out):
    """-> (run directory, its ONNX export): a model at the default 50x120 input to time reading with,
    trained one epoch on 64 henan_4digit captchas, as speed does not depend on the weights."""
    spec = dict(SETS["henan_4digit"], data_dir=shared / "henan_4digit")
    out.mkdir(parents=True, exist_ok=True)
    stage(out / "train.json", lambda: train(spec, shared, out, "cpu", "data.max_train_images=64", "train.epochs=1"))
    stage(out / "export_onnx.json", lambda: {"seconds": round(python(
        "export.py", "--model", out / "run", "--format", "onnx", log=out / "export_onnx.log"), 1)})
    return out / "run", out / "run" / "export" / "model.onnx"


def on_this_machine(measure):
    """measure()'s result, with what it ran on: the commit, the CPU, and the load average before and
    after it, for how busy the machine was."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    before = os.getloadavg()
    result = measure()
    return {**result, "machine": {"commit": commit.stdout.strip(), "cpu": cpu, "cores": os.cpu_count(),
                                  "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": before,
                                  "load_after": os.getloadavg()}}


def evaluate(run_dir, out, labels=None, name="evaluate"):
    args = ["--model", run_dir, "--json", "--errors", out / f"{name}_errors.csv"]
    python("evaluate.py", *args, *(["--labels", labels] if labels else []), log=out / f"{name}.log",
           stdout=out / f"{name}_report.json")
    report = json.loads((out / f"{name}_report.json").read_text())
    return {"whole_string_accuracy": report["whole_string_accuracy"], "count": report["count"],
            "correct": report["correct"], "suspected_label_errors": report["suspected_label_errors"]["count"]}


def held_out(run_dir, labels=None):
    """The run's held-out images, labelled by the split's list or by labels."""
    root = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dir"])
    split, _ = data.read_labels_csv(run_dir / "test_split.csv", root)
    if labels:
        table, _ = data.read_labels_csv(labels, root)
        split = {name: table[name] for name in split}
    return root, split


def ddddocr_accuracy(run_dir, labels=None):
    import ddddocr

    root, split = held_out(run_dir, labels)
    ocr = ddddocr.DdddOcr(show_ad=False)
    right = sum(ocr.classification((root / name).read_bytes()).lower() == label.strip().lower()
                for name, label in split.items())
    return {"whole_string_accuracy": right / len(split), "count": len(split), "correct": right}


def speed(run_dir, folder, out, models):
    """Whole-process images/s of predict.py (one entry per model file) and ddddocr on the same folder."""
    images = len(data.find_images(folder))
    for path in data.find_images(folder):  # the page cache holds the folder for every reader alike
        path.read_bytes()
    seconds = {"ddddocr": python("bench/ddddocr_read.py", folder, "--output", out / "ddddocr.csv",
                                 log=out / "ddddocr_read.log")}
    for name, model in models.items():
        seconds[name] = python("predict.py", "--model", model, folder, "--output", out / f"predict_{name}.csv",
                               "--overwrite", log=out / f"predict_{name}.log")
    rates = {name: round(images / s, 1) for name, s in seconds.items()}
    return {"images": images, "images_per_second": rates,
            "ratio_to_ddddocr": {name: round(rate / rates["ddddocr"], 2) for name, rate in rates.items()}}


def label_noise(run_dir, out, published, clean):
    """Of the held-out images whose published label is wrong: how many the model reads right,
    and how many evaluate.py flags as suspected label errors (and how many flags are false)."""
    root, noisy = held_out(run_dir, published)
    _, truth = held_out(run_dir, clean)
    wrong = {name for name in noisy if noisy[name] != truth[name]}
    with open(out / "evaluate_published_errors.csv") as f:
        rows = list(csv.DictReader(f))
    predicted = {row["path"]: row["prediction"] for row in rows}
    flagged = {row["path"] for row in rows if row["suspected_label_error"] == "yes"}
    read_right = sum(predicted.get(name, noisy[name]) == truth[name] for name in wrong)
    return {"held_out_wrong_labels": len(wrong), "read_right": read_right, "flagged": len(flagged & wrong),
            "false_flags": len(flagged - wrong)}


def bench_set(name, spec, shared, out, mode):
    out.mkdir(parents=True, exist_ok=True)
    if "synth" in spec:
        spec["data_dir"] = out / "images"
        if not (out / "images").exists():
            data.synthesize(out / "images.partial", spec["synth"], spec["length"], SYNTH_CHARSET,
                            spec["image_size"], seed=0)
            os.replace(out / "images.partial", out / "images")
        folder = spec["data_dir"]
    else:
        spec["data_dir"], folder = shared / spec["dir"], shared / spec["folder"]
    result = {"set": name, **stage(out / "train.json", lambda: train(spec, shared, out, mode))}
    run_dir = out / "run"
    clean = shared / spec["labels_clean"] if spec.get("labels_clean") else None
    result["ours"] = stage(out / "ours.json", lambda: evaluate(run_dir, out, clean))
    result["ddddocr"] = stage(out / "ddddocr.json", lambda: ddddocr_accuracy(run_dir, clean))
    if clean:
        result["ours_published_labels"] = stage(out / "ours_published.json", lambda: evaluate(
            run_dir, out, shared / spec["labels"], "evaluate_published"))
        result["label_noise"] = stage(out / "label_noise.json", lambda: label_noise(
            run_dir, out, shared / spec["labels"], clean))
    models = {"keras": run_dir}
    for form in ("onnx", "tflite"):
        models[form] = run_dir / "export" / f"model.{form}"
        result[f"export_{form}"] = stage(out / f"export_{form}.json", lambda: {"seconds": round(python(
            "export.py", "--model", run_dir, "--format", form, log=out / f"export_{form}.log"), 1)})
    result["speed"] = stage(out / "speed.json", lambda: speed(run_dir, folder, out, models))
    return result


def learning_curve(spec, shared, out, mode, full):
    points = []
    for count in LEARNING_CURVE:
        steps_per_epoch = max(1, count // 32)
        epochs = max(spec["epochs"].get(mode, 12), -(-CURVE_STEPS // steps_per_epoch))
        where = out / f"n{count}"
        where.mkdir(parents=True, exist_ok=True)
        # Epochs of a few steps each are too short to judge a plateau by: the held-out split
        # still picks the best epoch, but patience spans the whole run.
        trained = stage(where / "train.json", lambda: train(spec, shared, where, mode, f"data.max_train_images={count}",
                                                            f"train.epochs={epochs}", f"train.patience={epochs}"))
        scored = stage(where / "ours.json", lambda: evaluate(where / "run", where, shared / spec["labels_clean"]))
        points.append({"train_images": count, "epochs_run": trained["epochs_run"],
                       "whole_string_accuracy": scored["whole_string_accuracy"]})
    if full:  # the "all images" point is henan_4digit's own row, when this run benchmarks it
        points.append({"train_images": full["train_images"], "epochs_run": full["epochs_run"],
                       "whole_string_accuracy": full["ours"]["whole_string_accuracy"]})
    return points


def table(results, curve):
    percent = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    lines = ["| set | ours | ddddocr | epoch chosen / run | training time | training images/s | "
             "predict images/s: ours / ddddocr (ratio) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        rates, ratio = r["speed"]["images_per_second"], r["speed"]["ratio_to_ddddocr"]
        others = "".join(f"; {fmt} {rates[fmt]} ({ratio[fmt]}x)" for fmt in rates if fmt not in ("keras", "ddddocr"))
        lines.append(f"| {r['set']} | {percent(r['ours']['whole_string_accuracy'])} ({r['ours']['correct']}/"
                     f"{r['ours']['count']}) | {percent(r['ddddocr']['whole_string_accuracy'])} | "
                     f"{r['epoch_chosen']} / {r['epochs_run']} | {r['train_seconds'] / 60:.0f} min | "
                     f"{r['train_images_per_second']} | {rates['keras']} / {rates['ddddocr']} "
                     f"({ratio['keras']}x){others} |")
    for r in results:
        if "label_noise" in r:
            n = r["label_noise"]
            lines.append(f"\n{r['set']}: against the published labels ours scores "
                         f"{percent(r['ours_published_labels']['whole_string_accuracy'])}. Of the "
                         f"{n['held_out_wrong_labels']} held-out images whose published label is wrong, it reads "
                         f"{n['read_right']} right; evaluate.py flags {n['flagged']} of them as suspected label "
                         f"errors, with {n['false_flags']} false flags.")
    if curve:
        lines.append("\nlearning curve (henan_4digit, scored against the clean labels):\n\n"
                     "| training images | epochs run | whole-string accuracy |\n|---|---|---|")
        lines += [f"| {p['train_images']} | {p['epochs_run']} | {percent(p['whole_string_accuracy'])} |"
                  for p in curve]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--learning-curve", action="store_true", help="also train henan_4digit on subsets")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    out = args.out / args.mode
    results = [bench_set(name, dict(SETS[name]), args.shared.resolve(), out / name, args.mode) for name in args.sets]
    curve = None
    if args.learning_curve:
        henan = next((r for r in results if r["set"] == "henan_4digit"), None)
        curve = learning_curve(dict(SETS["henan_4digit"], data_dir=args.shared.resolve() / "henan_4digit"),
                               args.shared.resolve(), out / "henan_4digit_curve", args.mode, henan)
    summary = table(results, curve)
    print(summary)
    data.write_atomically(out / "results.json", json.dumps({"results": results, "learning_curve": curve}, indent=2))
    data.write_atomically(out / "results.md", summary + "\n")


if __name__ == "__main__":
    main()
