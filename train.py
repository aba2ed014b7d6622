"""Train a captcha recogniser on a folder of labelled images.

    python train.py [--config config.yaml] [--set section.key=value ...] [--run-dir DIR]

Killed or interrupted, the same command resumes from the last completed epoch.
"""
import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import string
import sys
from pathlib import Path

import numpy as np

import atomic
import augment
import data
import run
import synth
from cli import UserError, import_keras, run_main, warn
from config import DEFAULTS_PATH, flatten, load_config, shipped
from model import (HEAD_VERSION, ImageNetUnavailable, build_model, copy_weights, head_layers, load_model,
                   preprocessing_for, resolve_precision, save_model, with_precision)
from training import (MONITOR, SELECTION, Batches, HeldOutAccuracy, History, ResumableEarlyStopping,
                      TimeEstimate, completed_epochs, data_parallel, epoch_arrays, read_history, trim_history, with_pseudo_labels)

keras = import_keras()
# The quick start's own set (data.py draws it where data.dir is the shipped default) trains at the size it is
# drawn at, for about two minutes on a laptop's CPU, and from random weights where ImageNet's cannot be had:
# pretraining on drawn captchas teaches nothing for a set the same generator draws. Keys the user set keep
# the user's values.
QUICK_START = {"data.image_size": [32, 80], "train.epochs": 2, "train.min_steps": 0, "model.weights_fallback": "none"}


# What shortens each stage, as its time estimate says.
TRAINING = ("training", "train.epochs, train.min_steps or data.image_size")
PRETRAINING = ("pretraining on synthetic captchas", "model.synthetic_epochs or model.synthetic_images")
# model.synthetic_scope=machine's one start for every set: the charsets and lengths most sites use, at the
# input auto gives them (a column of the backbone's map per character and one more).
SHARED_START = {"name": "0-9a-zA-Z, 4 to 6 characters", "charset": string.digits + string.ascii_letters,
                "lengths": [4, 6]}
SHARED_START["image_size"] = [48, data.width_for_characters(SHARED_START["lengths"][1])]


def train(cfg, run_dir=None, extra_callbacks=(), stage=TRAINING):
    """Trains, saves and returns the run directory. extra_callbacks run first after every epoch,
    before the held-out split is scored (the benchmarks add diagnostics there)."""
    state = start_run(cfg, run_dir)
    model = starting_model(state)
    fit_rounds(state, model, extra_callbacks, stage)
    return finish_run(state, model)


# ---------------------------------------------------------------- start the run

def start_run(cfg, run_dir):
    """Reads and checks everything a run needs before it writes anything, then takes and fills its
    folder -> the run's state: its config, folder, data, devices and starting point."""
    cfg = resolved(quick_start(cfg))
    d, m = cfg["data"], cfg["model"]
    # First: TensorFlow's strategies must exist before anything else runs on a device.
    scope, replicas, (process, processes), feeds_share = data_parallel(cfg["train"]["distribute"])
    if processes > 1:
        if run_dir is None:
            raise UserError("training on several machines needs --run-dir, the same on each of them")
        if process:  # the first process writes the run; the others keep their own files beside it
            run_dir = Path(f"{run_dir}.worker_{process}")
    run_dir, _ = run.choose_run_dir(cfg, run_dir)
    source = continued_run(m)
    dataset = data.load_dataset(cfg, source["charset"] if source else None)
    weights = m["weights"]
    if weights == "imagenet":
        weights = imagenet_or_fallback(m, dataset)
    if weights == "synthetic":
        source = continued_run({**m, "weights": str(pretrained_on_synthetic(cfg, dataset))})
    unlabelled = data.load_unlabelled(cfg, dataset) if d["unlabelled"] else None
    run.lock(run_dir)
    # Again, under the lock: another process may have started this run, or even finished it, meanwhile.
    run_dir, resuming = run.choose_run_dir(cfg, run_dir)
    if resuming:
        run.check_same_split(run_dir, dataset)
    else:
        run.clear_untrained(run_dir)
    run.write_start(run_dir, cfg, dataset)
    print(f"{'resuming' if resuming else 'run'}: {run_dir}")
    return {"cfg": cfg, "run_dir": run_dir, "dataset": dataset, "unlabelled": unlabelled, "source": source,
            "weights": weights, "scope": scope, "replicas": replicas, "process": process,
            "feeds": (process, processes) if feeds_share else (0, 1)}


def quick_start(cfg):
    """cfg, with the QUICK_START settings where data.dir is the quick start's set and the key is left at its
    shipped default."""
    if not data.is_quick_start_set(cfg["data"]["dir"]):
        return cfg
    cfg, defaults = copy.deepcopy(cfg), flatten(shipped())
    for key, value in QUICK_START.items():
        section, name = key.split(".")
        if cfg[section][name] == defaults[key]:
            cfg[section][name] = value
    return cfg


def resolved(cfg):
    """The config with paths made absolute, as saved in the run directory."""
    cfg = copy.deepcopy(cfg)
    cfg["data"]["dir"] = os.path.abspath(cfg["data"]["dir"])
    for key in ("labels", "unlabelled"):
        if cfg["data"][key]:
            cfg["data"][key] = os.path.abspath(cfg["data"][key])
    cfg["data"]["cache_dir"] = os.path.abspath(os.path.expanduser(cfg["data"]["cache_dir"]))
    if cfg["model"]["weights"] not in ("imagenet", "none", "synthetic"):
        cfg["model"]["weights"] = os.path.abspath(cfg["model"]["weights"])
    return cfg


def continued_run(m):
    """The finished run that model.weights names, by its directory or its .keras file ->
    {path, charset, lengths, head, image_size}; None when model.weights is imagenet, none, synthetic or a backbone
    weights file."""
    if m["weights"] in ("imagenet", "none", "synthetic"):
        return None
    path = Path(m["weights"])
    if not (path.is_dir() or path.suffix == ".keras"):
        return None
    try:
        metadata = run.read_metadata(path)
    except UserError as e:
        raise UserError(f"model.weights: {e}") from None
    if metadata["backbone"] != m["backbone"]:
        raise UserError(f"model.weights: {path} was trained with model.backbone={metadata['backbone']}, not "
                        f"{m['backbone']}; set model.backbone={metadata['backbone']} to continue from it")
    return {"path": str(run.model_path(path)), "charset": metadata["charset"], "lengths": run.model_lengths(metadata),
            "head": metadata.get("head", "pooled"),  # runs saved before model.head had pooled heads
            "image_size": metadata["image_size"]}


def imagenet_or_fallback(m, dataset):
    """model.weights=imagenet -> `imagenet` where the weights are in ~/.keras/models or can be downloaded
    there (building the backbone once fetches them), else model.weights_fallback, with a warning."""
    try:
        build_model(dataset["image_size"], 1, 2, m["backbone"], "imagenet")
        return "imagenet"
    except ImageNetUnavailable as e:
        if m["weights_fallback"] == "stop":
            raise UserError(f"model.weights=imagenet: {e}") from None
        fallback, why = m["weights_fallback"], ""
        missing = fallback == "synthetic" and m["synthetic_scope"] == "set" and synth.undrawable(dataset["charset"])
        if missing:
            fallback, why = "none", f", as the synthetic captchas cannot draw {missing!r}"
        start = f"synthetic captchas of {synthetic_drawing(m)}" if fallback == "synthetic" else "random weights"
        print(f"WARNING: {e}. Starting from {start} instead{why} (model.weights_fallback: synthetic, none or stop).",
              file=sys.stderr)
        return fallback


def synthetic_drawing(m):
    """What model.weights=synthetic's captchas are drawn in, as messages say it."""
    return "the set's charset and lengths" if m["synthetic_scope"] == "set" else SHARED_START["name"]


def pretrained_on_synthetic(cfg, dataset):
    """model.weights=synthetic -> a finished run on model.synthetic_images captchas that synth.draw_set
    draws in model.synthetic_style, trained from random initialisation with the other settings of cfg:
    the start a few hundred labels lack without ImageNet weights (docs/design.md). With
    model.synthetic_scope=set they are drawn in the set's charset, lengths and input size; with `machine`,
    in SHARED_START's, so that one start serves every set (its backbone, with new heads). Kept under
    data.cache_dir and reused for the same drawing settings and, for a fitted style, training images,
    trained with the train.* settings of the run that first needed it; killed, it resumes like any run."""
    d, m = cfg["data"], cfg["model"]
    shared = m["synthetic_scope"] == "machine"
    if shared:
        charset, lengths, (height, width), seed = (SHARED_START["charset"], SHARED_START["lengths"],
                                                   SHARED_START["image_size"], 0)
        drawn = f"{synthetic_drawing(m)}, the start shared by every set in {d['cache_dir']}"
    else:
        charset, lengths, (height, width), seed = dataset["charset"], d["length"], dataset["image_size"], d["seed"]
        drawn = synthetic_drawing(m)
        missing = synth.undrawable(charset)
        if missing:
            raise UserError(f"model.weights=synthetic: the synthetic captchas cannot draw {missing!r}, which the "
                            f"charset holds (their font has no glyph for it); set model.weights to imagenet, none, "
                            f"a weights file, or model.synthetic_scope to machine with model.synthetic_style=captcha")
    fitted = m["synthetic_style"] == "fitted"
    what = {"charset": charset, "length": list(lengths), "image_size": [height, width],
            "backbone": m["backbone"], "head": m["head"], "head_version": HEAD_VERSION,
            "images": m["synthetic_images"], "epochs": m["synthetic_epochs"], "seed": seed,
            "style": m["synthetic_style"], "style_version": synth.STYLE_VERSION,
            "fitted_to": sorted(dataset["digests"][i] for i in dataset["train"]) if fitted else None}
    folder = Path(d["cache_dir"]) / "synthetic" / hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    run_dir, images = folder / "run", folder / "images"
    if not images.exists():
        try:  # a backbone that cannot take the drawing's size says so before anything is written
            build_model((height, width), 1, 2, m["backbone"], "none")
        except UserError as e:
            remedy = "a larger data.image_size" if m["synthetic_scope"] == "set" else "model.synthetic_scope=set"
            raise UserError(f"model.weights=synthetic (model.synthetic_scope={m['synthetic_scope']}): {e}; choose "
                            f"another model.backbone or {remedy}") from None
    run.lock(folder, "then run again: the start it trains is kept for this run too")  # sets may share it
    if (run_dir / run.MODEL_FILE).exists():
        print(f"model.weights=synthetic: continuing from {run_dir}, trained earlier on {m['synthetic_images']} "
              f"synthetic captchas of {drawn}")
        return run_dir
    if not images.exists():
        if fitted:
            style, size = data.fitted_style([dataset["items"][i][0] for i in dataset["train"]], charset,
                                            lengths, seed)
        else:  # drawn 64 pixels high, the captcha package's scale, in the input's shape
            style, size = synth.Style(), (64, round(64 * width / height))
        with atomic.replacing(images) as partial:
            synth.draw_set(partial, m["synthetic_images"], lengths, charset, size, seed, style,
                           shorten="model.synthetic_images")
    synthetic = copy.deepcopy(cfg)
    synthetic["data"].update(dir=str(images), labels=None, label_pattern=None, charset=charset, length=list(lengths),
                             case="sensitive", image_size=[height, width], seed=seed, max_train_images=0,
                             unlabelled=None)
    synthetic["model"]["weights"] = "none"
    synthetic["train"].update(epochs=m["synthetic_epochs"], int8_export=False)  # a start, never read as it is
    print(f"model.weights=synthetic: first training on {m['synthetic_images']} synthetic captchas of {drawn}, "
          f"{m['synthetic_epochs']} epochs, in {run_dir}")
    return train(synthetic, run_dir, stage=PRETRAINING)


# ---------------------------------------------------------------- build the starting model

def starting_model(state):
    """The model training starts from: built under the run's devices, its weights ImageNet's, random,
    a weights file's, or a finished run's (every layer where the charset and lengths are the same,
    else the backbone's, with new heads)."""
    cfg, dataset, source = state["cfg"], state["dataset"], state["source"]
    m, t = cfg["model"], cfg["train"]
    policy = resolve_precision(t["precision"])
    keras.utils.set_random_seed(cfg["data"]["seed"])
    keras.mixed_precision.set_global_policy(policy)
    charset, lengths = dataset["charset"], dataset["lengths"]
    classes = data.class_count(charset, lengths)  # with a range of lengths, one more: the blank
    with state["scope"]():
        model, initialisation = build_model(dataset["image_size"], lengths[1], classes, m["backbone"],
                                            "none" if source else state["weights"], m["dropout"], m["head"])
        state["heads"] = False
        if source:
            previous = load_model(source["path"])[0]
            state["heads"] = (source["charset"], source["lengths"], source["head"], head_layers(previous)) == (
                charset, lengths, m["head"], head_layers(model))
            copy_weights(previous, model, state["heads"])
            initialisation = f"{source['path']} ({'every layer' if state['heads'] else 'backbone only'})"
            reason = changed(source, charset, lengths, m["head"], dataset["image_size"])
            print(f"continuing from {source['path']}: " + ("every weight, heads included" if state["heads"] else
                  f"the backbone's weights, with new heads, as the {reason}"))
    state.update(policy=policy, initialisation=initialisation, classes=classes,
                 batch_size=t["batch_size"] * state["replicas"],
                 learning_rate=t["learning_rate"] * math.sqrt(state["replicas"]))  # the square-root scaling rule
    size = dataset["image_size"]
    print(f"model: {m['backbone']} from {initialisation} weights, {policy} precision, input {size[0]}x{size[1]}, "
          f"{model.count_params():,} parameters; batch {state['batch_size']} over {state['replicas']} "
          f"device{'s' if state['replicas'] > 1 else ''}")
    return model


def changed(source, charset, lengths, head, image_size):
    """What differs between the run continued from and this one, as a message says it."""
    if source["head"] != head:
        return f"model.head changed ({source['head']} -> {head}; model.head={source['head']} would keep every weight)"
    if source["charset"] != charset:
        return f"charset changed ({source['charset']!r} -> {charset!r})"
    if source["lengths"] != lengths:
        return f"length changed ({source['lengths']} -> {lengths})"
    if source["image_size"] != image_size:
        return (f"input size changed ({'x'.join(map(str, source['image_size']))} -> "
                f"{'x'.join(map(str, image_size))}), and with it which layers the heads need")
    return f"model.head={head} builds other layers than when that run was trained"


# ---------------------------------------------------------------- fit the rounds

def fit_rounds(state, model, extra_callbacks, stage):
    """Fits the model on the labelled images, then, with data.unlabelled, once more for each self-training
    round with the captchas it reads surely. Early stopping spans the rounds; its best weights end in model."""
    cfg, run_dir, dataset = state["cfg"], state["run_dir"], state["dataset"]
    d, t = cfg["data"], cfg["train"]
    batch_size, lengths = state["batch_size"], dataset["lengths"]
    early_stopping = ResumableEarlyStopping(run_dir, monitor=SELECTION, mode="max", patience=t["patience"],
                                            restore_best_weights=True)
    shape = {"image_size": dataset["image_size"], "charset": dataset["charset"], "length": lengths[1],
             "min_length": lengths[0]}
    sample = np.random.default_rng(d["seed"]).permutation(dataset["train"])[:t["batchnorm_images"]]
    held_out = HeldOutAccuracy(model, dataset["images"], dataset["test"],
                               [dataset["items"][i][1] for i in dataset["test"]], shape,
                               dataset["images"][np.sort(sample)], batch_size)
    state["batchnorm_images"] = len(sample)
    # Keras's TensorBoard callback writes through tf.summary: a JAX or PyTorch machine may have
    # tensorboard without TensorFlow.
    tensorboard = importlib.util.find_spec("tensorflow") is not None
    state["tensorboard"] = tensorboard
    rounds = t["self_training_rounds"] if state["unlabelled"] and t["self_training"] == "rounds" else 0
    # Consistency training reads the unlabelled images in every batch, from the first step, in one round.
    by_consistency = bool(state["unlabelled"]) and t["self_training"] == "consistency"
    unlabelled = state["unlabelled"]["images"] if by_consistency and len(state["unlabelled"]["images"]) else None
    if by_consistency and unlabelled is None:
        warn("train.self_training=consistency: no unlabelled captchas are left to learn from; training on the "
             "labels alone")
    progress_path = run_dir / "rounds.json"  # rounds completed, and the epochs they ran
    progress = (json.loads(progress_path.read_text()) if progress_path.exists()
                else {"rounds": 0, "epochs": 0, "steps": 0})
    if state["heads"] and "start" not in progress:
        # A continued run never hands back a model worse than the one it started from: that model
        # is scored like an epoch, and an epoch must read the held-out split better to replace it.
        logs = held_out.scores()
        early_stopping.start_from(logs[SELECTION], model.get_weights())
        progress["start"] = logs[MONITOR]
        atomic.write_text(progress_path, json.dumps(progress))
        print(f"the model continued from reads {logs[MONITOR]:.4f} of the held-out split whole: "
              "an epoch must read it better to replace it")
    if progress["rounds"]:  # killed after a round had ended: go on from the best weights so far
        early_stopping.restore()
        model.set_weights(early_stopping.best_weights)
    images, targets, train_indices = dataset["images"], dataset["targets"], dataset["train"]
    for round_ in range(progress["rounds"], rounds + 1):
        if round_:  # self-training: the unlabelled images read surely enough join the labelled ones
            images, targets, train_indices = with_pseudo_labels(model, dataset, state["unlabelled"], shape, round_,
                                                                t["pseudo_label_confidence"], run_dir)
            # A round that read nothing new would train on the same labels again; one already under way goes on.
            if len(train_indices) == len(dataset["train"]) and not completed_epochs(run_dir / f"backup_round_{round_}"):
                print(f"self-training ends: round {round_} found no unlabelled captcha read with confidence >= "
                      f"{t['pseudo_label_confidence']} (train.pseudo_label_confidence)")
                rounds = round_ - 1
                break
        # Every epoch passes over the images once, or more where a small set would make it shorter
        # than train.min_steps / train.epochs steps: so the held-out split is scored train.epochs
        # times, however small the set.
        steps = max(1, len(train_indices) // batch_size, math.ceil(t["min_steps"] / t["epochs"]))
        if state["feeds"] == (0, 1) and not isinstance(images, np.memmap):  # in memory, one process feeding
            x, y = epoch_arrays(images, train_indices, targets, state["classes"], batch_size, d["seed"] + round_, steps,
                                unlabelled)
            inputs = {"x": x, "y": y, "batch_size": batch_size, "shuffle": True}
        else:  # streamed from the memory-mapped cache, or each process feeding its share of every batch
            inputs = {"x": Batches(images, train_indices, targets, state["classes"], batch_size, d["seed"] + round_,
                                   steps, state["feeds"], unlabelled)}
        with state["scope"]():
            # Each round fits a model object of its own over the same layers: fit would otherwise resume at
            # the epoch a previous round's BackupAndRestore restored.
            if unlabelled is None:
                round_model = augment.training_model(model, augment.distortion(t, d["seed"] + round_))
            else:
                round_model = augment.consistency_model(model, t, d["seed"])
            schedule = keras.optimizers.schedules.CosineDecay(state["learning_rate"], decay_steps=t["epochs"] * steps)
            optimizer = (keras.optimizers.AdamW(schedule, weight_decay=t["weight_decay"]) if t["weight_decay"]
                         else keras.optimizers.Adam(schedule))
            consistency = [] if unlabelled is None else [augment.ConsistencyLoss(t["pseudo_label_confidence"])]
            round_model.compile(
                optimizer=optimizer,
                loss=[keras.losses.CategoricalCrossentropy(label_smoothing=t["label_smoothing"])] * lengths[1]
                + consistency,
                # With consistency training, `consistency_sure`: the share of unlabelled captchas read surely.
                metrics=[["accuracy"]] * lengths[1]
                + [[augment.SureShare(t["pseudo_label_confidence"])]] * len(consistency),
            )
        backup = run_dir / ("backup" if round_ == 0 else f"backup_round_{round_}")
        to_go = steps * (progress["epochs"] + t["epochs"] - (completed_epochs(backup) or progress["epochs"]))
        callbacks = [
            TimeEstimate(f"{stage[0]}{f' (self-training round {round_})' if round_ else ''}", to_go, steps, stage[1],
                         stops_early=round_ == 0),
            *extra_callbacks,
            held_out,
            # Both before the backup: a kill between them and it repeats an epoch, never skips one.
            early_stopping,
            History(str(run_dir / "history.csv"), append=True),
            keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True, delete_checkpoint=False),
        ]
        if tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
        trim_history(run_dir / "history.csv", completed_epochs(backup) or progress["epochs"])
        # A round restarts the learning rate, so it reads worse at first: patience would end it there.
        early_stopping.patience = t["patience"] if round_ == 0 else math.inf
        round_model.fit(**inputs, initial_epoch=progress["epochs"], epochs=progress["epochs"] + t["epochs"],
                        callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
        epochs_run = len(read_history(run_dir))
        progress = {**progress, "rounds": round_ + 1, "epochs": epochs_run,
                    "steps": progress["steps"] + (epochs_run - progress["epochs"]) * steps}
        atomic.write_text(progress_path, json.dumps(progress))
    state.update(progress=progress, rounds=rounds, chosen=early_stopping.best_epoch + 1)


# ---------------------------------------------------------------- finish the run

def finish_run(state, model):
    """Saves the chosen model with its metadata, clears the resume state, and makes the int8 export."""
    cfg, run_dir, dataset, progress = state["cfg"], state["run_dir"], state["dataset"], state["progress"]
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    chosen, source, unlabelled = state["chosen"], state["source"], state["unlabelled"]
    # chosen 0: the model continued from, which no epoch read better
    held_out_accuracy = progress["start"] if chosen == 0 else float(
        next(row for row in read_history(run_dir) if int(row["epoch"]) == chosen)[MONITOR])
    shortest, longest = dataset["lengths"]
    metadata = {  # length: the number of heads, the longest label; min_length: the shortest
        "charset": dataset["charset"], "length": longest, "min_length": shortest, "image_size": dataset["image_size"],
        "case": d["case"], "label_pattern": d["label_pattern"], "backbone": m["backbone"], "head": m["head"],
        "initialisation": state["initialisation"],
        "preprocessing": f"{preprocessing_for(m['backbone'])} scaling of RGB uint8 pixels, inside the model; "
                         f"images resized to image_size by data.decode_image (bilinear)",
        "decode_version": data.DECODE_VERSION, "trained_precision": state["policy"], "epoch": chosen,
        "train_images": len(dataset["train"]), "held_out_images": len(dataset["test"]), "steps": progress["steps"],
        "held_out_whole_string_accuracy": held_out_accuracy, "batchnorm": (
            f"statistics recomputed over {state['batchnorm_images']} training images" if state["batchnorm_images"]
            else "moving averages"),
        "continued_from": source and {"model": source["path"], "heads": "kept" if state["heads"] else "new"},
        "self_training": unlabelled and {"unlabelled": d["unlabelled"], "method": t["self_training"],
                                         "rounds": state["rounds"],
                                         "pseudo_label_confidence": t["pseudo_label_confidence"]},
        "keras": keras.__version__, "backend": keras.backend.backend(),
    }
    save_model(with_precision(model, "float32"), run_dir / run.MODEL_FILE, metadata)
    atomic.write_text(run_dir / "metadata.json", json.dumps(metadata, indent=2))
    for backup in (run_dir / "backup", *run_dir.glob("backup_round_*")):
        shutil.rmtree(backup, ignore_errors=True)
    for resume_state in ("early_stopping.json", "best.weights.npz", "rounds.json"):
        (run_dir / resume_state).unlink(missing_ok=True)
    print((f"chose epoch {chosen} of {progress['epochs']}" if chosen else
           f"kept the model continued from: none of the {progress['epochs']} epochs read the held-out split better")
          + f": held-out whole-string accuracy {held_out_accuracy:.4f}")
    print(f"saved in {run_dir}: {run.MODEL_FILE} (model and metadata), metadata.json, config.yaml, test_split.csv, "
          f"history.csv{', pseudo_labels.csv' if state['rounds'] else ''}"
          f"{', tensorboard/' if state['tensorboard'] else ''}")
    if t["int8_export"] and not state["process"]:
        int8_export(run_dir)
    return run_dir


def int8_export(run_dir):
    """train.int8_export: export.py --int8 into the run, which the run is then read through where it reads
    the held-out split as well as the Keras model (run.file_to_read). The run is saved already: a
    failure here costs only the export, and says how to retry it."""
    retry = f"python export.py --model {run_dir} --format onnx --int8 --overwrite"
    try:
        import exporting
    except ImportError as e:  # e.g. the JAX backend without TensorFlow, which the exporters need
        print(f"note: no int8 export, as it needs TensorFlow ({e}); to make it where TensorFlow is installed: {retry}",
              file=sys.stderr)
        return
    out = exporting.default_out(run_dir, "onnx", int8=True)
    print(f"int8 export (train.int8_export): {out}, then its held-out check")
    try:
        exporting.write_export(run_dir, "onnx", out, int8=True)
    except Exception as e:  # noqa: BLE001  (an exporter's failure must not read as a failed training)
        print(f"WARNING: the int8 export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the "
              f"run is complete and read by its Keras model. To retry: {retry}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULTS_PATH), help="YAML config (default: the shipped config.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--run-dir", help="where to write the run (default: a new folder under runs/)")
    args = parser.parse_args(argv)
    run_dir = train(load_config(args.config, args.set), args.run_dir)
    print(f"\ndone: {run_dir}\nnext:\n  python evaluate.py --model {run_dir}\n"
          f"  python predict.py --model {run_dir} FOLDER_OF_CAPTCHAS")
    return 0


if __name__ == "__main__":
    run_main(main, interrupted="interrupted: run the same command again to resume from the last completed epoch")
