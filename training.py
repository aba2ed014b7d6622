"""The parts of a training run that train.py puts together: batches, callbacks, devices, self-training."""
import contextlib
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import atomic
import data
from cli import CsvWriter, UserError, import_keras, read_csv_cell, warn
from model import recompute_batchnorm
from recognizer import Recognizer, keras_batch_function
from scoring import score_readings

keras = import_keras()

MONITOR = "val_whole_string_accuracy"
SELECTION = "val_selection_score"  # what early stopping maximises: see HeldOutAccuracy


def passes_over(indices, count, rng):
    """count indices: as many passes over indices as count needs, each shuffled anew."""
    passes = -(-count // len(indices))
    return np.concatenate([rng.permutation(indices) for _ in range(passes)])[:count]


def batch_of(images, targets, num_classes, chosen, unlabelled=None, chosen_unlabelled=None):
    """Inputs and one-hot targets per head for fit; with unlabelled images (consistency training), the inputs
    also hold those, and a placeholder target stands for them, which ConsistencyLoss does not read."""
    one_hot = np.eye(num_classes, dtype=np.float32)[targets[chosen]]
    heads = tuple(one_hot[:, position] for position in range(one_hot.shape[1]))
    if unlabelled is None:
        return images[chosen], heads
    return ({"pixels": images[chosen], "unlabelled": unlabelled[chosen_unlabelled]},
            (*heads, np.zeros(len(chosen), dtype=np.float32)))


class Batches(keras.utils.PyDataset):
    """Shuffled training batches of the decoded uint8 array, with one-hot targets per head, and as many
    unlabelled images where consistency training has them. They are handed over as they are: the
    distortions are computed on the device, in the training step (augment.Distortion).

    Every batch is full, so that it splits evenly over data-parallel replicas. With several
    processes feeding one global batch (JAX across hosts), each takes its own share of it."""

    def __init__(self, images, indices, targets, num_classes, batch_size, seed, steps, process=(0, 1), unlabelled=None,
                 **kwargs):
        super().__init__(**kwargs)
        index, count = process
        self.images, self.targets, self.num_classes, self.unlabelled = images, targets, num_classes, unlabelled
        self.batch_size = batch_size // count
        self.indices, self.share = np.asarray(indices)[index::count], slice(index, None, count)
        self.seed, self.epoch, self.steps = seed, 0, steps
        self.order, self.unlabelled_order = self.shuffled()

    def shuffled(self):
        """The epoch's order of labelled and of unlabelled images: as many passes over each, shuffled anew,
        as its steps need."""
        rng, count = np.random.default_rng([self.seed, self.epoch]), self.steps * self.batch_size
        if self.unlabelled is None:
            return passes_over(self.indices, count, rng), None
        # Each process its own share of the unlabelled images, as of the labelled ones.
        unlabelled = np.arange(len(self.unlabelled))[self.share]
        return passes_over(self.indices, count, rng), passes_over(unlabelled, count, rng)

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        # Sorted, so that a memory-mapped array is read in file order.
        step = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return batch_of(self.images, self.targets, self.num_classes, np.sort(self.order[step]), self.unlabelled,
                        None if self.unlabelled is None else np.sort(self.unlabelled_order[step]))

    def on_epoch_end(self):
        self.epoch += 1
        self.order, self.unlabelled_order = self.shuffled()


def epoch_arrays(images, indices, targets, num_classes, batch_size, seed, steps, unlabelled=None):
    """One epoch's steps x batch_size training images and their one-hot targets, as arrays for fit, which
    shuffles them anew every epoch: each image as many times as the steps need (Batches' passes), and as
    many unlabelled images for consistency training. On the TensorFlow backend fit reads arrays at the
    model's pace, where a PyDataset (read through tf.data.Dataset.from_generator) more than doubled a
    step on a CPU."""
    rng = np.random.default_rng(seed)
    chosen = passes_over(indices, steps * batch_size, rng)
    return batch_of(images, targets, num_classes, chosen, unlabelled,
                    None if unlabelled is None else passes_over(np.arange(len(unlabelled)), len(chosen), rng))


class HeldOutAccuracy(keras.callbacks.Callback):
    """After every epoch, first recomputes the BatchNorm statistics on training images (where
    batchnorm_images is not empty), then scores the whole held-out split, as evaluate.py does: the
    same function reads it in the same order and batches, and scoring.score_readings scores it, so
    that the score recorded for the chosen epoch is what evaluate.py reports.

    model: the inference model (the one saved), whose weights the model being fit shares."""

    def __init__(self, model, images, indices, labels, metadata, batchnorm_images, batch_size):
        super().__init__()
        self.inference_model, self.images, self.indices, self.labels = model, images, indices, labels
        self.metadata, self.batchnorm_images, self.batch_size = metadata, batchnorm_images, batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs.update(self.scores())
        logs["epoch_seconds"] = round(time.perf_counter() - self.started, 1)

    def scores(self):
        """The model's held-out scores, after recomputing its BatchNorm statistics."""
        if len(self.batchnorm_images):
            recompute_batchnorm(self.inference_model, self.batchnorm_images, self.batch_size)
        recognizer = Recognizer(keras_batch_function(self.inference_model), self.metadata)
        chunks = [self.indices[i:i + 4096] for i in range(0, len(self.indices), 4096)]  # bounded memory
        readings = [reading for chunk in chunks for reading in recognizer.read(self.images[chunk])]
        report = score_readings(self.labels, readings, self.metadata["charset"], self.metadata["length"])
        # Early stopping keeps the epoch that reads the most captchas whole, and among equals the
        # one that reads the most characters: a small set's first epochs read none whole, yet learn.
        return {MONITOR: report["whole_string_accuracy"],
                **{f"val_char_{position}_accuracy": a
                   for position, a in enumerate(report["per_position_accuracy"], 1)},
                SELECTION: report["correct"] + float(np.mean(report["per_position_accuracy"]))}


class TimeEstimate(keras.callbacks.Callback):
    """A few steps into fitting, one line: the steps to go, how long one takes on this machine, so about how
    long the stage will take, and the keys that shorten it. After the first epoch, a second line from its
    whole time, which adds what steps leave out: scoring the held-out split, recomputing BatchNorm."""

    def __init__(self, stage, steps, steps_per_epoch, shorten, after=4, stops_early=True):
        super().__init__()
        self.stage, self.steps, self.steps_per_epoch, self.shorten, self.after = stage, steps, steps_per_epoch, shorten, after
        self.stops_early = stops_early
        self.ends, self.epoch_starts = [], []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.ends) > self.after:
            return
        self.ends.append(time.perf_counter())
        if len(self.ends) > self.after:  # the first step traces the model: it is not timed
            step = float(np.median(np.diff(self.ends[1:])))
            print(f"\n{self.stage}: {self.steps} steps of about {step:.2f} s each on this machine: about "
                  f"{duration(self.steps * step)} (shortened by {self.shorten})", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_starts.append(time.perf_counter())
        if len(self.epoch_starts) == 2 and len(self.ends) > self.after:
            # The first epoch's steps include tracing; the steps' median stands in for them.
            step = float(np.median(np.diff(self.ends[1:])))
            rest = self.epoch_starts[1] - self.ends[-1] - step * (self.steps_per_epoch - len(self.ends))
            per_epoch = step * self.steps_per_epoch + max(0.0, rest)
            epochs_left = self.steps / self.steps_per_epoch - 1
            if epochs_left >= 1:
                print(f"{self.stage}: an epoch takes about {duration(per_epoch)} with its held-out scoring: about "
                      f"{duration(epochs_left * per_epoch)} to go"
                      + (" at most (early stopping may end it sooner)" if self.stops_early else ""), flush=True)


def duration(seconds):
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} hours"
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute{'' if minutes == 1 else 's'}"


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose best score, patience count and best weights survive a restart, and
    carry over from one self-training round to the next: they are written to state_dir after
    every epoch and read back when training resumes."""

    def __init__(self, state_dir, **kwargs):
        super().__init__(**kwargs)
        self.state_path = Path(state_dir) / "early_stopping.json"
        self.weights_path = Path(state_dir) / "best.weights.npz"

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.restore()

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
            with atomic.replacing(self.weights_path) as partial, open(partial, "wb") as f:
                np.savez(f, *self.best_weights)
        state = {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "epoch": epoch}
        atomic.write_text(self.state_path, json.dumps(state))


class History(keras.callbacks.CSVLogger):
    """history.csv, its epochs numbered from 1 as the log and the metadata number them."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


def read_history(run_dir):
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trim_history(path, epochs):
    """Drops history rows of epochs that will run again: a kill after an epoch's row was
    written, but before its backup, leaves one."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        atomic.write_text(path, "".join(lines[:1 + epochs]))


def completed_epochs(backup_dir):
    """The epochs BackupAndRestore has saved, which it resumes after."""
    path = Path(backup_dir) / "training_metadata.json"
    return json.loads(path.read_text())["epoch"] if path.exists() else 0


# ---------------------------------------------------------------- devices

def data_parallel(distribute):
    """-> (function giving the scope to build and compile in, replicas, (this process, processes), whether
    each process feeds only its share of every batch), from each backend's own engine. TensorFlow:
    MirroredStrategy over every GPU in the box (or every CPU device if there is none),
    MultiWorkerMirroredStrategy across machines when TF_CONFIG describes a cluster. JAX:
    keras.distribution.DataParallel over every device, across hosts when the KERAS_DISTRIBUTION_*
    variables describe them."""
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
    """TensorFlow's MultiWorkerMirroredStrategy, with a reduce() that takes what Keras's fit hands it.
    There is no public way around this: fit (checked with Keras 3.15.1 and TensorFlow 2.21) reduces a
    sample input batch over the workers to build the model, which TensorFlow cannot do for uint8 or
    nested values, and averages each worker's scalar logs along axis 0, which a scalar lacks."""
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


# ---------------------------------------------------------------- self-training

def with_pseudo_labels(model, dataset, unlabelled, metadata, round_, threshold, run_dir):
    """Self-training: reads the unlabelled images with the best model so far, and takes the readings
    at or above threshold as labels, kept in pseudo_labels.csv. -> (images, targets, training
    indices) of the labelled training images and the pseudo-labelled ones. A resumed round reads
    its pseudo-labels back from the CSV, so that it goes on with the same ones; a row whose file has
    left data.unlabelled since is skipped and counted."""
    path, fields = run_dir / "pseudo_labels.csv", ["filename", "label", "confidence", "round"]
    rows = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{**row, "filename": read_csv_cell(row["filename"]), "label": read_csv_cell(row["label"])}
                    for row in csv.DictReader(f) if int(row["round"]) <= round_]
    names = [data.relative_name(p, unlabelled["root"]) for p in unlabelled["paths"]]
    if not any(int(row["round"]) == round_ for row in rows):
        recognizer = Recognizer(keras_batch_function(model), metadata)
        readings = [reading for start in tqdm(range(0, len(names), 1024), desc=f"round {round_}: reading unlabelled",
                                              unit="chunk")
                    for reading in recognizer.read(unlabelled["images"][start:start + 1024])]
        rows += [{"filename": name, "label": r.text, "confidence": f"{r.confidence:.6f}", "round": round_}
                 for name, r in zip(names, readings) if r.confidence >= threshold]
        with atomic.opened(path, newline="", encoding="utf-8") as f:
            writer = CsvWriter(f)
            writer.writerow(fields)
            writer.writerows([row[field] for field in fields] for row in rows)
    position = {name: i for i, name in enumerate(names)}
    this_round = [row for row in rows if int(row["round"]) == round_]
    taken = [(position[row["filename"]], row["label"]) for row in this_round if row["filename"] in position]
    if len(taken) < len(this_round):
        gone = [row["filename"] for row in this_round if row["filename"] not in position]
        warn(f"{len(gone)} pseudo-labelled captchas of round {round_} are no longer in {unlabelled['root']} and are "
             f"left out, such as {gone[0]}")
    print(f"self-training round {round_}: {len(taken)} of {len(names)} unlabelled captchas read with confidence "
          f">= {threshold} join the {len(dataset['train'])} labelled ones (see {path.name})")
    chosen = np.array([i for i, _ in taken], dtype=np.int64)
    pseudo_targets = np.zeros((len(names), dataset["targets"].shape[1]), dtype=dataset["targets"].dtype)
    if taken:
        pseudo_targets[chosen] = data.encode([label for _, label in taken], dataset["charset"], pseudo_targets.shape[1])
    return (np.concatenate([dataset["images"], unlabelled["images"]]),
            np.concatenate([dataset["targets"], pseudo_targets]),
            np.concatenate([dataset["train"], len(dataset["images"]) + chosen]))
