"""A run folder: its files, its lock, its held-out split, and which model file `--model RUN` reads.

This module imports neither Keras nor TensorFlow: reading a run's export needs neither.
"""
import csv
import datetime
import fcntl
import hashlib
import json
import os
import zipfile
from pathlib import Path

import yaml

import atomic
import config
import data
from cli import UserError, warn

MODEL_FILE = "model.keras"
METADATA_ENTRY = "captcha.json"  # the metadata inside model.keras: charset, lengths, input size, ...
LOCK_FILE = ".lock"
# Where train.py and export.py --int8 put a run's int8 export, which the run may be read through (file_to_read).
INT8_EXPORT = Path("export") / "model.int8.onnx"
# The most whole-string accuracy on the held-out split that a run's int8 export may lose against its Keras
# model and still be what the run is read through: a fifth of a point, or one captcha where that is more,
# as precision alone moves one (docs/design.md).
INT8_MAX_HELD_OUT_LOSS = 0.002
# The files of a run that its training writes, which a run holding no trained epoch may lose.
RUN_FILES = ("config.yaml", "split.json", "test_split.csv", "history.csv", "early_stopping.json", "best.weights.npz",
             "rounds.json", "pseudo_labels.csv", "tensorboard")
held_locks = {}  # run directory -> its open lock file: a lock lasts as long as the process that took it


# ---------------------------------------------------------------- models and their metadata

def model_path(path):
    """A run directory -> its model.keras; any other path as it is."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() and not export_format(path) else path


def run_dir_of(model_arg):
    """The run folder of --model: the folder itself, or the folder of the file named."""
    return Path(model_arg) if Path(model_arg).is_dir() and not export_format(model_arg) else Path(model_arg).parent


def read_metadata(path):
    """A run directory's or .keras file's metadata, read without Keras."""
    path = model_path(path)
    if not path.exists():
        raise UserError(f"no model at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise UserError(f"{path} is not a model made by train.py (a .keras file carrying {METADATA_ENTRY})") from None


def model_lengths(metadata):
    """A model's [shortest, longest] label length. Its metadata's `length` is the number of heads;
    models made before length ranges have no `min_length`."""
    return [metadata.get("min_length", metadata["length"]), metadata["length"]]


def export_format(path):
    """'onnx', 'tflite', 'savedmodel', or None for a Keras model (a run directory or a .keras file)."""
    path = Path(path)
    if path.suffix.lower() in (".onnx", ".tflite"):
        return path.suffix.lower()[1:]
    return "savedmodel" if (path / "saved_model.pb").is_file() else None


def export_metadata_path(path):
    """The JSON beside an export: X.onnx -> X.onnx.json, X.tflite -> X.tflite.json, SavedModel folder D -> D.json."""
    path = Path(path)
    return path.with_name(f"{path.name}.json")


def read_export_metadata(path):
    json_path = export_metadata_path(path)
    try:
        metadata = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} has no metadata beside it: expected {json_path}, as export.py writes it") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{json_path} is not readable JSON: {e}") from None
    if not isinstance(metadata, dict) or not {"charset", "length", "image_size"} <= metadata.keys():
        raise UserError(f"{json_path} is not the metadata of an export: it lacks charset, length or image_size")
    return metadata


def file_digest(path):
    """sha256 of a file's bytes, or of every file in a folder (a SavedModel), in name order."""
    digest, path = hashlib.sha256(), Path(path)
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- which file a run is read through

def int8_allowed_loss(images):
    """The whole-string accuracy an int8 export may lose on a held-out split of `images` and still be
    what its run is read through."""
    return max(INT8_MAX_HELD_OUT_LOSS, 1 / images)


def int8_verdict(int8_correct, images, keras_accuracy):
    """Whether a run is read through its int8 export, which reads int8_correct of its images held out,
    where its Keras model read keras_accuracy of them: -> the figures and the verdict, as kept in the
    export's metadata (held_out_check)."""
    accuracy, allowed = int8_correct / images, int8_allowed_loss(images)
    return {"images": images, "correct": int8_correct, "whole_string_accuracy": accuracy,
            "keras_whole_string_accuracy": keras_accuracy, "max_loss": allowed,
            "read_by_run": keras_accuracy - accuracy <= allowed + 1e-9}  # 1e-9: float rounding


def int8_problem(run_dir):
    """-> (the int8 export's metadata, None) where it is the very file that export.py checked, made from
    the run's model.keras; else (None, why not)."""
    run_dir = Path(run_dir)
    export, keras_file = run_dir / INT8_EXPORT, run_dir / MODEL_FILE
    try:
        metadata = read_export_metadata(export)
    except UserError as e:
        return None, str(e)
    made_from = metadata.get("made_from") or {}
    if "sha256" not in metadata or "sha256" not in made_from:
        return None, "it records no digests (made by an older export.py): make it again with export.py --int8"
    if file_digest(export) != metadata["sha256"]:
        return None, "the file is not the one its metadata was written for (damaged, or copied from elsewhere)"
    if not keras_file.is_file() or file_digest(keras_file) != made_from["sha256"]:
        return None, f"it was made from another model than {keras_file}"
    return metadata, None


def file_to_read(path):
    """The model file `--model path` reads: for a run directory, its int8 export where export.py (run by
    train.py, or by hand with --int8) found that it reads the run's held-out split as well as the Keras
    model (int8_verdict), and it is the very file checked, made from the run's model.keras: on a CPU with
    8-bit dot products it reads one captcha about 4x as fast. Else model.keras, with a warning where an
    export is there but damaged or foreign. Any other path is read as it is."""
    path = Path(path)
    if not path.is_dir() or export_format(path):
        return path
    if (path / INT8_EXPORT).exists():
        metadata, problem = int8_problem(path)
        if problem:
            warn(f"{path / INT8_EXPORT} is not read: {problem}; reading {path / MODEL_FILE}")
        elif (metadata.get("held_out_check") or {}).get("read_by_run"):
            return path / INT8_EXPORT
    return path / MODEL_FILE


# ---------------------------------------------------------------- the run folder

def new_run_dir():
    return Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def saved_config(run_dir):
    """The config a run was started with, data.length as the code keeps it."""
    saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    saved["data"]["length"] = config.parse_length(saved["data"]["length"]) or saved["data"]["length"]
    return saved


def trained_epochs(run_dir):
    """Epochs a run has completed: the rows of its history."""
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return len(list(csv.DictReader(f)))


def choose_run_dir(cfg, run_dir):
    """-> (run directory, whether it resumes an interrupted run). Never reuses a finished run; a run
    that trained no epoch yet is started again, with whatever config."""
    if run_dir is None:
        unfinished = [d for d in sorted(Path("runs").glob("*"), reverse=True)
                      if (d / "config.yaml").exists() and not (d / MODEL_FILE).exists() and saved_config(d) == cfg]
        if unfinished:
            return unfinished[0], True
        run_dir = new_run_dir()
    run_dir = Path(run_dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker:
        raise UserError(f"--run-dir {run_dir}: {blocker} is a file, not a folder")
    if (run_dir / MODEL_FILE).exists():
        raise UserError(f"{run_dir} holds a finished run; choose another --run-dir")
    if (run_dir / "config.yaml").exists():
        before = saved_config(run_dir)
        if before == cfg:
            return run_dir, True
        if trained_epochs(run_dir) or (run_dir / "backup").exists():
            flat_before, flat_now = config.flatten(before), config.flatten(cfg)
            changed = sorted(k for k in set(flat_before) | set(flat_now) if flat_before.get(k) != flat_now.get(k))
            raise UserError(f"{run_dir} holds an interrupted run with another config ({', '.join(changed)} differ): "
                            f"rerun it with its own config, or choose another --run-dir")
        return run_dir, False  # started, but no epoch trained: nothing to lose
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no run; choose another --run-dir")
    return run_dir, False


def clear_untrained(run_dir):
    """The files of a run that trained no epoch, which is started again afresh."""
    for name in RUN_FILES:
        atomic.remove(Path(run_dir) / name)


def lock(run_dir, advice="or choose another --run-dir"):
    """Takes the run directory for this process, or raises UserError naming the process that
    holds it, and `advice`. The kernel drops a lock when its process ends, however it ends: the lock of a
    killed run never blocks its resume."""
    key = os.path.abspath(run_dir)
    if key in held_locks:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    lock_file = open(Path(run_dir) / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        pid = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise UserError(f"another process (pid {pid}) is training into {run_dir}: wait for it to end, "
                        f"{advice}") from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    held_locks[key] = lock_file


def check_same_split(run_dir, dataset):
    """A resumed run must train and score on the split it started with: its early-stopping
    state and its history belong to that split."""
    path = Path(run_dir) / "split.json"
    if not path.exists():
        return
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


def write_start(run_dir, cfg, dataset):
    """The files a run writes as it starts: its config, its split's fingerprint, and the held-out split
    as a label CSV relative to data.dir, which evaluate.py reads like any other."""
    atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    atomic.write_text(run_dir / "split.json", json.dumps(dataset["split"]))
    with atomic.opened(run_dir / "test_split.csv", newline="", encoding="utf-8") as f:
        data.write_labels(f, [dataset["items"][i] for i in dataset["test"]], dataset["root"])


def held_out_items(run_dir, labels_csv=None, case="sensitive"):
    """The run's held-out split -> (data.dir, [(path, label)], description, notes), labelled by the
    split's own list or by labels_csv. Images missing from disk stay in the list, to be counted as skipped."""
    run_dir = Path(run_dir)
    split, config_path = run_dir / "test_split.csv", run_dir / "config.yaml"
    if not split.exists() or not config_path.exists():
        raise UserError(f"no held-out split in {run_dir} (test_split.csv and config.yaml): pass --data")
    settings = yaml.safe_load(config_path.read_text())["data"]
    root, allow_outside = Path(settings["dir"]), settings.get("allow_outside_dir", False)
    if not root.is_dir():
        raise UserError(f"the run's data folder {root} (data.dir in {config_path}) no longer exists: move it back, "
                        f"or pass --data")
    split_labels, _ = data.read_labels_csv(split, root, allow_outside, keep_missing=True)
    notes = []
    if labels_csv:
        table, notes = data.read_labels_csv(labels_csv, root, allow_outside, keep_missing=True)
        missing = [name for name in split_labels if name not in table]
        if missing:
            raise UserError(f"{labels_csv} has no label for {len(missing)} held-out images, such as {missing[0]}")
        split_labels = {name: table[name] for name in split_labels}
    items = [(root / name, data.normalise_label(label, case)) for name, label in sorted(split_labels.items())]
    return root, items, f"held-out split of {run_dir} ({split})", notes
