"""What a new user met that did not hold, each kept from coming back: none of these needs a trained model."""
import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, overrides, run_in_process
from PIL import Image

import config
import data
import run
import synth
import train
import training
from cli import CsvWriter, UserError, read_csv_cell


def test_a_label_that_could_be_either_part_of_a_file_name_is_never_guessed(tmp_path):
    for name in ("0001_7364", "0002_1234", "img1_5555"):
        Image.new("RGB", (64, 32), "white").save(tmp_path / f"{name}.png")
    with pytest.raises(UserError, match=r"3 file names .* could hold the label on either side of '_', such as "
                                        r"0001_7364.png \('0001' or '7364'\).*data.label_pattern"):
        data.labelled_files(tmp_path, None, None, "sensitive", [4, 4], None)
    items, _ = data.labelled_files(tmp_path, None, r".*_(?P<label>[^_]+)", "sensitive", [4, 4], None)
    assert sorted(label for _, label in items) == ["1234", "5555", "7364"]
    for path in tmp_path.iterdir():
        path.unlink()
    for i in range(3):  # 图 {i}_{label}: the first part has four characters too
        Image.new("RGB", (64, 32), "white").save(tmp_path / f"图 {i}2_{1000 + i}.jpg")
    with pytest.raises(UserError, match="could hold the label on either side"):
        data.labelled_files(tmp_path, None, None, "sensitive", [4, 4], None)
    range_names = tmp_path / "range"
    range_names.mkdir()
    Image.new("RGB", (64, 32), "white").save(range_names / "page01_73645.png")
    with pytest.raises(UserError, match=r"'page01' or '73645'"):
        data.labelled_files(range_names, None, None, "sensitive", [4, 6], None)


def test_drawn_captchas_of_a_length_range_are_never_ambiguous(tmp_path):
    synth.draw_set(tmp_path, 6, [4, 6], "0123456789", (32, 64), seed=1)
    items, _ = data.labelled_files(tmp_path, None, None, "sensitive", [4, 6], None)
    assert sorted(len(label) for _, label in items) == [4, 4, 5, 5, 6, 6]


def test_csv_cells_that_a_spreadsheet_would_evaluate_are_written_as_text_and_read_back(tmp_path):
    names = ['=HYPERLINK("http:x","click").png', "+1.png", "-2.png", "@sum.png", "'=quoted.png", "'plain.png",
             "a.png"]
    out = io.StringIO()
    CsvWriter(out).writerows([[name] for name in names])
    cells = [row[0] for row in csv.reader(io.StringIO(out.getvalue()))]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
    assert [read_csv_cell(cell) for cell in cells] == names
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8") as f:
        data.write_labels(f, [(tmp_path / name, "1234") for name in names], tmp_path)
    assert "\n=" not in (tmp_path / "labels.csv").read_text()
    table, notes = data.read_labels_csv(tmp_path / "labels.csv", tmp_path)
    assert sorted(table) == sorted(names) and not notes


def test_a_file_name_holding_a_backslash_reads_back_as_the_same_file(tmp_path):
    name = "a\\b.png"  # a legal name on Linux; the tool writes it as it is
    Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.png")
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8") as f:
        data.write_labels(f, [(tmp_path / name, "1234")], tmp_path)
        f.write("sub\\c.png,5678\n")  # written on Windows
    table, notes = data.read_labels_csv(tmp_path / "labels.csv", tmp_path)
    assert table == {name: "1234", "sub/c.png": "5678"} and not notes


@pytest.mark.parametrize("override, fragment", [
    ("data.charset=", "data.charset must be a string or null, got ''"),
    ("data.charset=01 23", "data.charset must hold no spaces"),
    ("model.weights=/nonexistent/weights.h5", "model.weights: no weights file or run at /nonexistent"),
])
def test_a_config_that_cannot_train_is_refused_before_anything_is_written(override, fragment, tmp_path):
    result = run_in_process("train.py", "--run-dir", tmp_path / "run", "--set", override)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_trained_no_epoch_is_started_again_with_another_config(tmp_path, digits, cache_dir):
    cfg = train.resolved(config.load_config(None, overrides(f"data.dir={digits}", cache_dir=cache_dir)))
    started = tmp_path / "run"
    started.mkdir()
    (started / "config.yaml").write_text("data:\n  dir: elsewhere\n  length: 4\n")
    (started / "split.json").write_text("{}")
    assert run.choose_run_dir(cfg, started) == (started, False)
    (started / "history.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(UserError, match="holds an interrupted run with another config"):
        run.choose_run_dir(cfg, started)


def test_a_length_range_with_many_rare_lengths_warns_in_one_line(tmp_path, cache_dir, capsys):
    for i in range(24):
        Image.new("RGB", (64, 32), (i, 0, 0)).save(tmp_path / f"{(10000 if i % 2 else 1000) + i}.png")
    data.load_dataset(train.resolved(config.load_config(None, overrides(
        f"data.dir={tmp_path}", "data.length=1-100", cache_dir=cache_dir))))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "fewer than 20 images of length 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 90 more" in warnings[0]


def test_held_out_captchas_re_encoded_in_the_unlabelled_folder_are_never_pseudo_labelled(tmp_path, digits, cache_dir,
                                                                                       capsys):
    cfg = train.resolved(config.load_config(None, overrides(f"data.dir={digits}", cache_dir=cache_dir)))
    dataset = data.load_dataset(cfg)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    held_out = [dataset["items"][i][0] for i in dataset["test"]]
    for i, path in enumerate(held_out):  # JPEG re-encodes, and copies at twice the size
        image = Image.open(path).convert("RGB")
        image.save(unlabelled / f"jpeg_{i}.jpg", quality=95)
        image.resize((image.width * 2, image.height * 2)).save(unlabelled / f"large_{i}.png")
    synth.draw_set(tmp_path / "others", 20, [4, 4], "0123456789", (32, 64), seed=99)
    for path in data.find_images(tmp_path / "others"):
        shutil.copy(path, unlabelled / path.name)
    cfg["data"]["unlabelled"] = str(unlabelled)
    kept = data.load_unlabelled(cfg, dataset)
    assert sorted(p.name for p in kept["paths"]) == sorted(p.name for p in data.find_images(tmp_path / "others"))
    assert f"{2 * len(held_out)} look like held-out images" in capsys.readouterr().out


def test_self_training_resumes_when_a_pseudo_labelled_file_has_gone(tmp_path, digits, cache_dir, capsys):
    cfg = train.resolved(config.load_config(None, overrides(f"data.dir={digits}", cache_dir=cache_dir)))
    dataset = data.load_dataset(cfg)
    unlabelled = {"root": digits, "paths": data.find_images(digits)[:3], "images": dataset["images"][:3]}
    with open(tmp_path / "pseudo_labels.csv", "w", newline="") as f:
        f.write("filename,label,confidence,round\n")
        for path in [*unlabelled["paths"], digits / "gone.png"]:
            f.write(f"{path.name},1234,0.99,1\n")
    images, targets, indices = training.with_pseudo_labels(None, dataset, unlabelled, {}, 1, 0.95, tmp_path)
    assert len(indices) == len(dataset["train"]) + 3 and len(images) == len(dataset["images"]) + 3
    assert "1 pseudo-labelled captchas of round 1 are no longer in" in capsys.readouterr().err


def test_export_replaces_an_existing_export_only_when_asked(tmp_path):
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"an export")
    result = run_in_process("export.py", "--model", tmp_path / "no_model", "--format", "onnx", "--out", existing)
    assert_one_line_error(result, f"{existing} exists; pass --overwrite to replace it")
    assert existing.read_bytes() == b"an export"


def test_serve_refuses_a_batch_size_it_could_not_warm_up(tmp_path):
    result = run_in_process("serve.py", "--model", tmp_path, "--batch-size", "1000000")
    assert_one_line_error(result, "--batch-size must be from 1 to 1024, got 1000000")


def test_review_py_says_what_it_is():
    result = subprocess.run([sys.executable, str(ROOT / "review.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "no command of its own" in result.stdout
    result = subprocess.run([sys.executable, str(ROOT / "review.py")], capture_output=True, text=True)
    assert result.returncode != 0 and "run evaluate.py --html or predict.py --html" in result.stderr


def test_history_numbers_epochs_from_one(tmp_path):
    logger = training.History(str(tmp_path / "history.csv"))
    logger.on_train_begin()
    for epoch in range(2):
        logger.on_epoch_end(epoch, {"loss": np.float32(1.0)})
    logger.on_train_end()
    with open(tmp_path / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


def test_checked_export_metadata_ties_the_export_to_its_model(tmp_path):
    """The digests: an export whose file, or whose model, is not the one its metadata was written for is
    not what the run is read through."""
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "model.keras").write_bytes(b"the model")
    export = run_dir / run.INT8_EXPORT
    export.write_bytes(b"the export")
    metadata = {"charset": "0123456789", "length": 4, "image_size": [32, 64], "sha256": run.file_digest(export),
                "made_from": {"sha256": run.file_digest(run_dir / "model.keras")},
                "held_out_check": {"read_by_run": True}}
    run.export_metadata_path(export).write_text(json.dumps(metadata))
    assert run.file_to_read(run_dir) == export
    export.write_bytes(b"another export")
    assert run.file_to_read(run_dir) == run_dir / "model.keras"
    export.write_bytes(b"the export")
    (run_dir / "model.keras").write_bytes(b"another model")
    assert run.file_to_read(run_dir) == run_dir / "model.keras"
    run.export_metadata_path(export).write_text("{broken")
    assert run.file_to_read(run_dir) == run_dir / "model.keras"
