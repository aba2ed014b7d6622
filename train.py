"""Train a captcha recogniser on a folder of labelled images.

    python train.py [--config config.yaml] [--set section.key=value ...] [--run-dir DIR]

Killed or interrupted, the same command resumes from the last completed epoch.
"""
import argparse
import collections
import contextlib
import csv
import datetime
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageFilter
from tqdm import tqdm

from config import DEFAULTS_PATH, UserError, length_range, load_config, quiet_backend_startup, read_yaml, run

quiet_backend_startup()
import keras  # noqa: E402

import data  # noqa: E402
from predict import Recognizer, keras_batch_function  # noqa: E402
from data import MODEL_FILE, model_path, read_metadata  # noqa: E402
from model import (ImageNetUnavailable, build_model, copy_weights, load_model, preprocessing_for,  # noqa: E402
                   recompute_batchnorm, resolve_precision, save_model, with_precision)

MONITOR = "val_whole_string_accuracy"
SELECTION = "val_selection_score"  # what early stopping maximises: see HeldOutAccuracy
LOCK_FILE = ".lock"
held_locks = {}  # run directory -> its open lock file: a lock lasts as long as the process that took it
FEW_OF_A_LENGTH = 20  # fewer images of a length than this get a warning: too few to learn it, or to score it


class Batches(keras.utils.PyDataset):
    """Shuffled training batches gathered from the decoded uint8 array, with one-hot targets per head,
    randomly distorted where `augmentation` asks (see distort).

    Every batch is full, so that it splits evenly over data-parallel replicas. With several
    processes feeding one global batch (JAX across hosts), each takes its own share of it."""

    def __init__(self, images, indices, targets, num_classes, batch_size, seed, steps, process=(0, 1),
                 augmentation=None, **kwargs):
        super().__init__(**kwargs)
        index, count = process
        self.images, self.targets, self.num_classes = images, targets, num_classes
        self.batch_size = batch_size // count
        self.indices = np.asarray(indices)[index::count]
        self.seed, self.epoch, self.augmentation, self.steps = seed, 0, augmentation, steps
        self.order = self.shuffled()

    def shuffled(self):
        """The epoch's order: as many passes over the images, each shuffled anew, as its steps need."""
        rng = np.random.default_rng([self.seed, self.epoch])
        passes = -(-self.steps * self.batch_size // len(self.indices))
        return np.concatenate([rng.permutation(self.indices) for _ in range(passes)])

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        # Sorted, so that a memory-mapped array is read in file order.
        batch = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        x = self.images[batch]
        if self.augmentation:  # a generator of its own per batch: batches are made in parallel threads
            x = distort(x, np.random.default_rng([self.seed, self.epoch, i]), **self.augmentation)
        one_hot = np.eye(self.num_classes, dtype=np.float32)[self.targets[batch]]
        return x, tuple(one_hot[:, position] for position in range(one_hot.shape[1]))

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self.shuffled()


def distort(pixels, rng, shift=0.0, rotate=0.0, scale=0.0, warp=0.0, blur=0.0, noise=0.0):
    """Random changes of the kind one site's captchas differ by: each image is moved by up to
    `shift` of its size, turned by up to `rotate` degrees, scaled by up to `scale`, warped by moving
    the inner corners of a 2x4 mesh by up to `warp` of a cell, blurred with a radius up to `blur`
    pixels, and given Gaussian noise of up to `noise` x 255. Uncovered pixels take the border's colour.
    Pillow holds the GIL in its transforms, so the batch's threads share one core: one transform an
    image, and the rest done for the whole batch at once."""
    count, height, width = pixels.shape[:3]
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    fills = np.median(border, axis=1).astype(int).tolist()
    rows, cols = 2, 4
    grid_x = np.linspace(0, width, cols + 1)[None, :].repeat(rows + 1, 0)
    grid_y = np.linspace(0, height, rows + 1)[:, None].repeat(cols + 1, 1)
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    boxes = [(round(grid_x[0, c]), round(grid_y[r, 0]), round(grid_x[0, c + 1]), round(grid_y[r + 1, 0]))
             for r, c in cells]
    inner = (slice(1, -1), slice(1, -1))  # the outline stays, so nothing leaves the frame
    out = np.empty(pixels.shape, np.float32)
    for k, image in enumerate(pixels):
        angle, zoom = np.radians(rng.uniform(-rotate, rotate)), 1 + rng.uniform(-scale, scale)
        dx, dy = rng.uniform(-shift, shift) * width, rng.uniform(-shift, shift) * height
        x, y = grid_x.copy(), grid_y.copy()
        if warp:
            x[inner] += rng.uniform(-warp, warp, x[inner].shape) * width / cols
            y[inner] += rng.uniform(-warp, warp, y[inner].shape) * height / rows
        # Each mesh cell of the output reads the quadrilateral that its warped corners come from
        # under the inverse of turn, zoom and move: the two in one resampling.
        cos, sin, cx, cy = np.cos(angle) / zoom, np.sin(angle) / zoom, width / 2, height / 2
        source_x = cos * (x - cx - dx) + sin * (y - cy - dy) + cx
        source_y = -sin * (x - cx - dx) + cos * (y - cy - dy) + cy
        corners = np.stack([source_x, source_y], axis=-1).tolist()
        mesh = [(box, (*corners[r][c], *corners[r + 1][c], *corners[r + 1][c + 1], *corners[r][c + 1]))
                for box, (r, c) in zip(boxes, cells)]
        picture = Image.fromarray(image).transform((width, height), Image.Transform.MESH, mesh,
                                                   Image.Resampling.BILINEAR, fillcolor=tuple(fills[k]))
        if blur:
            picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0, blur)))
        out[k] = picture
    if noise:
        out += rng.standard_normal(out.shape, dtype=np.float32) * (
            rng.uniform(0, noise, (count, 1, 1, 1)).astype(np.float32) * 255)
    return np.clip(out, 0, 255).astype(pixels.dtype)


class HeldOutAccuracy(keras.callbacks.Callback):
    """After every epoch, first recomputes the BatchNorm statistics on training images (where
    batchnorm_images is not 0), then scores the whole held-out split: whole-string and per-position
    accuracy. It reads the held-out images in evaluate.py's order and batches, through the same
    function, so that the score recorded for the chosen epoch is what evaluate.py reports."""

    def __init__(self, images, indices, targets, metadata, batchnorm_images, batch_size):
        super().__init__()
        self.images, self.indices, self.truth = images, indices, targets[indices]
        self.metadata, self.batchnorm_images, self.batch_size = metadata, batchnorm_images, batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs.update(self.scores())
        logs["epoch_seconds"] = round(time.perf_counter() - self.started, 1)

    def scores(self):
        """The model's held-out scores, after recomputing its BatchNorm statistics."""
        if len(self.batchnorm_images):
            recompute_batchnorm(self.model, self.batchnorm_images, self.batch_size)
        recognizer = Recognizer(keras_batch_function(self.model), self.metadata)
        chunks = [self.indices[i:i + 4096] for i in range(0, len(self.indices), 4096)]  # bounded memory
        # The texts read, encoded again: a position past the text's end counts as the blank, as in evaluate.py.
        charset, length = self.metadata["charset"], self.metadata["length"]
        predicted = np.concatenate([data.encode([r.text for r in recognizer.read(self.images[c])], charset, length)
                                    for c in chunks])
        whole, per_position = np.all(predicted == self.truth, axis=1), np.mean(predicted == self.truth, axis=0)
        # Early stopping keeps the epoch that reads the most captchas whole, and among equals the
        # one that reads the most characters: a small set's first epochs read none whole, yet learn.
        return {MONITOR: float(np.mean(whole)),
                **{f"val_char_{position}_accuracy": float(a) for position, a in enumerate(per_position, 1)},
                SELECTION: float(np.sum(whole) + np.mean(per_position))}


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose best score, patience count and best weights survive a restart, and
    carry over from one self-training round to the next: they are written to state_dir after
    every epoch and read back when training resumes. A new round starts its patience afresh."""

    def __init__(self, state_dir, **kwargs):
        super().__init__(**kwargs)
        self.state_path = Path(state_dir) / "early_stopping.json"
        self.weights_path = Path(state_dir) / "best.weights.npz"
        self.new_round = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.restore()
        if self.new_round:
            self.wait = 0

    def restore(self):
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
            with np.load(self.weights_path) as saved:
                self.best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def start_from(self, score, weights):
        """The weights training starts from, scoring `score`, are the best so far (as epoch -1): an
        epoch must score higher to replace them."""
        self.best, self.best_epoch, self.wait, self.best_weights = score, -1, 0, weights
        self.save(-1)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.save(epoch)

    def save(self, epoch):
        if self.best_epoch == epoch and self.best_weights is not None:
            partial = self.weights_path.with_suffix(".partial")
            with open(partial, "wb") as f:
                np.savez(f, *self.best_weights)
            os.replace(partial, self.weights_path)
        state = {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "epoch": epoch}
        data.write_atomically(self.state_path, json.dumps(state))


# ---------------------------------------------------------------- distribution

def data_parallel(distribute):
    """-> (function giving the scope to build and compile in, replicas, (this process, processes), whether each process
    feeds only its share of every batch), from each backend's own engine. TensorFlow: MirroredStrategy over every GPU in the box (or every CPU
    device if there is none), MultiWorkerMirroredStrategy across machines when TF_CONFIG describes
    a cluster. JAX: keras.distribution.DataParallel over every device, across hosts when the
    KERAS_DISTRIBUTION_* variables describe them."""
    if distribute == "none":
        return contextlib.nullcontext, 1, (0, 1), False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if "TF_CONFIG" in os.environ:
            strategy = multi_worker_strategy()
            cluster = json.loads(os.environ["TF_CONFIG"])
            workers = len(cluster["cluster"].get("worker", []))
            # TensorFlow splits every batch over the workers itself.
            return strategy.scope, strategy.num_replicas_in_sync, (cluster["task"]["index"], workers), False
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        return strategy.scope, strategy.num_replicas_in_sync, (0, 1), False
    if backend == "jax":
        import jax

        if int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")) > 1:
            keras.distribution.initialize()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        return contextlib.nullcontext, jax.device_count(), (jax.process_index(), jax.process_count()), True
    raise UserError(f"train.distribute=data_parallel needs the tensorflow or jax backend, not {backend}")


def multi_worker_strategy():
    """TensorFlow's MultiWorkerMirroredStrategy, with its reduce() fitted to two calls Keras 3.15's
    fit makes of it: averaging a sample batch over the workers to build the model (TensorFlow
    cannot reduce uint8 or nested values), and averaging each worker's scalar logs along axis 0."""
    import tensorflow as tf

    class Strategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def reduce_one(v):
                local = self.experimental_local_results(v)[0]
                if not local.dtype.is_floating:
                    return local  # only its shape and dtype are used
                return super(Strategy, self).reduce(reduce_op, v, None if local.shape.rank == 0 else axis)

            return tf.nest.map_structure(reduce_one, value)

    return Strategy()


# ---------------------------------------------------------------- run directory

def resolved(cfg):
    """The config with paths made absolute, as saved in the run directory."""
    cfg = json.loads(json.dumps(cfg))
    cfg["data"]["dir"] = os.path.abspath(cfg["data"]["dir"])
    for key in ("labels", "unlabelled"):
        if cfg["data"][key]:
            cfg["data"][key] = os.path.abspath(cfg["data"][key])
    cfg["data"]["cache_dir"] = os.path.abspath(os.path.expanduser(cfg["data"]["cache_dir"]))
    if cfg["model"]["weights"] not in ("imagenet", "none", "synthetic"):
        cfg["model"]["weights"] = os.path.abspath(cfg["model"]["weights"])
    return cfg


def choose_run_dir(cfg, run_dir):
    """-> (run directory, whether it resumes an interrupted run). Never reuses a finished run."""
    if run_dir is None:
        unfinished = [d for d in sorted(Path("runs").glob("*"), reverse=True)
                      if (d / "config.yaml").exists() and not (d / MODEL_FILE).exists()
                      and yaml.safe_load((d / "config.yaml").read_text()) == cfg]
        if unfinished:
            return unfinished[0], True
        run_dir = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker:
        raise UserError(f"--run-dir {run_dir}: {blocker} is a file, not a folder")
    if (run_dir / MODEL_FILE).exists():
        raise UserError(f"{run_dir} holds a finished run; choose another --run-dir")
    if (run_dir / "config.yaml").exists():
        before = yaml.safe_load((run_dir / "config.yaml").read_text())
        if before != cfg:
            changed = sorted(k for k in set(flat(before)) | set(flat(cfg)) if flat(before).get(k) != flat(cfg).get(k))
            raise UserError(f"{run_dir} holds an interrupted run with another config ({', '.join(changed)} differ): "
                            f"rerun it with its own config, or choose another --run-dir")
        return run_dir, True
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no run; choose another --run-dir")
    return run_dir, False


def lock_run_dir(run_dir):
    """Takes the run directory for this process, or raises UserError naming the process that
    holds it. The kernel drops a lock when its process ends, however it ends: the lock of a
    killed run never blocks its resume."""
    key = os.path.abspath(run_dir)
    if key in held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise UserError(f"another process (pid {pid}) is training into {run_dir}: wait for it to end, "
                        f"or choose another --run-dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    held_locks[key] = lock


def check_same_split(run_dir, dataset, resuming):
    """A resumed run must train and score on the split it started with: its early-stopping
    state and its history belong to that split."""
    path = run_dir / "split.json"
    if resuming and path.exists():
        before, now = json.loads(path.read_text()), dataset["split"]
        if before.get("digest_version", 1) != now["digest_version"]:
            raise UserError(f"{run_dir} was started by an older version of train.py, which told duplicate images "
                            f"apart another way, so its split cannot be rebuilt: choose another --run-dir to start "
                            f"afresh, or finish it with that version")
        if before["digest"] != now["digest"]:
            raise UserError(f"the data in {dataset['root']} have changed since {run_dir} started "
                            f"({before['train_images']} to train and {before['held_out_images']} held out then, "
                            f"{now['train_images']} and {now['held_out_images']} now): restore them to resume, "
                            f"or choose another --run-dir to start afresh")


def completed_epochs(backup_dir):
    """The epochs BackupAndRestore has saved, which it resumes after."""
    path = Path(backup_dir) / "training_metadata.json"
    return json.loads(path.read_text())["epoch"] if path.exists() else 0


def trim_history(path, epochs):
    """Drops history rows of epochs that will run again: a kill after an epoch's row was
    written, but before its backup, leaves one."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:1 + epochs]))


def flat(cfg):
    return {f"{s}.{k}": v for s, keys in cfg.items() for k, v in keys.items()}


# ---------------------------------------------------------------- data

def prepare_data(cfg, charset_hint=None):
    """Reads, checks and decodes the data set; prints a short report. Without data.charset, the
    charset is charset_hint (a continued run's) when every label fits it, else inferred."""
    d = cfg["data"]
    root, lengths = Path(d["dir"]), length_range(d["length"])
    if not root.exists() and d["dir"] == os.path.abspath(read_yaml(DEFAULTS_PATH)["data"]["dir"]):
        print(f"{root} does not exist: generating the default synthetic set of {data.SYNTH_COUNT} captchas "
              f"(set data.dir to train on your own)")
        partial = root.with_name(root.name + ".partial")
        size = data.SYNTH_SIZE if d["image_size"] == "auto" else d["image_size"]
        data.synthesize(partial, data.SYNTH_COUNT, d["length"], d["charset"] or data.SYNTH_CHARSET, size, d["seed"])
        os.replace(partial, root)
    items, notes = data.labelled_files(root, d["labels"], d["label_pattern"], d["case"], lengths, d["charset"],
                                       d["allow_outside_dir"])
    good, bad = data.split_by_label_problem(items, lengths, d["charset"])
    if bad:
        hint = ""
        if d["case"] == "sensitive" and d["charset"] and any(
                not data.label_problem(label.lower(), lengths, d["charset"])
                or not data.label_problem(label.upper(), lengths, d["charset"]) for _, label, _ in bad):
            hint = "; set data.case=lower or upper to fold the labels' case"
        source = d["labels"] or "file names"
        raise UserError(f"{len(bad)} of {len(items)} labels in {source} do not fit data.length={d['length']}"
                        f"{' and data.charset' if d['charset'] else ''}: {data.describe(bad, root)}{hint}")
    labels = [label for _, label in good]
    fits_hint = charset_hint is not None and set("".join(labels)) <= set(charset_hint)
    charset = d["charset"] or (charset_hint if fits_hint else data.infer_charset(labels))
    paths = [path for path, _ in good]
    image_size, aspect = (d["image_size"], None) if d["image_size"] != "auto" else data.auto_image_size(paths)
    images, digests, failures = data.load_images(paths, image_size, d["cache_dir"], desc=f"decoding {root}")
    valid = np.array([i for i in range(len(paths)) if i not in failures], dtype=np.int64)
    if len(valid) < 2:
        raise UserError(f"{root}: fewer than 2 readable images")
    if len({digests[i] for i in valid}) < 2:
        raise UserError(f"{root}: all {len(valid)} readable images are identical; at least two different ones are "
                        f"needed, one to train on and one to hold out")
    targets = data.encode(labels, charset, lengths[1])
    train_idx, test_idx = data.split_train_test([digests[i] for i in valid], d["test_fraction"], d["seed"],
                                                [len(good[i][1]) for i in valid])
    train_idx, test_idx = valid[train_idx], valid[test_idx]
    # The held-out split in evaluate.py's order, by file name, so that both read it in the same batches.
    test_idx = np.array(sorted(test_idx, key=lambda i: relative_name(good[i][0], root)), dtype=np.int64)
    if d["max_train_images"]:
        train_idx = np.sort(np.random.default_rng(d["seed"]).permutation(train_idx)[:d["max_train_images"]])

    charset_source = "" if d["charset"] else ", the continued run's" if fits_hint else ", inferred"
    print(f"data: {len(valid)} images from {root}, labels from {d['labels'] or 'file names'}; "
          f"charset {charset!r} ({len(charset)} characters{charset_source}), "
          f"length {d['length']}; {len(train_idx)} to train, {len(test_idx)} held out; input {image_size[0]}x"
          f"{image_size[1]}" + (f" (data.image_size auto: the images' median width:height is {aspect:.2f})"
                                if aspect else ""))
    if lengths[0] < lengths[1]:
        counts, held_out = (collections.Counter(len(good[i][1]) for i in indices) for indices in (valid, test_idx))
        print("  lengths: " + ", ".join(f"{n}: {counts[n]} ({held_out[n]} held out)"
                                        for n in range(lengths[0], lengths[1] + 1)))
        for n in range(lengths[0], lengths[1] + 1):
            if counts[n] < FEW_OF_A_LENGTH:
                print(f"  warning: only {counts[n]} images of length {n} ({held_out[n]} held out): too few to learn "
                      f"that length, or to score it")
    if failures:
        notes.append(data.unreadable_note(failures, paths, root))
    groups = {}
    for i in valid:
        groups.setdefault(digests[i], []).append(i)
    repeats = [g for g in groups.values() if len(g) > 1]
    if repeats:
        disagree = sum(len({good[i][1] for i in g}) > 1 for g in repeats)
        notes.append(f"{sum(len(g) - 1 for g in repeats)} duplicate images ({len(repeats)} groups, kept on one side "
                     f"of the split; {disagree} groups with disagreeing labels): "
                     f"{', '.join(data.shown_path(paths[i], root) for i in repeats[0])}")
    for note in notes:
        print(f"  note: {note}")
    fingerprint = hashlib.sha1()
    for side, indices in (("train", train_idx), ("held out", test_idx)):
        for i in indices:
            fingerprint.update(f"{side},{data.shown_path(paths[i], root)},{good[i][1]},{digests[i]}\n".encode())
    split = {"train_images": len(train_idx), "held_out_images": len(test_idx), "digest": fingerprint.hexdigest(),
             "digest_version": data.DIGEST_VERSION}
    return {"root": root, "items": good, "images": images, "image_size": image_size, "targets": targets,
            "charset": charset, "train": train_idx, "test": test_idx, "digests": digests, "split": split}


def read_unlabelled(cfg, dataset):
    """data.unlabelled's images, decoded like the labelled ones, less the held-out images, which are
    never pseudo-labelled, and the images training reads with their labels. (A labelled image left
    out by data.max_train_images may be pseudo-labelled: the benchmarks use that.)"""
    d = cfg["data"]
    root = Path(d["unlabelled"])
    if not root.is_dir():
        raise UserError(f"data.unlabelled: folder not found: {root}")
    try:
        paths = data.image_files(root)
    except UserError as e:
        raise UserError(f"data.unlabelled: {e}") from None
    images, digests, failures = data.load_images(paths, dataset["image_size"], d["cache_dir"],
                                                 desc=f"decoding {root}")
    labelled = {dataset["digests"][i] for i in (*dataset["train"], *dataset["test"])}
    keep = [i for i in range(len(paths)) if i not in failures and digests[i] not in labelled]
    print(f"unlabelled: {len(keep)} images from {root} for self-training")
    if failures:
        print(f"  note: {data.unreadable_note(failures, paths, root)}")
    if len(paths) - len(failures) > len(keep):
        print(f"  note: {len(paths) - len(failures) - len(keep)} are held-out or training images already, skipped")
    return {"root": root, "paths": [paths[i] for i in keep], "images": images[keep]}


def with_pseudo_labels(model, dataset, unlabelled, metadata, round_, threshold, run_dir):
    """Self-training: reads the unlabelled images with the best model so far, and takes the readings
    at or above threshold as labels, kept in pseudo_labels.csv. -> (images, targets, training
    indices) of the labelled training images and the pseudo-labelled ones. A resumed round reads
    its pseudo-labels back from the CSV, so that it goes on with the same ones."""
    path, fields = run_dir / "pseudo_labels.csv", ["filename", "label", "confidence", "round"]
    rows = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if int(row["round"]) <= round_]
    names = [relative_name(p, unlabelled["root"]) for p in unlabelled["paths"]]
    if not any(int(row["round"]) == round_ for row in rows):
        recognizer = Recognizer(keras_batch_function(model), metadata)
        readings = [reading for start in tqdm(range(0, len(names), 1024), desc=f"round {round_}: reading unlabelled",
                                              unit="chunk")
                    for reading in recognizer.read(unlabelled["images"][start:start + 1024])]
        rows += [{"filename": name, "label": r.text, "confidence": f"{r.confidence:.6f}", "round": round_}
                 for name, r in zip(names, readings) if r.confidence >= threshold]
        with open(path.with_suffix(".partial"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path.with_suffix(".partial"), path)
    position = {name: i for i, name in enumerate(names)}
    taken = [(position[row["filename"]], row["label"]) for row in rows if int(row["round"]) == round_]
    print(f"self-training round {round_}: {len(taken)} of {len(names)} unlabelled captchas read with confidence "
          f">= {threshold} join the {len(dataset['train'])} labelled ones (see {path.name})")
    chosen = np.array([i for i, _ in taken], dtype=np.int64)
    pseudo_targets = np.zeros((len(names), dataset["targets"].shape[1]), dtype=dataset["targets"].dtype)
    if taken:
        pseudo_targets[chosen] = data.encode([label for _, label in taken], dataset["charset"], pseudo_targets.shape[1])
    return (np.concatenate([dataset["images"], unlabelled["images"]]),
            np.concatenate([dataset["targets"], pseudo_targets]),
            np.concatenate([dataset["train"], len(dataset["images"]) + chosen]))


def continued_run(m):
    """The finished run that model.weights names, by its directory or its .keras file ->
    {path, charset, length}; None when model.weights is imagenet, none, synthetic or a backbone weights file."""
    if m["weights"] in ("imagenet", "none", "synthetic"):
        return None
    path = Path(m["weights"])
    if not (path.is_dir() or path.suffix == ".keras"):
        return None
    try:
        metadata = read_metadata(path)
    except UserError as e:
        raise UserError(f"model.weights: {e}") from None
    if metadata["backbone"] != m["backbone"]:
        raise UserError(f"model.weights: {path} was trained with model.backbone={metadata['backbone']}, not "
                        f"{m['backbone']}; set model.backbone={metadata['backbone']} to continue from it")
    return {"path": str(model_path(path)), "charset": metadata["charset"], "lengths": data.model_lengths(metadata)}


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
        missing = fallback == "synthetic" and data.undrawable(dataset["charset"])
        if missing:
            fallback, why = "none", f", as the synthetic captchas cannot draw {missing!r}"
        start = "synthetic captchas of the set's charset and lengths" if fallback == "synthetic" else "random weights"
        print(f"WARNING: {e}. Starting from {start} instead{why} (model.weights_fallback: synthetic, none or stop).",
              file=sys.stderr)
        return fallback


def pretrained_on_synthetic(cfg, dataset):
    """model.weights=synthetic -> a finished run on model.synthetic_images captchas that data.synthesize
    draws in the set's charset and lengths, trained from random initialisation with the other settings of
    cfg: the start a few hundred labels lack without ImageNet weights (README, "Label fewer captchas").
    Kept under data.cache_dir and reused for the same charset, lengths, input size, backbone and
    synthetic settings; killed, it resumes like any run."""
    d, m = cfg["data"], cfg["model"]
    height, width = dataset["image_size"]
    what = {"charset": dataset["charset"], "length": d["length"], "image_size": [height, width],
            "backbone": m["backbone"], "images": m["synthetic_images"], "epochs": m["synthetic_epochs"], "seed": d["seed"]}
    folder = Path(d["cache_dir"]) / "synthetic" / hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    run_dir = folder / "run"
    if (run_dir / MODEL_FILE).exists():
        print(f"model.weights=synthetic: continuing from {run_dir}, trained earlier on {m['synthetic_images']} "
              f"synthetic captchas")
        return run_dir
    missing = data.undrawable(dataset["charset"])
    if missing:
        raise UserError(f"model.weights=synthetic: the synthetic captchas cannot draw {missing!r}, which the "
                        f"charset holds (their font has no glyph for it); set model.weights to imagenet, none or a "
                        f"weights file")
    images = folder / "images"
    if not images.exists():  # drawn 64 pixels high, the captcha package's scale, in the input's shape
        data.synthesize(folder / "images.partial", m["synthetic_images"], d["length"], dataset["charset"],
                        (64, round(64 * width / height)), d["seed"])
        os.replace(folder / "images.partial", images)
    synthetic = json.loads(json.dumps(cfg))
    synthetic["data"].update(dir=str(images), labels=None, label_pattern=None, charset=dataset["charset"],
                             case="sensitive", image_size=[height, width], max_train_images=0, unlabelled=None)
    synthetic["model"]["weights"] = "none"
    synthetic["train"].update(epochs=m["synthetic_epochs"], int8_export=False)  # a start, never read as it is
    print(f"model.weights=synthetic: first training on {m['synthetic_images']} synthetic captchas of the set's "
          f"charset and lengths, {m['synthetic_epochs']} epochs, in {run_dir}")
    return train(synthetic, run_dir)


def relative_name(path, root):
    return os.path.relpath(path, root).replace(os.sep, "/")


def write_test_split(path, dataset):
    """filename,label rows relative to data.dir: the label-CSV format, so evaluate.py reads it like any other."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        for i in dataset["test"]:
            item_path, label = dataset["items"][i]
            writer.writerow([relative_name(item_path, dataset["root"]), label])


# ---------------------------------------------------------------- training

def train(cfg, run_dir=None, extra_callbacks=()):
    """Trains, saves and returns the run directory. extra_callbacks run first after every epoch,
    before the held-out split is scored (the benchmarks add diagnostics there)."""
    cfg = resolved(cfg)
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    # First: TensorFlow's strategies must exist before anything else runs on a device.
    scope, replicas, (process, processes), feeds_share = data_parallel(t["distribute"])
    if processes > 1:
        if run_dir is None:
            raise UserError("training on several machines needs --run-dir, the same on each of them")
        if process:  # the first process writes the run; the others keep their own files beside it
            run_dir = Path(f"{run_dir}.worker_{process}")
    run_dir, resuming = choose_run_dir(cfg, run_dir)
    source = continued_run(m)
    dataset = prepare_data(cfg, source["charset"] if source else None)
    if m["weights"] == "imagenet":
        m = {**m, "weights": imagenet_or_fallback(m, dataset)}
    if m["weights"] == "synthetic":
        source = continued_run({**m, "weights": pretrained_on_synthetic(cfg, dataset)})
    unlabelled = read_unlabelled(cfg, dataset) if d["unlabelled"] else None
    lock_run_dir(run_dir)
    # Again, under the lock: another process may have started this run, or even finished it, meanwhile.
    run_dir, resuming = choose_run_dir(cfg, run_dir)
    check_same_split(run_dir, dataset, resuming)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    data.write_atomically(run_dir / "split.json", json.dumps(dataset["split"]))
    write_test_split(run_dir / "test_split.csv", dataset)
    print(f"{'resuming' if resuming else 'run'}: {run_dir}")

    keras.utils.set_random_seed(d["seed"])
    policy = resolve_precision(t["precision"])
    keras.mixed_precision.set_global_policy(policy)
    charset, (shortest, longest), image_size = dataset["charset"], length_range(d["length"]), dataset["image_size"]
    classes = data.class_count(charset, (shortest, longest))  # with a range of lengths, one more: the blank
    # train.batch_size is per device; Adam's learning rate follows the square-root scaling rule.
    batch_size, learning_rate = t["batch_size"] * replicas, t["learning_rate"] * math.sqrt(replicas)
    with scope():
        model, initialisation = build_model(image_size, longest, classes, m["backbone"],
                                            "none" if source else m["weights"], m["dropout"])
        if source:
            heads = (source["charset"], source["lengths"]) == (charset, (shortest, longest))
            copy_weights(load_model(source["path"])[0], model, heads)
            initialisation = f"{source['path']} ({'every layer' if heads else 'backbone only'})"
            print(f"continuing from {source['path']}: " + ("every weight, heads included" if heads else
                  f"the backbone's weights, with new heads, as the {'charset' if source['charset'] != charset else 'length'} "
                  f"changed ({source['charset']!r} x {source['lengths']} -> {charset!r} x {shortest, longest})"))
    print(f"model: {m['backbone']} from {initialisation} weights, {policy} precision, "
          f"input {image_size[0]}x{image_size[1]}, {model.count_params():,} parameters; "
          f"batch {batch_size} over {replicas} device{'s' if replicas > 1 else ''}")

    early_stopping = ResumableEarlyStopping(run_dir, monitor=SELECTION, mode="max", patience=t["patience"],
                                            restore_best_weights=True)
    shape = {"image_size": image_size, "charset": charset, "length": longest, "min_length": shortest}
    sample = np.random.default_rng(d["seed"]).permutation(dataset["train"])[:t["batchnorm_images"]]
    held_out = HeldOutAccuracy(dataset["images"], dataset["test"], dataset["targets"], shape,
                               dataset["images"][np.sort(sample)], batch_size)
    # Keras's TensorBoard callback writes through tf.summary: a JAX or PyTorch machine may have
    # tensorboard without TensorFlow.
    tensorboard = importlib.util.find_spec("tensorflow") is not None
    rounds = t["self_training_rounds"] if unlabelled else 0
    progress_path = run_dir / "rounds.json"  # rounds completed, and the epochs they ran
    progress = (json.loads(progress_path.read_text()) if progress_path.exists()
                else {"rounds": 0, "epochs": 0, "steps": 0})
    if source and heads and "start" not in progress:
        # A continued run never hands back a model worse than the one it started from: that model
        # is scored like an epoch, and an epoch must read the held-out split better to replace it.
        held_out.set_model(model)
        logs = held_out.scores()
        early_stopping.start_from(logs[SELECTION], model.get_weights())
        progress["start"] = logs[MONITOR]
        data.write_atomically(progress_path, json.dumps(progress))
        print(f"the model continued from reads {logs[MONITOR]:.4f} of the held-out split whole: "
              "an epoch must read it better to replace it")
    if progress["rounds"]:  # killed after a round had ended: go on from the best weights so far
        early_stopping.restore()
        model.set_weights(early_stopping.best_weights)
    images, targets, train_indices = dataset["images"], dataset["targets"], dataset["train"]
    for round_ in range(progress["rounds"], rounds + 1):
        if round_:  # self-training: the unlabelled images read surely enough join the labelled ones
            images, targets, train_indices = with_pseudo_labels(model, dataset, unlabelled, shape, round_,
                                                                t["pseudo_label_confidence"], run_dir)
        # Every epoch passes over the images once, or more where a small set would make it shorter
        # than train.min_steps / train.epochs steps: so the held-out split is scored train.epochs
        # times, however small the set.
        steps = max(1, len(train_indices) // batch_size, math.ceil(t["min_steps"] / t["epochs"]))
        batches = Batches(images, train_indices, targets, classes, batch_size, d["seed"] + round_, steps,
                          (process, processes) if feeds_share else (0, 1), augmentation(t),
                          workers=min(8, os.cpu_count() or 1))  # threads: Pillow's blur and numpy run in parallel
        with scope():
            schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=t["epochs"] * steps)
            optimizer = (keras.optimizers.AdamW(schedule, weight_decay=t["weight_decay"]) if t["weight_decay"]
                         else keras.optimizers.Adam(schedule))
            model.compile(
                optimizer=optimizer,
                loss=[keras.losses.CategoricalCrossentropy(label_smoothing=t["label_smoothing"])] * longest,
                metrics=[["accuracy"]] * longest,
            )
        backup = run_dir / ("backup" if round_ == 0 else f"backup_round_{round_}")
        callbacks = [
            *extra_callbacks,
            held_out,
            # Both before the backup: a kill between them and it repeats an epoch, never skips one.
            early_stopping,
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
            keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True, delete_checkpoint=False),
        ]
        if tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
        trim_history(run_dir / "history.csv", completed_epochs(backup) or progress["epochs"])
        early_stopping.new_round = round_ > 0 and not completed_epochs(backup)
        model._initial_epoch = None  # fit keeps the epoch a previous round's BackupAndRestore resumed at
        model.fit(batches, initial_epoch=progress["epochs"], epochs=progress["epochs"] + t["epochs"], callbacks=callbacks,
                  verbose=1 if sys.stdout.isatty() else 2)
        with open(run_dir / "history.csv", newline="") as f:
            epochs_run = len(list(csv.DictReader(f)))
        progress = {**progress, "rounds": round_ + 1, "epochs": epochs_run,
                    "steps": progress["steps"] + (epochs_run - progress["epochs"]) * steps}
        data.write_atomically(progress_path, json.dumps(progress))

    chosen = early_stopping.best_epoch + 1  # 0: the model continued from, which no epoch read better
    with open(run_dir / "history.csv", newline="") as f:
        held_out_accuracy = progress["start"] if chosen == 0 else float(
            next(row for row in csv.DictReader(f) if int(row["epoch"]) == chosen - 1)[MONITOR])
    metadata = {  # length: the number of heads, the longest label; min_length: the shortest
        "charset": charset, "length": longest, "min_length": shortest, "image_size": image_size, "case": d["case"],
        "label_pattern": d["label_pattern"], "backbone": m["backbone"], "initialisation": initialisation,
        "preprocessing": f"{preprocessing_for(m['backbone'])} scaling of RGB uint8 pixels, inside the model; "
                         f"images resized to image_size by data.decode_image (bilinear)",
        "decode_version": data.DECODE_VERSION, "trained_precision": policy, "epoch": chosen,
        "train_images": len(dataset["train"]), "held_out_images": len(dataset["test"]), "steps": progress["steps"],
        "held_out_whole_string_accuracy": held_out_accuracy, "batchnorm": (
            f"statistics recomputed over {len(sample)} training images" if len(sample) else "moving averages"),
        "continued_from": source and {"model": source["path"], "heads": "kept" if heads else "new"},
        "self_training": unlabelled and {"unlabelled": d["unlabelled"], "rounds": rounds,
                                         "pseudo_label_confidence": t["pseudo_label_confidence"]},
        "keras": keras.__version__, "backend": keras.backend.backend(),
    }
    save_model(with_precision(model, "float32"), run_dir / MODEL_FILE, metadata)
    data.write_atomically(run_dir / "metadata.json", json.dumps(metadata, indent=2))
    for state in ("backup", *(f"backup_round_{r}" for r in range(1, rounds + 1))):
        shutil.rmtree(run_dir / state, ignore_errors=True)
    for state in ("early_stopping.json", "best.weights.npz", "rounds.json"):
        (run_dir / state).unlink(missing_ok=True)
    print((f"chose epoch {chosen} of {progress['epochs']}" if chosen else
           f"kept the model continued from: none of the {progress['epochs']} epochs read the held-out split better")
          + f": held-out whole-string accuracy {held_out_accuracy:.4f}")
    print(f"saved in {run_dir}: {MODEL_FILE} (model and metadata), metadata.json, config.yaml, test_split.csv, "
          f"history.csv{', pseudo_labels.csv' if unlabelled else ''}{', tensorboard/' if tensorboard else ''}")
    if t["int8_export"] and not process:
        int8_export(run_dir)
    return run_dir


def int8_export(run_dir):
    """train.int8_export: export.py --int8 into the run, which the run is then read through where it reads
    the held-out split as well as the Keras model (export.int8_allowed_loss). The run is saved
    already: a failure here costs only the export, and says how to retry it."""
    retry = f"python export.py --model {run_dir} --format onnx --int8"
    try:
        import export
    except ImportError as e:  # e.g. the JAX backend without TensorFlow, which the exporters need
        print(f"note: no int8 export, as it needs TensorFlow ({e}); to make it where TensorFlow is installed: {retry}",
              file=sys.stderr)
        return
    out = export.default_out(run_dir, "onnx", int8=True)
    print(f"int8 export (train.int8_export): {out}, then its held-out check")
    try:
        export.write_export(run_dir, "onnx", out, int8=True)
    except Exception as e:  # noqa: BLE001  (an exporter's failure must not read as a failed training)
        print(f"WARNING: the int8 export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the "
              f"run is complete and read by its Keras model. To retry: {retry}", file=sys.stderr)


def augmentation(t):
    """The distort() settings of the config, or None when every one is off."""
    settings = {name: t[f"augment_{name}"] for name in ("shift", "rotate", "scale", "warp", "blur", "noise")}
    return settings if any(settings.values()) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULTS_PATH), help="YAML config (default: the shipped config.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--run-dir", help="where to write the run (default: a new folder under runs/)")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.set), args.run_dir)
    return 0


if __name__ == "__main__":
    run(main, interrupted="interrupted: run the same command again to resume from the last completed epoch")
