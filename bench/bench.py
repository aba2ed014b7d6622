"""Benchmark on real captchas against the pretrained OCR ddddocr: accuracy, training and prediction speed.

    python bench/bench.py [--mode cpu|gpu] [--sets henan_4digit lzu_5digit synthetic mixed_4_5digit synthetic_4to6]
                          [--shared ../shared/data] [--out bench/results] [--set KEY=VALUE ...]
                          [--exports onnx onnx_int8 tflite]

For each set it trains with train.py on the train split, scores the held-out split with
evaluate.py, reads the same held-out images with ddddocr (case-insensitively), and times
predict.py against ddddocr on the whole folder, each as a whole process, in the same run.
Every stage keeps its result under --out and a rerun skips the stages already done, so an
interrupted benchmark loses at most the stage it was in. Needs `pip install ddddocr==1.6.1`.
Learning curves, with and without unlabelled captchas, are bench/label_fewer.py's.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import atomic  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import synth  # noqa: E402

SYNTH_CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SETS = {  # folders relative to --shared; labels_clean scores where the published labels are noisy
    "henan_4digit": {"dir": "henan_4digit", "labels": "henan_4digit/labels.csv",
                     "labels_clean": "henan_4digit/labels_clean.csv", "folder": "henan_4digit/OCR_Dataset",
                     "length": 4, "epochs": {"cpu": 3}},
    "lzu_5digit": {"dir": "lzu_5digit/right", "folder": "lzu_5digit/right", "length": 5, "epochs": {"cpu": 4}},
    # The classic setting: 4 characters of 0-9A-Z at 128x64, drawn by data.py synth.
    "synthetic": {"synth": 10_000, "length": 4, "image_size": [64, 128], "epochs": {"cpu": 10}},
    # Captchas of varying length: the two real sets pooled into one folder (links under --out) with one
    # labels CSV, trained as one 4-5-digit set; and 4 to 6 characters of 0-9A-Z at 160x64, drawn by data.py synth.
    "mixed_4_5digit": {"pool": ("henan_4digit", "lzu_5digit"), "length": "4-5", "epochs": {"cpu": 3}},
    "synthetic_4to6": {"synth": 10_000, "length": "4-6", "image_size": [64, 160], "epochs": {"cpu": 10}},
}


# --exports: name -> (file in RUN_DIR/export/, export.py's arguments)
EXPORTS = {"onnx": ("model.onnx", ["--format", "onnx"]), "onnx_int8": ("model.int8.onnx", ["--format", "onnx", "--int8"]),
           "tflite": ("model.tflite", ["--format", "tflite"])}


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
    atomic.write_text(path, json.dumps(result, indent=2))
    return result


def train(spec, shared, out, mode, *settings):
    run_dir, log = out / "run", out / "train.log"
    out.mkdir(parents=True, exist_ok=True)
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
    seconds = earlier_seconds(run_dir) + python("train.py", *args, log=log)
    with open(run_dir / "history.csv") as f:
        epochs = len(list(csv.DictReader(f)))
    metadata = json.loads((run_dir / "metadata.json").read_text())
    trained = metadata["train_images"]
    return {"train_seconds": round(seconds, 1), "train_images": trained, "epochs_run": epochs,
            "epoch_chosen": metadata["epoch"], "train_images_per_second": round(trained * epochs / seconds, 1)}


def add_settings_argument(parser, applies_to):
    """--set SECTION.KEY=VALUE, repeatable: train.py settings for applies_to."""
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"a train.py setting for {applies_to}, e.g. model.backbone=MobileNet")


def earlier_seconds(run_dir):
    """Seconds of the epochs that an interrupted run finished before train.py resumes it (0 for a new run)."""
    from train import completed_epochs  # here: train imports Keras

    done = completed_epochs(run_dir / "backup")
    if not done:
        return 0.0
    with open(run_dir / "history.csv", newline="") as f:
        return sum(float(row["epoch_seconds"]) for row in list(csv.DictReader(f))[:done])


def timing_model(shared, out, settings=()):
    """-> (run directory, {"onnx": its ONNX export, "onnx_int8": its 8-bit one}): a model at the default
    input to time reading with,
    trained one epoch (two steps) on 64 henan_4digit captchas, as speed does not depend on the weights;
    settings: train.py's, e.g. another model.backbone."""
    spec = dict(SETS["henan_4digit"], data_dir=shared / "henan_4digit")
    out.mkdir(parents=True, exist_ok=True)
    stage(out / "train.json", lambda: train(spec, shared, out, "cpu", "data.max_train_images=64", "train.epochs=1",
                                            "train.min_steps=0", *settings))
    return out / "run", {name: exported(out / "run", out, name) for name in ("onnx", "onnx_int8")}


def exported(run_dir, out, name):
    """The export `name` of EXPORTS of run_dir, made once (timed under out)."""
    file, arguments = EXPORTS[name]
    stage(out / f"export_{name}.json", lambda: {"seconds": round(python(
        "export.py", "--model", run_dir, *arguments, log=out / f"export_{name}.log"), 1)})
    return run_dir / "export" / file


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
    return {"model": report["model"], "whole_string_accuracy": report["whole_string_accuracy"], "count": report["count"],
            "correct": report["correct"], "suspected_label_errors": report["suspected_label_errors"]["count"],
            "accuracy_by_length": report["accuracy_by_length"], "length_confusion": report["length_confusion"]}


def held_out(run_dir, labels=None):
    """The run's held-out images, labelled by the split's list or by labels."""
    root = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dir"])
    split, _ = data.read_labels_csv(run_dir / "test_split.csv", root)
    if labels:
        table, _ = data.read_labels_csv(labels, root)
        split = {name: table[name] for name in split}
    return root, split


def export_accuracy(run_dir, model, labels=None):
    """An export's whole-string accuracy on the run's held-out split (evaluate.py finds a run's own split
    only from the run directory or its .keras file)."""
    from recognizer import Recognizer

    root, split = held_out(run_dir, labels)
    names = sorted(split)
    readings = Recognizer.load(model).predict([root / name for name in names])
    right = sum(reading.text == split[name] for reading, name in zip(readings, names))
    return {"whole_string_accuracy": right / len(names), "count": len(names), "correct": right}


def ddddocr_accuracy(run_dir, labels=None, by_source=False):
    import ddddocr

    root, split = held_out(run_dir, labels)
    ocr = ddddocr.DdddOcr(show_ad=False)
    right = {name for name, label in split.items()
             if ocr.classification((root / name).read_bytes()).lower() == label.strip().lower()}
    result = {"whole_string_accuracy": len(right) / len(split), "count": len(split), "correct": len(right)}
    return {**result, "by_source": accuracy_by_source(split, right)} if by_source else result


def accuracy_by_source(names, right):
    """Held-out names SOURCE/..., and those read right -> whole-string accuracy of each source."""
    sources = {}
    for name in names:
        sources.setdefault(name.split("/")[0], []).append(name in right)
    return {source: {"whole_string_accuracy": sum(hits) / len(hits), "correct": sum(hits), "count": len(hits)}
            for source, hits in sorted(sources.items())}


def ours_by_source(run_dir, out, labels):
    """Our accuracy on each source of a pooled set, from evaluate.py's errors: every held-out image not
    listed there was read right; a skipped one is not scored, as in evaluate.py."""
    _, split = held_out(run_dir, labels)
    with open(out / "evaluate_errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    skipped = {row["path"] for row in rows if row["reason"]}
    wrong = {row["path"] for row in rows}
    return accuracy_by_source([name for name in split if name not in skipped], set(split) - wrong)


def pool(sources, shared, out):
    """Links every image of the sets named in sources into out/images/SET/..., and writes one labels CSV
    for them all: labels.csv with each set's published labels (its CSV, or its file names), and
    labels_clean.csv with its clean labels where it has them. -> the folder of links."""
    folder = out / "images"
    if (out / "labels_clean.csv").exists():
        return folder
    tables = {"labels": [], "labels_clean": []}
    for source in sources:
        spec, root = SETS[source], shared / SETS[source]["dir"]
        if spec.get("labels"):
            published, _ = data.read_labels_csv(shared / spec["labels"], root)
        else:
            items, _ = data.labelled_files(root, None, None, "sensitive", (spec["length"],) * 2, None)
            published = {path.relative_to(root).as_posix(): label for path, label in items}
        clean = data.read_labels_csv(shared / spec["labels_clean"], root)[0] if spec.get("labels_clean") else published
        for name in published:
            link = folder / source / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(root / name)
        for kind, table in (("labels", published), ("labels_clean", clean)):
            tables[kind] += [(f"{source}/{name}", label) for name, label in sorted(table.items())]
    for kind, rows in tables.items():
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([("filename", "label"), *rows])
        atomic.write_text(out / f"{kind}.csv", text.getvalue())
    return folder


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


def bench_set(name, spec, shared, out, mode, settings=(), exports=("onnx", "onnx_int8", "tflite")):
    out.mkdir(parents=True, exist_ok=True)
    if "synth" in spec:
        spec["data_dir"] = out / "images"
        if not (out / "images").exists():
            synth.draw_set(out / "images.partial", spec["synth"], config.parse_length(spec["length"]), SYNTH_CHARSET,
                           spec["image_size"], seed=0)
            os.replace(out / "images.partial", out / "images")
        folder = spec["data_dir"]
    elif "pool" in spec:  # absolute paths: shared / an absolute path is that path
        spec["data_dir"] = folder = pool(spec["pool"], shared, out)
        spec["labels"], spec["labels_clean"] = out / "labels.csv", out / "labels_clean.csv"
    else:
        spec["data_dir"], folder = shared / spec["dir"], shared / spec["folder"]
    result = {"set": name, **stage(out / "train.json", lambda: train(spec, shared, out, mode, *settings))}
    run_dir = out / "run"
    clean = shared / spec["labels_clean"] if spec.get("labels_clean") else None
    result["ours"] = stage(out / "ours.json", lambda: evaluate(run_dir, out, clean))
    result["ddddocr"] = stage(out / "ddddocr.json", lambda: ddddocr_accuracy(run_dir, clean, "pool" in spec))
    if "pool" in spec:
        result["ours_by_source"] = stage(out / "ours_by_source.json", lambda: ours_by_source(run_dir, out, clean))
    if clean:
        result["ours_published_labels"] = stage(out / "ours_published.json", lambda: evaluate(
            run_dir, out, shared / spec["labels"], "evaluate_published"))
        result["label_noise"] = stage(out / "label_noise.json", lambda: label_noise(
            run_dir, out, shared / spec["labels"], clean))
    models = {"keras": run_dir, **{name: exported(run_dir, out, name) for name in exports}}
    if "onnx_int8" in exports:  # the one export whose readings may differ from the Keras model's
        result["ours_onnx_int8"] = stage(out / "ours_onnx_int8.json",
                                         lambda: export_accuracy(run_dir, models["onnx_int8"], clean))
    result["speed"] = stage(out / "speed.json", lambda: speed(run_dir, folder, out, models))
    return result


def table(results):
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
        if len(r["ours"].get("accuracy_by_length", [])) > 1:  # results kept before length ranges have none
            by_length = ", ".join(f"{row['length']} characters {percent(row['whole_string_accuracy'])} "
                                  f"({row['correct']}/{row['count']})" for row in r["ours"]["accuracy_by_length"])
            misread = sum(c["count"] for c in r["ours"]["length_confusion"] if c["true"] != c["read"])
            lines.append(f"\n{r['set']}: ours by true length: {by_length}; {misread} read at another length.")
        if "ours_onnx_int8" in r:
            int8 = r["ours_onnx_int8"]
            lines.append(f"{r['set']}: the ONNX int8 export reads {percent(int8['whole_string_accuracy'])} "
                         f"({int8['correct']}/{int8['count']}) of the held-out split.")
        if "ours_by_source" in r:
            lines.append(f"{r['set']} by source, ours / ddddocr: " + ", ".join(
                f"{source} {percent(v['whole_string_accuracy'])} ({v['correct']}/{v['count']}) / "
                f"{percent(r['ddddocr']['by_source'][source]['whole_string_accuracy'])}"
                for source, v in r["ours_by_source"].items()) + ".")
    for r in results:
        if "label_noise" in r:
            n = r["label_noise"]
            lines.append(f"\n{r['set']}: against the published labels ours scores "
                         f"{percent(r['ours_published_labels']['whole_string_accuracy'])}. Of the "
                         f"{n['held_out_wrong_labels']} held-out images whose published label is wrong, it reads "
                         f"{n['read_right']} right; evaluate.py flags {n['flagged']} of them as suspected label "
                         f"errors, with {n['false_flags']} false flags.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    add_settings_argument(parser, "every set")
    parser.add_argument("--exports", nargs="*", choices=list(EXPORTS), default=list(EXPORTS),
                        help="the exports to time beside the Keras model (each needs TensorFlow)")
    args = parser.parse_args()
    out = args.out.resolve() / args.mode  # absolute: a pooled set's labels are joined onto --shared
    results = [bench_set(name, dict(SETS[name]), args.shared.resolve(), out / name, args.mode, args.set, args.exports)
               for name in args.sets]
    summary = table(results)
    print(summary)
    atomic.write_text(out / "results.json", json.dumps({"results": results}, indent=2))
    atomic.write_text(out / "results.md", summary + "\n")


if __name__ == "__main__":
    main()
