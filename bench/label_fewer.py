"""How many labels a recogniser needs, with and without unlabelled captchas: learning curves on
the real sets, self-training, and continuing a run with more labels.

    python bench/label_fewer.py [--sets henan_4digit lzu_5digit] [--labels 250 1000] [--unlabelled 100 250]
                                [--steps N] [--continue-with 100] [--shared ../shared/data] [--out bench/results]
                                [--set SECTION.KEY=VALUE ...]

Every run trains with train.py and the CPU benchmark config on the set's usual split, with
data.max_train_images labelled training images, and is scored with evaluate.py on the whole usual
held-out split (henan_4digit against its clean labels). --labels: those labels alone (the learning
curve). --unlabelled: those labels, and the rest of the training split as data.unlabelled (the
set's folder itself: train.py leaves its held-out and labelled training images out), with the
pseudo-labels' own accuracy. --continue-with K: the run of the first --unlabelled count,
continued with K more labels and no unlabelled images, against a fresh start on as many labels.
--steps sets train.min_steps (default: the shipped one); --set, any train.py setting for every run
(e.g. model.weights=RUN, to start from a run pretrained on synthetic captchas). Every stage keeps its
result under --out.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import atomic  # noqa: E402
import data  # noqa: E402
from bench import ROOT, SETS, add_settings_argument, evaluate, stage, train  # noqa: E402


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def point(name, spec, shared, where, labels, *settings):
    """Trains and scores one run -> its figures."""
    trained = stage(where / "train.json", lambda: train(spec, shared, where, "cpu", f"data.max_train_images={labels}",
                                                        *settings))
    clean = shared / spec["labels_clean"] if spec.get("labels_clean") else None
    scored = stage(where / "ours.json", lambda: evaluate(where / "run", where, clean))
    rows = history(where / "run")
    return {"set": name, "labels": labels, "settings": list(settings), "epochs_run": trained["epochs_run"],
            "epoch_chosen": trained["epoch_chosen"], "minutes": round(trained["train_seconds"] / 60, 1),
            "steps": json.loads((where / "run" / "metadata.json").read_text())["steps"],
            "first_epoch": {"loss": float(rows[0]["loss"]), "held_out_accuracy": float(rows[0]["val_whole_string_accuracy"])},
            "whole_string_accuracy": scored["whole_string_accuracy"], "correct": scored["correct"],
            "count": scored["count"]}


def pseudo_label_accuracy(run_dir, truth):
    """Per self-training round: pseudo-labels taken, and how many agree with the true labels."""
    with open(run_dir / "pseudo_labels.csv") as f:
        rows = list(csv.DictReader(f))
    rounds = sorted({int(row["round"]) for row in rows})
    return [{"round": r, "taken": sum(int(row["round"]) == r for row in rows),
             "right": sum(int(row["round"]) == r and truth.get(row["filename"]) == row["label"] for row in rows)}
            for r in rounds]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=("henan_4digit", "lzu_5digit"), default=["henan_4digit"])
    parser.add_argument("--labels", nargs="*", type=int, default=[250, 1000])
    parser.add_argument("--unlabelled", nargs="*", type=int, default=[250])
    parser.add_argument("--steps", type=int, help="train.min_steps for every run")
    parser.add_argument("--continue-with", type=int, default=100)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    add_settings_argument(parser, "every run")
    args = parser.parse_args()
    shared, results = args.shared.resolve(), []
    settings = ([f"train.min_steps={args.steps}"] if args.steps else []) + args.set
    suffix = f"_s{args.steps}" if args.steps else ""
    for name in args.sets:
        spec = dict(SETS[name], data_dir=shared / SETS[name]["dir"])
        out = args.out / "cpu" / "label_fewer" / name
        labels_csv = shared / (spec.get("labels_clean") or spec["labels"]) if spec.get("labels") else None
        # Keyed as pseudo_labels.csv names its files: relative to the folder, with forward slashes.
        truth = {path.relative_to(spec["data_dir"]).as_posix(): label for path, label in data.labelled_files(
            spec["data_dir"], labels_csv, None, "sensitive", (spec["length"],) * 2, None)[0]}
        for count in args.labels:
            results.append({"kind": "labels alone", **point(name, spec, shared, out / f"n{count}{suffix}", count, *settings)})
        for count in args.unlabelled:
            where = out / f"n{count}_unlabelled{suffix}"
            result = {"kind": "with unlabelled", **point(name, spec, shared, where, count, *settings,
                                                         f"data.unlabelled={spec['data_dir']}")}
            result["pseudo_labels"] = pseudo_label_accuracy(where / "run", truth)
            results.append(result)
        if args.unlabelled and args.continue_with:
            count, start = args.unlabelled[0] + args.continue_with, out / f"n{args.unlabelled[0]}_unlabelled{suffix}"
            results.append({"kind": f"continued from the {args.unlabelled[0]}-label run", **point(
                name, spec, shared, out / f"n{count}_continued{suffix}", count, *settings, f"model.weights={start / 'run'}")})
            results.append({"kind": "fresh start", **point(name, spec, shared, out / f"n{count}{suffix}", count, *settings)})
    percent = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    lines = ["| set | labelled training images | how | steps | training minutes | first epoch: loss, held-out | "
             "whole-string accuracy | pseudo-labels taken (right) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        pseudo = "; ".join(f"round {p['round']}: {p['taken']} ({percent(p['right'] / p['taken']) if p['taken'] else '-'})"
                           for p in r.get("pseudo_labels", []))
        lines.append(f"| {r['set']} | {r['labels']} | {r['kind']} | {r['steps']} | {r['minutes']} | "
                     f"{r['first_epoch']['loss']:.3f}, {percent(r['first_epoch']['held_out_accuracy'])} | "
                     f"{percent(r['whole_string_accuracy'])} ({r['correct']}/{r['count']}) | {pseudo} |")
    summary = "\n".join(lines)
    print(summary)
    out = args.out / "cpu" / "label_fewer"
    atomic.write_text(out / f"results{suffix}.json", json.dumps(results, indent=2))
    atomic.write_text(out / f"results{suffix}.md", summary + "\n")


if __name__ == "__main__":
    main()
