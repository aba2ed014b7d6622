import csv
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import ROOT, assert_one_line_error, copy_digits, overrides, run_in_process
from PIL import Image

import config
import data
import model
import scoring
import synth
import train
import training
from cli import UserError
from run import LOCK_FILE, choose_run_dir, held_locks, held_out_items, int8_allowed_loss
from run import lock as run_lock


def tiny_config(folder, cache_dir, *extra):
    return train.resolved(config.load_config(None, overrides(f"data.dir={folder}", *extra, cache_dir=cache_dir)))


def test_a_run_leaves_a_reloadable_model_with_its_metadata(trained_run, digits):
    for name in ("model.keras", "metadata.json", "config.yaml", "test_split.csv", "history.csv"):
        assert (trained_run / name).exists(), name
    assert (trained_run / "tensorboard").is_dir()
    assert not (trained_run / "backup").exists()
    keras_model, metadata = model.load_model(trained_run)
    assert metadata == json.loads((trained_run / "metadata.json").read_text())
    assert metadata["charset"] == "0123456789" and metadata["length"] == 4 and metadata["image_size"] == [32, 64]
    assert metadata["min_length"] == 4  # a fixed length
    assert metadata["initialisation"] == "random" and 1 <= metadata["epoch"] <= 2
    assert keras_model.output_names == ["char_1", "char_2", "char_3", "char_4"]
    assert [output.shape[-1] for output in keras_model.outputs] == [10] * 4  # a fixed length has no blank class
    assert keras_model.inputs[0].dtype == "uint8"  # the model takes raw pixels: its scaling is inside
    pixels = np.stack([data.decode_image(p, (32, 64)) for p in data.find_images(digits)[:3]])
    outputs = keras_model.predict(pixels, verbose=0)
    assert len(outputs) == 4 and all(np.allclose(o.sum(axis=1), 1, atol=1e-4) for o in outputs)
    with open(trained_run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "val_whole_string_accuracy" in rows[0] and "char_1_accuracy" in rows[0]


def test_a_length_range_trains_a_head_per_position_with_a_blank_class(varied_run):
    keras_model, metadata = model.load_model(varied_run)
    assert metadata["length"] == 4 and metadata["min_length"] == 3 and metadata["charset"] == "0123456789"
    # auto: 4:1 at 32x64's pixel count is 32x88, widened to 32 pixels for each of up to 4 characters and 32 more
    assert metadata["image_size"] == [32, 160] and tuple(keras_model.inputs[0].shape[1:3]) == (32, 160)
    assert keras_model.output_names == ["char_1", "char_2", "char_3", "char_4"]
    assert [output.shape[-1] for output in keras_model.outputs] == [11] * 4  # ten digits and "no character"
    held_out, _ = data.read_labels_csv(varied_run / "test_split.csv", varied_run.parent / "images")
    assert sorted(len(label) for label in held_out.values()) == [3] * 4 + [4] * 4  # 10% of each length's 40


def test_a_rare_length_is_warned_about_and_one_outside_the_range_stops_training(tmp_path, cache_dir, capsys):
    folder = tmp_path / "rare"
    synth.draw_set(folder, 5, [3, 3], "0123456789", (32, 64), seed=5)
    synth.draw_set(folder, 25, [4, 4], "0123456789", (32, 64), seed=6)
    cfg = train.resolved(config.load_config(None, overrides(f"data.dir={folder}", "data.length=3-4",
                                                            "data.charset=0123456789", cache_dir=cache_dir)))
    data.load_dataset(cfg)
    report = capsys.readouterr().out
    assert "lengths: 3: 5 (1 held out), 4: 25 (2 held out)" in report
    assert "warning: fewer than 20 images of length 3: too few" in report and "length 3, 4" not in report
    shutil.copy(data.find_images(folder)[0], folder / "12345_x.png")
    with pytest.raises(UserError, match=r"1 of 31 labels in file names do not fit data.length=3-4 .*"
                                               r"12345_x.png '12345_x' \(length 7, not 3-4\)"):
        data.load_dataset(cfg)


def test_held_out_split_never_overlaps_training(trained_run):
    held_out, _ = data.read_labels_csv(trained_run / "test_split.csv", trained_run.parent / "data" / "synthetic")
    everything = {p.name for p in data.find_images(trained_run.parent / "data" / "synthetic")}
    assert 0 < len(held_out) < len(everything)
    assert set(held_out) <= everything  # and training used everything else, which therefore excludes these
    dataset = data.load_dataset(yaml.safe_load((trained_run / "config.yaml").read_text()))
    train_names = {dataset["items"][i][0].name for i in dataset["train"]}
    assert not train_names & set(held_out) and train_names | set(held_out) == everything


def test_a_finished_run_is_never_overwritten(trained_run):
    cfg = config.load_config(None, ["model.weights=none"])
    with pytest.raises(UserError, match="holds a finished run"):
        choose_run_dir(train.resolved(cfg), trained_run)


def test_bad_labels_stop_training_naming_the_files(tmp_path, digits, cache_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in data.find_images(digits)[:10]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "12345_x.png").write_bytes(path.read_bytes())
    settings = [f"--set={o}" for o in overrides("data.charset=0123456789", f"data.dir={folder}", cache_dir=cache_dir)]
    result = run_in_process("train.py", *settings, "--run-dir", tmp_path / "run")
    assert_one_line_error(result, "1 of 11 labels", "12345_x.png", "length 7, not 4")
    assert not (tmp_path / "run").exists()
    names = sorted(p.name for p in folder.iterdir())
    (tmp_path / "labels.csv").write_text("filename,label\n" + "".join(
        f"{name},{'12a4' if i == 3 else name[:4]}\n" for i, name in enumerate(names)))
    result = run_in_process("train.py", *settings, f"--set=data.labels={tmp_path / 'labels.csv'}", "--run-dir",
                            tmp_path / "run")
    assert_one_line_error(result, "1 of 11 labels in", "labels.csv", f"{names[3]} '12a4' (characters not in the")


def test_wrong_case_labels_point_to_the_case_policy(tmp_path, digits, cache_dir):
    folder = tmp_path / "letters"
    folder.mkdir()
    for name, source in zip(("abcd_1.png", "ABCD_2.png", "xyzw_3.png"), data.find_images(digits)):
        (folder / name).write_bytes(source.read_bytes())  # three different images: identical ones cannot be split
    cfg = config.load_config(None, overrides("data.charset=ABCDWXYZ", f"data.dir={folder}", cache_dir=cache_dir))
    with pytest.raises(UserError, match="data.case=lower or upper"):
        data.load_dataset(train.resolved(cfg))
    cfg["data"]["case"] = "upper"
    dataset = data.load_dataset(train.resolved(cfg))
    assert sorted(label for _, label in dataset["items"]) == ["ABCD", "ABCD", "XYZW"]


def test_missing_data_folder_is_one_clear_line(tmp_path):
    result = run_in_process("train.py", "--set", f"data.dir={tmp_path / 'nowhere'}", "--set", "model.weights=none")
    assert_one_line_error(result, "data folder not found", "nowhere")


def test_other_backbones_get_their_own_input_scaling():
    import keras

    keras.mixed_precision.set_global_policy("float32")
    built, _ = model.build_model((32, 64), 5, 36, backbone="MobileNetV3Small", weights="none")
    scaling = built.get_layer("normalise")
    assert model.preprocessing_for("MobileNetV3Small") == "raw"  # it scales its own input
    assert scaling.scale == [1.0] * 3 and scaling.offset == [0.0] * 3
    assert [layer.name for layer in built.layers[-5:]] == [f"char_{i}" for i in range(1, 6)]
    assert model.preprocessing_for("Xception") == "minus_one_to_one" and model.preprocessing_for("ResNet50") == "caffe"


def test_local_weights_file_is_loaded(tmp_path):
    """Both the legacy .h5 format of Keras's ImageNet files and Keras 3's .weights.h5."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.mixed_precision.set_global_policy("float32")
    donor = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    legacy, current = tmp_path / "xception_notop.h5", tmp_path / "xception_notop.weights.h5"
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, donor)
    donor.save_weights(current)
    for path in (legacy, current):
        built, initialisation = model.build_model((32, 64), 4, 10, weights=str(path))
        assert initialisation == str(path)
        backbone = built.weights[:len(donor.weights)]  # the input scaling has none; the heads come last
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(backbone, donor.weights))
    with pytest.raises(UserError, match="no weights file"):
        model.build_model((32, 64), 4, 10, weights=str(tmp_path / "absent.h5"))


def offline(monkeypatch):
    """Every download fails, as Keras reports it where there is no network."""
    from keras.src.utils import file_utils

    def fail(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/xception_notop.h5: None -- "
                        "[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", fail)


def test_without_the_imagenet_weights_training_falls_back_as_configured_or_stops(monkeypatch, capsys):
    offline(monkeypatch)
    with pytest.raises(model.ImageNetUnavailable, match="could not download the ImageNet weights") as error:
        model.build_model((32, 64), 4, 10, weights="imagenet")
    assert "~/.keras/models" in str(error.value) and "https://example.invalid/xception_notop.h5" in str(error.value)
    digits = {"image_size": (32, 64), "charset": "0123456789"}
    fallback = lambda choice, dataset=digits, scope="set": train.imagenet_or_fallback(  # noqa: E731
        {"backbone": "MobileNet", "weights": "imagenet", "weights_fallback": choice, "synthetic_scope": scope},
        dataset)
    assert fallback("synthetic") == "synthetic"
    assert "could not download the ImageNet weights" in capsys.readouterr().err
    assert fallback("none") == "none"
    assert "Starting from random weights instead" in capsys.readouterr().err
    with pytest.raises(UserError, match="model.weights=imagenet: could not download"):
        fallback("stop")
    # Captchas the synthetic ones cannot draw (no glyph in their font) start from random weights.
    assert fallback("synthetic", {"image_size": (32, 64), "charset": "0123中"}) == "none"
    assert "cannot draw '中'" in capsys.readouterr().err
    # The machine's shared start draws its own charset: any set can start from its backbone.
    assert fallback("synthetic", {"image_size": (32, 64), "charset": "0123中"}, "machine") == "synthetic"


def test_synthetic_weights_refuse_a_charset_their_captchas_cannot_draw(tmp_path, digits):
    cfg = tiny_config(copy_digits(digits, tmp_path / "few", 8), tmp_path / "cache", "model.weights=synthetic")
    with pytest.raises(UserError, match="cannot draw '中文'"):
        train.pretrained_on_synthetic(cfg, {"image_size": [32, 64], "charset": "0123中文"})
    assert not (tmp_path / "cache" / "synthetic").exists()


@pytest.mark.parametrize("scope, size, remedy", [("set", r"\(32, 64\)", "a larger data.image_size"),
                                                 ("machine", r"\(48, 224\)", "model.synthetic_scope=set")])
def test_a_backbone_that_cannot_take_the_input_stops_the_synthetic_start_before_drawing(tmp_path, digits,
                                                                                         monkeypatch, scope, size,
                                                                                         remedy):
    def drawn(*args, **kwargs):
        raise AssertionError("drew synthetic captchas for a model that cannot be built")

    monkeypatch.setattr(synth, "draw_set", drawn)
    cfg = tiny_config(digits, tmp_path / "cache", "model.weights=synthetic", "model.backbone=InceptionV3",
                      f"model.synthetic_scope={scope}")
    with pytest.raises(UserError, match=rf"model.synthetic_scope={scope}\): model.backbone InceptionV3 cannot be "
                                        rf"built for input {size}: .*; choose another model.backbone or {remedy}$"):
        train.pretrained_on_synthetic(cfg, {"image_size": [32, 64], "charset": "0123456789"})
    assert not (tmp_path / "cache" / "synthetic").exists()  # no folder left behind, nor its lock


def test_a_synthetic_start_another_process_is_training_stops_with_one_line(tmp_path, digits, monkeypatch):
    cfg = tiny_config(digits, tmp_path / "cache", "model.weights=synthetic", "model.synthetic_scope=machine")
    dataset = {"image_size": [32, 64], "charset": "0123456789"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "draw_set", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.pretrained_on_synthetic(cfg, dataset)
    (folder,) = (tmp_path / "cache" / "synthetic").iterdir()
    held_locks.pop(str(folder)).close()  # as if this process had ended
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242'); f.flush(); "
                               "print('held', flush=True); time.sleep(60)", str(folder / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"another process \\(pid 4242\\) is training into {folder}: wait for it "
                                            f"to end, then run again"):
            train.pretrained_on_synthetic(cfg, dataset)
    finally:
        holder.kill()
        holder.wait()


def test_a_fitted_synthetic_start_is_reused_for_the_same_training_images_only(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(synth, "FIT_DRAWS", 2)
    monkeypatch.setattr(synth, "FIT_PASSES", 1)
    monkeypatch.setattr(train, "train", lambda cfg, run_dir, stage: run_dir)  # the start's key, not its training
    cfg = tiny_config(digits, tmp_path / "cache", "model.weights=synthetic", "model.synthetic_images=10",
                      "model.synthetic_style=fitted", "data.charset=0123456789")
    dataset = data.load_dataset(cfg)

    def start(train_indices):
        return train.pretrained_on_synthetic(cfg, {**dataset, "train": np.asarray(train_indices)})

    first = start(dataset["train"][:20])
    assert start(dataset["train"][:20]) == first  # the same images: the same start
    assert start(dataset["train"][20:40]) != first  # other training images: fitted and trained anew


def test_early_stopping_counts_characters_while_no_captcha_is_read_whole(tmp_path):
    """A small set's first epochs read no captcha whole, yet learn: patience follows the characters
    read until whole reads come, and then the whole reads; the best epoch is the one kept."""
    tiny = train.keras.Sequential([train.keras.Input((1,)), train.keras.layers.Dense(1)])
    stopper = training.ResumableEarlyStopping(tmp_path, monitor=training.SELECTION, mode="max", patience=2,
                                           restore_best_weights=True)
    stopper.set_model(tiny)
    tiny.stop_training = False
    stopper.on_train_begin()
    # (captchas read whole, mean per-position accuracy) after each epoch
    epochs = [(0, 0.1), (0, 0.2), (0, 0.3), (0, 0.4), (0, 0.5), (3, 0.6), (3, 0.55), (3, 0.58), (2, 0.9)]
    stopped_after = None
    for epoch, (whole, characters) in enumerate(epochs):
        stopper.on_epoch_end(epoch, {training.SELECTION: whole + characters})
        if tiny.stop_training:
            stopped_after = epoch
            break
    assert stopped_after == 7 and stopper.best_epoch == 5


def colour_coded(folder, count, seed=0):
    """Captchas of two characters from '0123', each drawn as its half of the image in a grey level of
    its own: learnt in a few steps, so that a tiny run can show the model inference sees."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = "".join(rng.choice(list("0123"), 2))
        pixels = np.concatenate([np.full((32, 32), 30 + 65 * int(c)) for c in label], axis=1)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(folder / f"{label}_{i:03d}.png")
    return folder


@pytest.mark.parametrize("stops_early", [True, False])
def test_the_time_estimate_counts_the_held_out_scoring_after_the_first_epoch(monkeypatch, capsys, stops_early):
    """A self-training round, which runs all its epochs, is not promised an early end."""
    # Steps of 10 s (only the first five are timed); the first epoch ends 110 s after its steps, scoring.
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 210.0])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    estimate = training.TimeEstimate("training", steps=30, steps_per_epoch=10, shorten="train.epochs",
                                     stops_early=stops_early)
    estimate.on_epoch_begin(0)
    for batch in range(10):
        estimate.on_train_batch_end(batch)
    estimate.on_epoch_begin(1)
    printed = capsys.readouterr().out
    assert "30 steps of about 10.00 s each on this machine: about 5 minutes" in printed  # the steps alone
    assert "an epoch takes about 4 minutes with its held-out scoring: about 7 minutes to go" in printed
    assert ("at most (early stopping may end it sooner)" in printed) == stops_early


def test_distortions_run_in_training_only_each_image_its_own_and_keep_the_picture_in_its_frame():
    """The device-side distortions: off outside training; a batch of one picture comes out as many; a
    shift moves it by no more than asked; uncovered pixels take the border's grey, never black; at the
    shipped strengths the bright block (the label-bearing content) stays whole inside the frame."""
    import augment

    pictures = np.full((16, 32, 64, 3), 90, np.uint8)
    pictures[:, 10:22, 24:40] = 250  # a bright block on a grey ground
    layer = augment.Distortion(shift=0.1, rotate=10.0, scale=0.1, warp=0.3, blur=0.8, noise=0.03, seed=7)
    assert np.array_equal(np.asarray(layer(pictures, training=False)), pictures)
    assert np.array_equal(np.asarray(layer(pictures)), pictures)  # inference is the default
    first = np.asarray(layer(pictures, training=True))
    assert first.dtype == np.uint8 and first.shape == pictures.shape
    assert len({image.tobytes() for image in first}) == len(first)  # random per image

    moved = np.asarray(augment.Distortion(shift=0.1, seed=7)(pictures, training=True))
    columns = [np.flatnonzero(image[16, :, 0] > 170) for image in moved]
    offsets = np.array([(c.min() + c.max()) / 2 - 31.5 for c in columns])
    assert np.all(np.abs(offsets) <= 0.1 * 64 + 1) and np.count_nonzero(np.abs(offsets) > 0.5) > 8
    turned = np.asarray(augment.Distortion(rotate=10.0, scale=0.1, warp=0.3, seed=7)(pictures, training=True))
    assert turned.min() >= 89  # bilinear blends of grey and white only: no black corners

    shipped = augment.distortion(config.load_config()["train"], seed=7)
    bright = np.asarray(shipped(np.concatenate([pictures] * 4), training=True))[..., 0] > 170
    area = np.count_nonzero(pictures[0, ..., 0] > 170)
    assert np.all(np.abs(bright.sum(axis=(1, 2)) / area - 1) < 0.3)  # scaled by at most 8%, blurred a little
    assert not bright[:, [0, -1]].any() and not bright[:, :, [0, -1]].any()  # never pushed out of the frame


def test_a_saved_model_holds_no_distortion(trained_run):
    import zipfile

    with zipfile.ZipFile(trained_run / "model.keras") as archive:
        saved = archive.read("config.json").decode()
    assert "Distortion" not in saved and "distortion" not in saved
    keras_model, _ = model.load_model(trained_run)
    assert [layer.name for layer in keras_model.layers][:2] == ["pixels", "normalise"]


def test_killed_mid_run_the_same_command_resumes_and_the_model_reads_as_fit_did(tmp_path, cache_dir):
    """Killed with kill -9 during epoch 2 of 4, the rerun picks up after epoch 1 and finishes with 4
    epochs. Then the guard against BatchNorm statistics that trail the weights: the saved model, in
    inference mode, reads the training images about as well as fit reported while training on them;
    and the held-out accuracy train.py recorded is what evaluate.py reports for the saved model. Last,
    the int8 export train.py makes: scored on the held-out split, the run is read through it where it
    loses at most run.int8_allowed_loss, and reads the split as that score says.
    (One run for all: a training run is the suite's costliest step.)"""
    from recognizer import Recognizer

    folder = colour_coded(tmp_path / "coded", 96)
    run_dir = tmp_path / "run"
    arguments = ["--run-dir", str(run_dir),
                 *[arg for o in overrides(f"data.dir={folder}", "data.length=2", "train.epochs=4", "train.batch_size=8",
                                          "train.min_steps=120", "train.patience=4", "data.test_fraction=0.25",
                                          "train.batchnorm_images=64", "train.int8_export=true",
                                          cache_dir=cache_dir) for arg in ("--set", o)]]
    history, backup = run_dir / "history.csv", run_dir / "backup" / "training_metadata.json"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *arguments], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and not (backup.exists() and '"epoch": 1' in backup.read_text()):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(history.read_text().splitlines()) == 2, "the kill must land during epoch 2"
    assert not (run_dir / "model.keras").exists()

    result = run_in_process("train.py", *arguments)  # the same command line, without a second start-up
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    with open(history) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]  # numbered as the log and the metadata number them

    metadata = json.loads((run_dir / "metadata.json").read_text())
    chosen = rows[metadata["epoch"] - 1]
    best_fit_accuracy = max(np.mean([float(row[f"char_{i}_accuracy"]) for i in (1, 2)]) for row in rows)
    assert best_fit_accuracy > 0.6, "the tiny run must learn its training images (chance: 0.25) for this test to mean anything"
    held_out, _ = data.read_labels_csv(run_dir / "test_split.csv", folder)
    training = [p for p in data.find_images(folder) if p.name not in held_out]
    recognizer = Recognizer.load(run_dir / "model.keras")
    readings = recognizer.predict(training)
    inference_accuracy = np.mean([r.text[i] == p.name[i] for r, p in zip(readings, training) for i in (0, 1)])
    # Statistics that trail the weights fail here twice over: the saved model misreads, and the
    # held-out scores that chose its epoch were misreadings too.
    assert inference_accuracy > best_fit_accuracy - 0.15

    root, items, _, _ = held_out_items(run_dir, None, "sensitive")
    report, _ = scoring.score_items(recognizer, items, root)
    assert report["whole_string_accuracy"] == metadata["held_out_whole_string_accuracy"]
    assert report["per_position_accuracy"] == [float(chosen[f"val_char_{i}_accuracy"]) for i in (1, 2)]

    int8 = run_dir / "export" / "model.int8.onnx"
    check = json.loads((run_dir / "export" / "model.int8.onnx.json").read_text())["held_out_check"]
    assert check["keras_whole_string_accuracy"] == metadata["held_out_whole_string_accuracy"]
    loss = check["keras_whole_string_accuracy"] - check["whole_string_accuracy"]
    assert check["max_loss"] == int8_allowed_loss(check["images"]) == 1 / 24  # one captcha of 24
    assert check["read_by_run"] == (loss <= check["max_loss"] + 1e-9)
    assert "held-out split: the int8 export reads" in result.stdout
    reader = Recognizer.load(run_dir)
    assert reader.source == (int8 if check["read_by_run"] else run_dir / "model.keras")
    recorded = check["whole_string_accuracy"] if check["read_by_run"] else metadata["held_out_whole_string_accuracy"]
    assert scoring.score_items(reader, items, root)[0]["whole_string_accuracy"] == recorded


def test_a_second_train_on_a_live_run_dir_is_refused_naming_the_first(tmp_path, digits, cache_dir):
    """While one train.py holds the run directory, another stops with one line; once the first is
    killed with kill -9, its lock is gone and the run can resume."""
    small, run = copy_digits(digits, tmp_path / "small", 48), tmp_path / "run"
    settings = overrides("train.epochs=1", f"data.dir={small}", "train.batch_size=8", cache_dir=cache_dir)
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--run-dir", str(run),
                              *[arg for o in settings for arg in ("--set", o)]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline, lock = time.time() + 240, run / LOCK_FILE
        while first.poll() is None and time.time() < deadline and not (
                lock.exists() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.05)
        assert first.poll() is None, "the first train.py must still be training"
        with pytest.raises(UserError, match=f"another process \\(pid {first.pid}\\) is training into {run}"):
            train.train(config.load_config(None, settings), run)
    finally:
        first.kill()
        first.wait()
    run_lock(run)  # raises if the killed process's lock still blocked the resume
    held_locks.pop(os.path.abspath(run)).close()


def test_resuming_on_changed_data_is_refused(tmp_path, digits, cache_dir, monkeypatch):
    class Interrupted(Exception):
        pass

    def interrupt(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(train, "build_model", interrupt)  # stop each attempt once the run directory is set up
    folder, run = copy_digits(digits, tmp_path / "data", 30), tmp_path / "run"
    cfg = tiny_config(folder, cache_dir)
    with pytest.raises(Interrupted):
        train.train(cfg, run)
    copy_digits(digits, folder, 10, start=30)
    with pytest.raises(UserError, match=r"changed since .*27 to train and 3 held out then, 36 and 4 now"):
        train.train(cfg, run)
    for path in data.find_images(digits)[30:40]:
        (folder / path.name).unlink()
    with pytest.raises(Interrupted):  # the same data again: it resumes
        train.train(cfg, run)
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "digest": "older", "digest_version": 1}))
    with pytest.raises(UserError, match=r"started by an older version of train.py, .* another --run-dir"):
        train.train(cfg, run)


def test_identical_images_never_take_a_whole_side_of_the_split(tmp_path, digits, cache_dir):
    for seed in range(10):  # whichever group the seed puts first
        train_idx, test_idx = data.split_train_test(["same"] * 40 + ["other"], 0.5, seed)
        assert len(train_idx) and len(test_idx) and len(train_idx) + len(test_idx) == 41
    folder = tmp_path / "copies"
    folder.mkdir()
    source = data.find_images(digits)[0].read_bytes()
    for i in range(41):
        (folder / f"1234_{i}.png").write_bytes(source)
    with pytest.raises(UserError, match="all 41 readable images are identical"):
        data.load_dataset(tiny_config(folder, cache_dir))


def test_duplicates_are_found_by_their_pixels_and_kept_on_one_side(tmp_path, digits, cache_dir, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for path in data.find_images(digits)[:20]:
        Image.open(path).save(folder / f"{path.stem}_a.png")
        Image.open(path).save(folder / f"{path.stem}_b.bmp")
    dataset = data.load_dataset(tiny_config(folder, cache_dir, "data.test_fraction=0.3"))
    pair = {side: {dataset["items"][i][0].stem[:-2] for i in dataset[side]} for side in ("train", "test")}
    assert len(pair["test"]) >= 5 and not pair["train"] & pair["test"]
    assert "20 duplicate images (20 groups" in capsys.readouterr().out


def test_label_rows_outside_the_data_folder_are_refused_unless_allowed(tmp_path, digits, cache_dir, capsys):
    folder = copy_digits(digits, tmp_path / "data", 2)
    outside = copy_digits(digits, tmp_path / "elsewhere", 2, start=2)
    inside_rows = [f"{path.name},{path.name[:4]}" for path in sorted(folder.iterdir())]
    escaping = sorted(outside.iterdir())
    (tmp_path / "labels.csv").write_text("\n".join([
        *inside_rows, f"../elsewhere/{escaping[0].name},{escaping[0].name[:4]}",
        f"{escaping[1]},{escaping[1].name[:4]}", "../../../../../../etc/passwd,1234"]))
    labels = f"data.labels={tmp_path / 'labels.csv'}"
    dataset = data.load_dataset(tiny_config(folder, cache_dir, labels))
    assert len(dataset["items"]) == 2
    assert "3 rows name files outside" in capsys.readouterr().out
    dataset = data.load_dataset(tiny_config(folder, cache_dir, labels, "data.allow_outside_dir=true"))
    used = {dataset["items"][i][0].resolve() for i in [*dataset["train"], *dataset["test"]]}
    assert used == {*folder.iterdir(), *outside.iterdir()}  # and /etc/passwd, even allowed, is no captcha


def test_run_dir_or_config_paths_of_the_wrong_kind_are_one_clear_line(tmp_path, digits, cache_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    settings = [arg for o in overrides(f"data.dir={digits}", cache_dir=cache_dir) for arg in ("--set", o)]
    for run_dir in (a_file, a_file / "run"):
        with pytest.raises(UserError, match=f"--run-dir {run_dir}: {a_file} is a file, not a folder"):
            train.main(["--run-dir", str(run_dir), *settings])
    with pytest.raises(UserError, match=f"config file {tmp_path} cannot be read: Is a directory"):
        train.main(["--config", str(tmp_path), *settings])
    with pytest.raises(UserError, match=f"label file {tmp_path} cannot be read: Is a directory"):
        train.main(["--run-dir", str(tmp_path / "run"), *settings, "--set", f"data.labels={tmp_path}"])


def test_a_machine_wide_synthetic_start_is_trained_once_and_serves_other_charsets_and_lengths(tmp_path, digits,
                                                                                              capsys, monkeypatch):
    monkeypatch.setitem(train.SHARED_START, "image_size", [32, 96])  # small enough for a test, not the sets' size
    cache = tmp_path / "cache"
    letters = tmp_path / "letters"
    synth.draw_set(letters, 40, (5, 5), "abcdef", (32, 80), seed=1)
    settings = ("model.weights=synthetic", "model.synthetic_scope=machine", "model.synthetic_images=64",
                "model.synthetic_epochs=1", "train.epochs=1")
    first = train.train(tiny_config(copy_digits(digits, tmp_path / "few", 40), cache, *settings,
                                    "data.charset=0123456789"), tmp_path / "first")
    assert "first training on 64 synthetic captchas of 0-9a-zA-Z, 4 to 6 characters" in capsys.readouterr().out
    (pretrained,) = (cache / "synthetic").glob("*/run")
    synthetic_metadata = json.loads((pretrained / "metadata.json").read_text())
    assert synthetic_metadata["charset"] == string.digits + string.ascii_letters
    assert [synthetic_metadata["min_length"], synthetic_metadata["length"]] == [4, 6]
    assert synthetic_metadata["image_size"] == [32, 96]
    drawn = [path.stem.split("_")[0] for path in data.find_images(pretrained.parent / "images")]
    assert {len(label) for label in drawn} == {4, 5, 6}
    assert any(c.islower() for label in drawn for c in label) and any(c.isupper() for label in drawn for c in label)

    # Another charset and length: the same start, trained once, its backbone with new heads.
    second = train.train(tiny_config(letters, cache, *settings, "data.length=5"), tmp_path / "second")
    printed = capsys.readouterr().out
    assert f"continuing from {pretrained}, trained earlier" in printed and "first training on" not in printed
    assert len(list((cache / "synthetic").iterdir())) == 1
    for run_dir, charset, length in ((first, "0123456789", 4), (second, "abcdef", 5)):
        metadata = json.loads((run_dir / "metadata.json").read_text())
        assert metadata["continued_from"] == {"model": str(pretrained / "model.keras"), "heads": "new"}
        assert (metadata["charset"], metadata["length"]) == (charset, length)


def test_synthetic_weights_train_once_are_reused_and_are_the_imagenet_fallback(tmp_path, digits, capsys, monkeypatch):
    cache = tmp_path / "cache"  # its own: the drawn captchas and their run are kept there
    folder = copy_digits(digits, tmp_path / "few", 40)
    monkeypatch.setattr(synth, "FIT_DRAWS", 4)  # a rough fit: this test is about the start, not the style
    monkeypatch.setattr(synth, "FIT_PASSES", 1)
    cfg = tiny_config(folder, cache, "model.weights=synthetic", "model.synthetic_images=64",
                      "model.synthetic_style=fitted", "model.synthetic_epochs=1", "train.epochs=1",
                      "data.charset=0123456789")
    first = train.train(cfg, tmp_path / "first")
    printed = capsys.readouterr().out
    assert "first training on 64 synthetic captchas of the set's charset and lengths" in printed
    assert "synthetic captchas fitted to 36 images: 32x64" in printed  # the training images, never the held-out
    (pretrained,) = (cache / "synthetic").glob("*/run")
    synthetic_metadata = json.loads((pretrained / "metadata.json").read_text())
    assert synthetic_metadata["charset"] == "0123456789" and synthetic_metadata["length"] == 4
    assert synthetic_metadata["initialisation"] == "random" and synthetic_metadata["image_size"] == [32, 64]
    images = data.find_images(pretrained.parent / "images")
    assert len(images) == 64 and all(len(path.stem.split("_")[0]) == 4 for path in images)
    assert Image.open(images[0]).size == (64, 32)  # fitted to the training images, drawn in their size
    metadata = json.loads((first / "metadata.json").read_text())
    assert metadata["continued_from"] == {"model": str(pretrained / "model.keras"), "heads": "kept"}
    assert metadata["initialisation"] == f"{pretrained / 'model.keras'} (every layer)"

    # The same set again, with the ImageNet weights asked for where they cannot be had: by default it
    # falls back to the synthetic start, and the synthetic run is reused, not redone.
    offline(monkeypatch)
    second = train.train({**cfg, "model": {**cfg["model"], "weights": "imagenet"}}, tmp_path / "second")
    printed = capsys.readouterr()
    assert "could not download the ImageNet weights" in printed.err
    assert f"continuing from {pretrained}, trained earlier" in printed.out and "first training on" not in printed.out
    assert json.loads((second / "metadata.json").read_text())["initialisation"] == metadata["initialisation"]
    assert len(list((cache / "synthetic").iterdir())) == 1
