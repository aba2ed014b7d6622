"""Label fewer captchas: continuing from a finished run, self-training on unlabelled captchas. A file of
its own, so that pytest-xdist runs its costly run beside test_train.py's."""
import csv
import json

import numpy as np
import pytest
from conftest import copy_digits, overrides

import config
import data
import model
import run
import scoring
import synth
import train
import training
from cli import UserError
from run import held_out_items


def test_continuing_a_run_starts_from_its_weights_keeps_them_unless_bettered_and_self_trains(
        tmp_path, trained_run, digits, cache_dir, capsys, monkeypatch):
    """Continued from a finished run on the same data, the first epoch starts where that run ended,
    below a fresh start's loss. Its unlabelled folder holds new captchas, copies of held-out ones
    and a bad file: only the new ones are pseudo-labelled, and they are kept in pseudo_labels.csv.
    Its epochs are made to score below the start on the held-out split: patience ends the training
    on the labels before its last epoch, yet the self-training round, which restarts the learning
    rate, runs all its epochs; the run saves the start's weights, with the start's score, which is
    what evaluate.py reports for the saved model.
    (One run for all: a training run is the suite's costliest step.)"""
    import keras

    from recognizer import Recognizer

    score = training.HeldOutAccuracy.on_epoch_end

    def epochs_score_nothing(self, epoch, logs=None):
        score(self, epoch, logs)
        logs[training.SELECTION] = -1.0

    monkeypatch.setattr(training.HeldOutAccuracy, "on_epoch_end", epochs_score_nothing)
    labelled = trained_run.parent / "data" / "synthetic"
    held_out, _ = data.read_labels_csv(trained_run / "test_split.csv", labelled)
    unlabelled = copy_digits(digits, tmp_path / "unlabelled", 6)
    for i, name in enumerate(sorted(held_out)[:3]):
        (unlabelled / f"copy_{i}.png").write_bytes((labelled / name).read_bytes())
    (unlabelled / "broken.png").write_bytes(b"")
    cfg = config.load_config(None, overrides(f"data.dir={labelled}", "data.charset=0123456789", "train.epochs=3",
                                             "train.patience=1", f"model.weights={trained_run}",
                                             f"data.unlabelled={unlabelled}", "train.pseudo_label_confidence=0.000001",
                                             "train.self_training_rounds=1",
                                             "data.max_train_images=32", cache_dir=cache_dir))
    run_dir = train.train(cfg, tmp_path / "run")
    printed = capsys.readouterr().out
    assert "every weight, heads included" in printed and "broken.png (empty file)" in printed
    assert "3 are held-out or training images already" in printed
    with open(run_dir / "history.csv") as f:
        continued = list(csv.DictReader(f))
    with open(trained_run / "history.csv") as f:
        fresh = list(csv.DictReader(f))
    assert len(continued) == 2 + 3  # on the labels 2 (Keras never stops after the first), the round all 3
    assert float(continued[0]["loss"]) < float(fresh[0]["loss"])
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["continued_from"] == {"model": str(trained_run / "model.keras"), "heads": "kept"}
    with open(run_dir / "pseudo_labels.csv") as f:
        pseudo = list(csv.DictReader(f))
    assert sorted(row["filename"] for row in pseudo) == sorted(p.name for p in data.find_images(digits)[:6])
    assert all(row["round"] == "1" and len(row["label"]) == 4 for row in pseudo)
    assert "kept the model continued from" in printed and metadata["epoch"] == 0
    (start, _), (kept, _) = model.load_model(trained_run), model.load_model(run_dir)
    weights = lambda m: [keras.ops.convert_to_numpy(w) for w in m.trainable_weights]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(weights(start), weights(kept), strict=True))
    root, items, _, _ = held_out_items(run_dir, None, "sensitive")
    report, _ = scoring.score_items(Recognizer.load(run_dir), items, root)
    assert report["whole_string_accuracy"] == metadata["held_out_whole_string_accuracy"]


def test_self_training_ends_when_a_round_finds_no_sure_reading(tmp_path, trained_run, digits, cache_dir, capsys,
                                                               monkeypatch):
    """Round 1 takes every unlabelled captcha, round 2 none: training ends there, with one round run,
    rather than training once more on the same labels."""
    read_surely = training.with_pseudo_labels
    monkeypatch.setattr(train, "with_pseudo_labels", lambda model, dataset, unlabelled, metadata, round_, *args: (
        read_surely(model, dataset, unlabelled, metadata, round_, *args) if round_ == 1
        else (dataset["images"], dataset["targets"], dataset["train"])))
    labelled = trained_run.parent / "data" / "synthetic"
    cfg = config.load_config(None, overrides(f"data.dir={labelled}", "data.charset=0123456789", "train.epochs=1",
                                             f"model.weights={trained_run}", f"data.unlabelled={digits}",
                                             "train.self_training_rounds=3", "data.max_train_images=32",
                                             "train.pseudo_label_confidence=0.000001", cache_dir=cache_dir))
    run_dir = train.train(cfg, tmp_path / "run")
    assert ("self-training ends: round 2 found no unlabelled captcha read with confidence >= 1e-06 "
            "(train.pseudo_label_confidence)") in capsys.readouterr().out
    with open(run_dir / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # the labels' epoch and round 1's, and no round repeating them
    assert json.loads((run_dir / "metadata.json").read_text())["self_training"]["rounds"] == 1
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith("backup") or p.name == "rounds.json"]


def test_only_sure_readings_become_labels_and_never_held_out_ones(tmp_path, monkeypatch):
    """Pseudo-labels are the readings at or above the threshold; they only ever join the training indices."""
    confidences = [0.99, 0.5, 0.97, 0.2]  # of four unlabelled images, told apart by their first pixel

    def fake_model(batch):
        sure = np.sqrt([confidences[int(image[0, 0, 0])] if image[0, 0, 0] < 4 else 1.0 for image in batch])
        return [np.stack([sure, 1 - sure], axis=1)] * 2  # each position reads "a" with probability sqrt(c)

    monkeypatch.setattr(training, "keras_batch_function", lambda model: fake_model)
    labelled = np.full((5, 32, 64, 3), 9, np.uint8)
    dataset = {"images": labelled, "targets": np.ones((5, 2), np.int32), "train": np.array([0, 1, 2]),
               "test": np.array([3, 4]), "charset": "ab"}
    unlabelled = {"root": tmp_path, "paths": [tmp_path / f"u{i}.png" for i in range(4)],
                  "images": np.stack([np.full((32, 64, 3), i, np.uint8) for i in range(4)])}
    metadata = {"image_size": [32, 64], "charset": "ab", "length": 2}
    images, targets, indices = training.with_pseudo_labels(None, dataset, unlabelled, metadata, 1, 0.9, tmp_path)
    assert list(indices) == [0, 1, 2, 5, 7]  # the labelled training images, then unlabelled 0 and 2
    assert len(images) == 9 and (targets[[5, 7]] == 0).all()  # read "aa"
    with open(tmp_path / "pseudo_labels.csv") as f:
        assert [(r["filename"], r["label"]) for r in csv.DictReader(f)] == [("u0.png", "aa"), ("u2.png", "aa")]


def test_a_new_charset_keeps_the_backbone_and_starts_new_heads(trained_run):
    import keras

    keras.mixed_precision.set_global_policy("float32")
    source, _ = model.load_model(trained_run)
    target, _ = model.build_model((40, 80), 4, 12, backbone="MobileNet", weights="none")  # another input size and charset
    model.copy_weights(source, target, heads=False)
    body = [(a, b) for a, b in zip(source.layers, target.layers) if a.weights and not a.name.startswith("char_")]
    assert body and all(np.array_equal(wa, wb) for a, b in body for wa, wb in zip(a.get_weights(), b.get_weights()))
    assert target.get_layer("char_classes").get_weights()[0].shape[-1] == 12
    with pytest.raises(UserError, match="model.weights: .* was trained with model.backbone=MobileNet"):
        train.continued_run({"weights": str(trained_run), "backbone": "ResNet50"})
    assert train.continued_run({"weights": str(trained_run), "backbone": "MobileNet"})["charset"] == "0123456789"


def test_consistency_loss_trains_the_strong_view_on_the_weak_views_sure_readings_only():
    import keras

    import augment

    def reading(first, second):  # two positions over three classes
        return [[first, (1 - first) / 2, (1 - first) / 2], [second, (1 - second) / 2, (1 - second) / 2]]

    weak = [reading(0.99, 0.99), reading(0.99, 0.5), reading(0.99, 0.99)]  # sure, unsure, sure
    strong = [reading(0.1, 0.1), reading(0.1, 0.1), reading(0.99, 0.99)]  # disagrees, disagrees, agrees
    views = keras.ops.convert_to_tensor(np.stack([weak, strong], axis=1).astype("float32"))
    loss = augment.ConsistencyLoss(0.9, reduction=None)
    per_captcha = keras.ops.convert_to_numpy(loss(np.zeros(3, np.float32), views))
    assert per_captcha[0] == pytest.approx(-2 * np.log(0.1), rel=1e-3)  # sure, and the strong view reads otherwise
    assert per_captcha[1] == 0  # one unsure position: not trained on
    assert per_captcha[2] == pytest.approx(-2 * np.log(0.99), rel=1e-3)
    assert list(keras.ops.convert_to_numpy(augment.sure(views[:, 0], 0.9))) == [1, 0, 1]


def test_consistency_training_reads_each_unlabelled_captcha_through_two_views(tmp_path, digits, cache_dir, capsys):
    import keras

    import augment

    keras.mixed_precision.set_global_policy("float32")
    pixels = keras.Input((32, 64, 3), dtype="uint8")
    features = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(pixels))
    tiny = keras.Model(pixels, [keras.layers.Dense(10, activation="softmax", name=f"char_{i}")(features)
                                for i in (1, 2)])
    settings = config.load_config(None, [])["train"]
    fitted = augment.consistency_model(tiny, settings, seed=3)
    images = np.stack([data.decode_image(p, (32, 64)) for p in data.find_images(digits)[:5]])
    *heads, views = fitted({"pixels": images[:2], "unlabelled": images[2:]}, training=True)
    assert [tuple(head.shape) for head in heads] == [(2, 10), (2, 10)]  # the labelled captchas' heads
    assert tuple(views.shape) == (3, 2, 2, 10)  # each unlabelled captcha, weak view and strong view
    views = keras.ops.convert_to_numpy(views)
    assert not np.allclose(views[:, 0], views[:, 1])  # two views, distorted differently
    strong = fitted.get_layer("strong_distortion")
    assert strong.rotate == 3 * settings["augment_rotate"] and strong.warp == 0.45  # 3x, within a readable bound

    # Processes feeding one batch each read their own unlabelled captchas, as their own labelled ones.
    shares = [training.Batches(images, np.arange(4), np.zeros((5, 2), np.int32), 10, 4, 0, 2, (index, 2),
                               unlabelled=np.zeros((10, 32, 64, 3), np.uint8)).unlabelled_order for index in (0, 1)]
    assert not set(shares[0]) & set(shares[1])

    # A run: unlabelled captchas in every batch from the first step, no rounds, and the share read surely logged.
    synth.draw_set(tmp_path / "unlabelled", 8, [4, 4], "0123456789", (32, 64), seed=21)
    unlabelled = tmp_path / "unlabelled"
    cfg = config.load_config(None, overrides(f"data.dir={digits}", "data.charset=0123456789", "train.epochs=1",
                                             "model.weights=none", f"data.unlabelled={unlabelled}",
                                             "train.self_training=consistency", "data.max_train_images=32",
                                             cache_dir=cache_dir))
    run_dir = train.train(cfg, tmp_path / "run")
    with open(run_dir / "history.csv") as f:
        (epoch,) = list(csv.DictReader(f))
    assert 0 <= float(epoch["consistency_sure"]) <= 1 and "consistency_loss" in epoch
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["self_training"]["method"] == "consistency" and metadata["self_training"]["rounds"] == 0
    assert not (run_dir / "pseudo_labels.csv").exists()
    with pytest.raises(UserError, match="train.self_training=consistency needs distorted views"):
        config.load_config(None, overrides("train.self_training=consistency", *[
            f"train.augment_{name}=0" for name in ("shift", "rotate", "scale", "warp", "blur", "noise")],
            cache_dir=cache_dir))


def test_attention_heads_read_through_one_shared_classifier_and_each_positions_own():
    """On a feature map with fewer cells than characters (1x2 for 4), a class the shared classifier
    favours is read at every position, whatever each position looks at; with the shared classifier
    silent, each position reads what its own classifier favours."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    built, _ = model.build_model((32, 64), 4, 10, backbone="MobileNet", weights="none", head="attention")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 64, 3), dtype=np.uint8)

    def readings():
        return [keras.ops.convert_to_numpy(p).argmax(axis=-1) for p in built(pixels)]

    shared, own = built.get_layer("char_classes"), built.get_layer("char_positions")
    kernel, bias = shared.get_weights()
    shared.set_weights([kernel * 0, np.eye(10)[7] * 50])
    assert len(readings()) == 4 and all((r == 7).all() for r in readings())
    shared.set_weights([kernel * 0, bias * 0])
    kernel, bias = own.get_weights()
    own.set_weights([kernel * 0, np.eye(10)[[1, 2, 3, 4]].reshape(-1) * 50])  # position i favours digit i
    assert [set(r) for r in readings()] == [{1}, {2}, {3}, {4}]


def test_attention_heads_read_only_through_the_shared_classifier_where_the_map_has_a_cell_per_character(
        trained_run):
    """On a 2x4 feature map for 4 characters, each position reads only what the shared classifier makes
    of where it looks: silenced, every position reads every class alike. The backbone is a trained run's,
    as a random one's features all but vanish."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    built, _ = model.build_model((64, 128), 4, 10, backbone="MobileNet", weights="none", head="attention")
    model.copy_weights(model.load_model(run.model_path(trained_run))[0], built, heads=False)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    shared = built.get_layer("char_classes")
    kernel, bias = shared.get_weights()
    shared.set_weights([kernel * 0, bias * 0])
    for position in built(pixels):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(position), 0.1, rtol=1e-5)


@pytest.mark.parametrize("setting, head, reason", [
    ("model.head=pooled", "pooled",
     "model.head changed (attention -> pooled; model.head=attention would keep every weight)"),
    # a feature map with a cell for every character, where the run continued from had too few
    ("data.image_size=[64,128]", "attention",
     "input size changed (32x64 -> 64x128), and with it which layers the heads need"),
])
def test_other_heads_than_the_run_continued_from_keep_its_backbone_and_read_as_recorded(tmp_path, trained_run,
                                                                                       cache_dir, capsys, setting,
                                                                                       head, reason):
    """model.head=pooled, the published recipe's heads, or an input that changes which layers the
    attention heads need, from a run with attention heads: the backbone is kept, the heads start anew,
    and the saved model reads the held-out split as training recorded."""
    from recognizer import Recognizer

    labelled = trained_run.parent / "data" / "synthetic"
    cfg = config.load_config(None, overrides(f"data.dir={labelled}", "data.charset=0123456789", "train.epochs=1",
                                             f"model.weights={trained_run}", setting,
                                             "data.max_train_images=32", cache_dir=cache_dir))
    run_dir = train.train(cfg, tmp_path / "run")
    assert f"with new heads, as the {reason}" in capsys.readouterr().out
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["head"] == head and metadata["continued_from"]["heads"] == "new"
    root, items, _, _ = held_out_items(run_dir, None, "sensitive")
    report, _ = scoring.score_items(Recognizer.load(run_dir), items, root)
    assert report["whole_string_accuracy"] == metadata["held_out_whole_string_accuracy"]
