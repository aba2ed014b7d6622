import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error, run_in_process
from PIL import Image

import data
import evaluate
import predict
import scoring
from cli import UserError
from recognizer import FLOAT32_BATCH_LIMIT, TEST_TIME_VIEWS, Recognizer, keras_batch_function


@pytest.fixture(scope="module")
def recognizer(trained_run):
    return Recognizer.load(trained_run)


@pytest.fixture(scope="module")
def known_folder(tmp_path_factory, recognizer, digits):
    """Ten captchas named INDEX_LABEL.png, where the label is the model's own reading for six,
    differs from it in position 1 only for two, and in every position for two. So the whole-string
    accuracy is exactly 6/10, position 1's is 6/10 and the others' 8/10, whatever the model learnt."""
    folder = tmp_path_factory.mktemp("known")
    sources = data.find_images(digits)[:10]
    staged = [folder / f"{i:02d}_0000.png" for i in range(10)]
    for source, target in zip(sources, staged):
        shutil.copy(source, target)
    readings = recognizer.predict(staged)  # same files, same order, same batch as evaluate.py will read them

    def shift(text, positions):
        return "".join(str((int(c) + 1) % 10) if i in positions else c for i, c in enumerate(text))

    for i, (path, reading) in enumerate(zip(staged, readings)):
        label = reading.text if i < 6 else shift(reading.text, {0} if i < 8 else {0, 1, 2, 3})
        path.rename(folder / f"{i:02d}_{label}.png")
    return folder


def test_scores_are_exact_on_a_hand_made_case():
    truth = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8, 9]])
    predicted = np.array([[1, 2, 3], [1, 2, 0], [4, 0, 0], [7, 8, 9]])
    confidence = np.array([0.99, 0.2, 0.5, 0.9])
    report = scoring.score(truth, predicted, confidence, "0123456789")
    assert report["whole_string_accuracy"] == 0.5 and report["correct"] == 2
    assert report["per_position_accuracy"] == [1.0, 0.75, 0.5]
    assert report["per_character_accuracy"]["3"] == {"accuracy": 0.5, "count": 2}
    assert report["confusions"][0] == {"true": "6", "predicted": "0", "count": 1} or {
        "true": "3", "predicted": "0", "count": 1} in report["confusions"]
    assert sum(c["count"] for c in report["confusions"]) == 3
    coverage = {c["coverage"]: c["whole_string_accuracy"] for c in report["coverage"]}
    assert coverage[1.0] == 0.5 and coverage[0.8] == pytest.approx(2 / 3)  # top 3: 0.99, 0.9 right, 0.5 wrong


def test_scores_count_the_blank_and_break_down_by_length():
    charset = "0123456789"
    truth = data.encode(["123", "1234", "1234", "567"], charset, 4)
    predicted = data.encode(["123", "123", "1234", "5678"], charset, 4)
    report = scoring.score(truth, predicted, np.array([0.9, 0.8, 0.7, 0.6]), charset)
    assert report["whole_string_accuracy"] == 0.5 and report["correct"] == 2
    assert report["per_position_accuracy"] == [1.0, 1.0, 1.0, 0.5]  # position 4: blank, 4, 4, blank read as -, -, 4, 8
    assert report["accuracy_by_length"] == [{"length": 3, "whole_string_accuracy": 0.5, "correct": 1, "count": 2},
                                            {"length": 4, "whole_string_accuracy": 0.5, "correct": 1, "count": 2}]
    assert report["length_confusion"] == [{"true": 3, "read": 3, "count": 1}, {"true": 3, "read": 4, "count": 1},
                                          {"true": 4, "read": 3, "count": 1}, {"true": 4, "read": 4, "count": 1}]
    assert sorted((c["true"], c["predicted"], c["count"]) for c in report["confusions"]) == [("", "8", 1), ("4", "", 1)]
    assert report["per_character_accuracy"]["4"] == {"accuracy": 0.5, "count": 2}
    assert set(report["per_character_accuracy"]) == set("1234567")  # characters only, not the blank


def fake_recognizer(cases, metadata):
    """A Recognizer whose model gives cases[v] (a row of probabilities per position) for an image of grey level v."""
    def run_batch(batch):
        return [np.array([cases[int(image[0, 0, 0])][position] for image in batch], np.float32)
                for position in range(metadata["length"])]

    return Recognizer(run_batch, metadata)


# Charset "ab" at 2 to 4 characters: each head reads a, b or the blank.
A, B, BLANK = [0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]
RANGE_CASES = [[A, B, A, B], [A, B, BLANK, BLANK], [A, B, BLANK, [0.1, 0.6, 0.3]], [A, BLANK, BLANK, BLANK]]
RANGE_METADATA = {"charset": "ab", "length": 4, "min_length": 2, "image_size": [32, 64]}


def grey(levels):
    return np.stack([np.full((32, 64, 3), level, np.uint8) for level in levels])


def test_a_reading_is_the_text_before_the_first_blank_and_an_unsure_one_has_a_low_confidence():
    readings = fake_recognizer(RANGE_CASES, RANGE_METADATA).read(grey(range(4)))
    assert [r.text for r in readings] == ["abab", "ab", "ab", "a"]
    assert readings[0].position_confidences == pytest.approx([0.8, 0.7, 0.8, 0.7])
    assert readings[0].confidence == pytest.approx(0.8 * 0.7 * 0.8 * 0.7)
    assert readings[1].confidence == pytest.approx(0.8 * 0.7 * 0.6 * 0.6)  # the blanks count like characters
    # A character after the blank: the text stops at the blank, and its confidence counts the blank's probability.
    assert readings[2].position_confidences == pytest.approx([0.8, 0.7, 0.6, 0.3])
    assert readings[2].confidence == pytest.approx(0.8 * 0.7 * 0.6 * 0.3)
    # Shorter than the shortest length: no label can be that, so the reading is unsure.
    assert readings[3].confidence == 0 and readings[3].position_confidences == pytest.approx([0.8, 0.6, 0.6, 0.6])
    nothing = np.zeros((0, 32, 64, 3), np.uint8)
    assert [p.shape for p in fake_recognizer(RANGE_CASES, RANGE_METADATA).probabilities(nothing)] == [(0, 3)] * 4
    # One length, as before length ranges (no min_length in the metadata): no blank, the top probabilities.
    fixed = fake_recognizer([[[0.3, 0.7], [0.9, 0.1]]], {"charset": "ab", "length": 2, "image_size": [32, 64]})
    (reading,) = fixed.read(grey([0]))
    assert reading.text == "ba" and reading.position_confidences == pytest.approx([0.7, 0.9])
    assert reading.confidence == pytest.approx(0.63)


def test_predict_writes_texts_of_every_length(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for level in (1, 2, 3):
        Image.new("RGB", (64, 32), (level,) * 3).save(folder / f"{level}.png")
    Image.new("RGB", (64, 32), (0,) * 3).save(folder / "0.png")
    monkeypatch.setattr(Recognizer, "load", lambda *args, **kwargs: fake_recognizer(RANGE_CASES, RANGE_METADATA))
    rows = list(csv.DictReader(io.StringIO(run_main(predict, capsys, "--model", "fake", folder))))
    assert {Path(row["path"]).name: row["prediction"] for row in rows} == {"0.png": "abab", "1.png": "ab",
                                                                            "2.png": "ab", "3.png": "a"}
    assert [float(row["confidence"]) for row in rows][3] == 0
    run_main(predict, capsys, "--model", "fake", folder, "--output", tmp_path / "read.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "read.jsonl").read_text().splitlines()]
    assert [(row["prediction"], len(row["position_confidences"])) for row in lines] == [
        ("abab", 4), ("ab", 4), ("ab", 4), ("a", 4)]


def test_evaluate_reports_accuracy_by_length_on_a_length_range(varied_run, capsys):
    report = json.loads(run_main(evaluate, capsys, "--model", varied_run, "--json"))
    metadata = json.loads((varied_run / "metadata.json").read_text())
    with open(varied_run / "history.csv") as f:
        chosen = next(row for row in csv.DictReader(f) if int(row["epoch"]) == metadata["epoch"])
    assert report["count"] == 8 and report["skipped"] == 0
    # train.py scored its held-out split as evaluate.py does, the blank included.
    assert report["whole_string_accuracy"] == metadata["held_out_whole_string_accuracy"]
    assert report["per_position_accuracy"] == [float(chosen[f"val_char_{i}_accuracy"]) for i in (1, 2, 3, 4)]
    assert [(row["length"], row["count"]) for row in report["accuracy_by_length"]] == [(3, 4), (4, 4)]
    assert sum(row["correct"] for row in report["accuracy_by_length"]) == report["correct"]
    assert sum(c["count"] for c in report["length_confusion"]) == 8
    assert {c["true"] for c in report["length_confusion"]} == {3, 4}
    assert all(0 <= c["read"] <= 4 for c in report["length_confusion"])
    text = run_main(evaluate, capsys, "--model", varied_run)
    assert "length 3-4" in text and "by length: 3: " in text


def test_unscorable_labels_of_a_length_range_are_counted_not_scored(varied_run, tmp_path):
    source = data.find_images(varied_run.parent / "images")[0]
    labels = {"a.png": "123", "b.png": "1234", "c.png": "12", "d.png": "12345", "e.png": "12a"}
    for name in labels:
        shutil.copy(source, tmp_path / name)
    (tmp_path / "f.png").write_bytes(b"")
    items = [(tmp_path / name, label) for name, label in labels.items()] + [(tmp_path / "f.png", "123")]
    report, rows = scoring.score_items(Recognizer.load(varied_run), items, tmp_path)
    assert report["count"] == 2 and report["skipped"] == 4
    assert report["skipped_reasons"] == {"unscorable label": 3, "unreadable": 1}
    assert {row["path"]: row["reason"] for row in rows if row.get("reason")} == {
        "c.png": "unscorable label: length 2, not 3-4", "d.png": "unscorable label: length 5, not 3-4",
        "e.png": "unscorable label: characters not in the charset: 'a'", "f.png": "unreadable: empty file"}
    assert [(row["length"], row["count"]) for row in report["accuracy_by_length"]] == [(3, 1), (4, 1)]


def run_main(module, capsys, *args):
    """A script's main() in this process, as its command line would run it -> what it printed."""
    capsys.readouterr()
    assert module.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_evaluate_folder_matches_the_known_figures_and_predict(known_folder, trained_run, tmp_path, capsys):
    report = json.loads(run_main(evaluate, capsys, "--model", trained_run, "--data", known_folder, "--json",
                                 "--errors", tmp_path / "errors.csv"))
    assert report["count"] == 10 and report["skipped"] == 0
    assert report["whole_string_accuracy"] == 0.6
    assert report["per_position_accuracy"] == [0.6, 0.8, 0.8, 0.8]
    with open(tmp_path / "errors.csv") as f:
        errors = {row["path"]: row for row in csv.DictReader(f)}
    assert len(errors) == 4
    confidences = [float(row["confidence"]) for row in errors.values()]
    assert confidences == sorted(confidences, reverse=True)

    run_main(predict, capsys, "--model", trained_run, known_folder, "--output", tmp_path / "read.csv")
    with open(tmp_path / "read.csv") as f:
        read = {row["path"].split("/")[-1]: row["prediction"] for row in csv.DictReader(f)}
    assert len(read) == 10
    for name, prediction in read.items():
        label = name[3:7]
        assert prediction == (errors[name]["prediction"] if name in errors else label)


def test_evaluate_held_out_split_reports_every_figure(trained_run, capsys):
    report = json.loads(run_main(evaluate, capsys, "--model", trained_run, "--json"))
    held_out, _ = data.read_labels_csv(trained_run / "test_split.csv", trained_run.parent / "data" / "synthetic")
    assert report["count"] == len(held_out) and report["skipped"] == 0
    assert 0 <= report["whole_string_accuracy"] <= 1
    assert len(report["per_position_accuracy"]) == 4 and all(0 <= a <= 1 for a in report["per_position_accuracy"])
    assert [c["coverage"] for c in report["coverage"]] == [1.0, 0.95, 0.9, 0.8]
    for key in ("per_character_accuracy", "confusions", "suspected_label_errors", "skipped_reasons"):
        assert key in report
    text = run_main(evaluate, capsys, "--model", trained_run)
    assert "whole-string accuracy" in text and "confidence coverage" in text


def test_unscorable_labels_are_counted_not_scored(recognizer, known_folder, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(known_folder, folder)
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "12345_a.png")  # wrong length
    shutil.copy(first, folder / "12ab_b.png")  # letters the model does not know
    (folder / "77777_c.png").write_bytes(b"")
    (folder / "1234_d.png").write_bytes(b"")  # a good label on a file that cannot be read
    items, _ = data.labelled_files(folder, None, None, "sensitive", (4, 4), "0123456789")
    report, rows = scoring.score_items(recognizer, items, folder)
    assert report["count"] == 10 and report["whole_string_accuracy"] == 0.6
    assert report["skipped"] == 4 and report["skipped_reasons"] == {"unscorable label": 3, "unreadable": 1}
    skipped = {row["path"]: row["reason"] for row in rows if row.get("reason")}
    assert set(skipped) == {"12345_a.png", "12ab_b.png", "77777_c.png", "1234_d.png"}
    assert skipped["1234_d.png"] == "unreadable: empty file"


def test_evaluate_refuses_data_the_model_cannot_read(recognizer, tmp_path, digits):
    (tmp_path / "abcd_1.png").write_bytes(data.find_images(digits)[0].read_bytes())
    items, _ = data.labelled_files(tmp_path, None, None, "sensitive", (4, 4), "0123456789")
    with pytest.raises(UserError, match="none of the 1 labels fit the model"):
        scoring.score_items(recognizer, items, tmp_path)


def test_recognizer_reads_paths_bytes_pil_images_and_arrays(recognizer, digits):
    path = data.find_images(digits)[0]
    image = Image.open(path)
    inputs = [path, str(path), path.read_bytes(), image, np.asarray(image.convert("RGB"))]
    readings = recognizer.predict(inputs)
    assert len({(r.text, round(r.confidence, 5)) for r in readings}) == 1
    reading = readings[0]
    assert len(reading.text) == 4 and set(reading.text) <= set("0123456789")
    assert 0 < reading.confidence <= 1 and len(reading.position_confidences) == 4
    assert reading.confidence == pytest.approx(np.prod(reading.position_confidences))


def test_predict_reads_every_good_file_and_reports_bad_ones(trained_run, known_folder, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(known_folder, folder)
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(jpeg, format="JPEG")
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[:200])
    result = run_in_process("predict.py", "--model", trained_run, folder, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(row["path"].split("/")[-1] for row in rows) == sorted(p.name for p in known_folder.iterdir())
    assert all(len(row["position_confidences"]) == 4 for row in rows)
    assert "zero.png: empty file" in result.stderr and "notes.png: not an image" in result.stderr
    assert "cut.jpg: corrupt image" in result.stderr


def test_predict_writes_csv_to_stdout_and_accepts_globs(trained_run, known_folder, capsys):
    lines = run_main(predict, capsys, "--model", trained_run, f"{known_folder}/0[0-2]_*.png").splitlines()
    assert lines[0] == "path,prediction,confidence" and len(lines) == 4


def test_existing_output_is_not_overwritten(trained_run, known_folder, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("precious")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        predict.main(["--model", str(trained_run), str(known_folder), "--output", str(out)])
    assert out.read_text() == "precious"
    assert predict.main(["--model", str(trained_run), str(known_folder), "--output", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("path,prediction,confidence")


def test_a_file_that_is_not_a_model_is_one_clear_line(tmp_path, known_folder):
    fake = tmp_path / "model.keras"
    fake.write_text("not a model")
    for script in ("predict.py", "evaluate.py"):
        args = [known_folder] if script == "predict.py" else []
        assert_one_line_error(run_in_process(script, "--model", fake, *args), "is not a model made by train.py")


def test_missing_held_out_images_are_skipped_and_a_moved_data_folder_is_named(trained_run, recognizer, tmp_path,
                                                                              capsys, monkeypatch):
    monkeypatch.setattr(Recognizer, "load", lambda *args, **kwargs: recognizer)
    run, folder = tmp_path / "run", tmp_path / "data"
    shutil.copytree(trained_run.parent / "data" / "synthetic", folder)
    run.mkdir()
    shutil.copy(trained_run / "test_split.csv", run)
    settings = yaml.safe_load((trained_run / "config.yaml").read_text())
    settings["data"]["dir"] = str(folder)
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    held_out, _ = data.read_labels_csv(run / "test_split.csv", folder)
    gone = sorted(held_out)[0]
    (folder / gone).unlink()
    report = json.loads(run_main(evaluate, capsys, "--model", run, "--json"))
    assert report["count"] == len(held_out) - 1 and report["skipped_reasons"] == {"missing file": 1}
    assert report["skipped_items"] == [{"path": gone, "label": held_out[gone], "reason": "missing file"}]
    assert "skipped 1 (1 missing file)" in run_main(evaluate, capsys, "--model", run)
    folder.rename(tmp_path / "moved")
    with pytest.raises(UserError, match=f"data folder {folder} .*{run / 'config.yaml'}.* no longer exists"):
        evaluate.main(["--model", str(run)])


@pytest.mark.parametrize("script", [predict, evaluate])
@pytest.mark.parametrize("batch_size", ["0", "-5"])
def test_a_batch_size_below_one_is_refused(script, batch_size, trained_run, known_folder):
    paths = [str(known_folder)] if script is predict else []
    with pytest.raises(UserError, match=f"batch size must be from 1 to 4096, got {batch_size}"):
        script.main(["--model", str(trained_run), *paths, "--batch-size", batch_size])


def test_a_huge_batch_size_pads_only_to_the_images_there_are():
    shapes = []

    def run_batch(batch):
        shapes.append(len(batch))
        return [np.full((len(batch), 10), 0.1)] * 4

    recognizer = Recognizer(run_batch, {"image_size": [32, 64], "charset": "0123456789", "length": 4},
                                    batch_size=100_000)
    recognizer.read(np.zeros((300, 32, 64, 3), np.uint8))  # train.py's held-out scoring of a few hundred images
    recognizer.read(np.zeros((1, 32, 64, 3), np.uint8))  # predict.py on one file
    assert shapes == [512, 1]


def test_a_bfloat16_model_reads_small_batches_through_a_float32_copy(trained_run, digits):
    """bfloat16 is slow on one captcha; the float32 copy must read exactly as the float32 model does,
    and a large batch must still be read in bfloat16."""
    from model import load_model, with_precision

    float32_model, metadata = load_model(trained_run)
    bfloat16_model = with_precision(float32_model, "mixed_bfloat16")
    run_batch = keras_batch_function(bfloat16_model)
    small, large = FLOAT32_BATCH_LIMIT, 2 * FLOAT32_BATCH_LIMIT
    pixels = np.stack([data.decode_image(path, metadata["image_size"]) for path in data.find_images(digits)[:large]])

    def gap(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))

    assert gap(run_batch(pixels[:small]), float32_model.predict_on_batch(pixels[:small])) < 1e-6
    assert gap(run_batch(pixels), bfloat16_model.predict_on_batch(pixels)) < 1e-6
    assert gap(run_batch(pixels), float32_model.predict_on_batch(pixels)) > 1e-5  # the two precisions differ
    assert keras_batch_function(float32_model) == float32_model.predict_on_batch


def test_output_files_are_checked_before_the_model_loads(trained_run, recognizer, known_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(Recognizer, "load", lambda *args, **kwargs: pytest.fail("the model loaded first"))
    errors = tmp_path / "errors.csv"
    errors.write_text("precious")
    cases = [
        (predict, [known_folder, "--output", tmp_path / "missing" / "read.csv"], "there is no folder"),
        (evaluate, ["--errors", tmp_path / "missing" / "errors.csv"], "there is no folder"),
        (evaluate, ["--errors", errors], "exists; pass --overwrite"),  # as predict.py --output
    ]
    for script, args, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            script.main(["--model", str(trained_run), *map(str, args)])
    monkeypatch.undo()
    monkeypatch.setattr(Recognizer, "load", lambda *args, **kwargs: recognizer)
    assert evaluate.main(["--model", str(trained_run), "--errors", str(errors), "--overwrite"]) == 0
    assert errors.read_text().startswith("path,label,prediction")


def test_an_interrupted_predict_leaves_no_partial_output(recognizer, known_folder, tmp_path, monkeypatch):
    def interrupted(recognizer, paths, desc="reading"):
        yield paths[0], recognizer.predict([paths[0]])[0], None
        raise KeyboardInterrupt

    monkeypatch.setattr(Recognizer, "load", lambda *args, **kwargs: recognizer)
    monkeypatch.setattr(predict, "read_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict.main(["--model", "run", str(known_folder), "--output", str(tmp_path / "out.csv")])
    assert list(tmp_path.iterdir()) == []


def test_recognizer_scales_float_and_16_bit_arrays_like_files_and_takes_one_image(recognizer, digits):
    paths = data.find_images(digits)[:8]
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    from_files = recognizer.predict(paths)
    for arrays in ([p.astype(np.float32) / 255 for p in pixels], [p.astype(np.uint16) * 257 for p in pixels]):
        np.testing.assert_array_equal(data.decode_image(arrays[0], recognizer.image_size),
                                      data.decode_image(paths[0], recognizer.image_size))
        readings = recognizer.predict(arrays)
        assert [r.text for r in readings] == [r.text for r in from_files]
        assert [r.confidence for r in readings] == pytest.approx([r.confidence for r in from_files])
    for bad in (pixels[0] - 300.0, pixels[0].astype(np.int32) * 1000, np.full((32, 64), np.nan)):
        with pytest.raises(data.ImageError, match="pixel values from"):
            recognizer.predict([bad])
    one = recognizer.predict(str(paths[0]))  # one path, not a list of characters
    assert [r.text for r in one] == [from_files[0].text]
    assert [r.text for r in recognizer.predict(pixels[0])] == [from_files[0].text]


def test_least_confident_readings_are_written_as_a_label_csv_to_correct(trained_run, known_folder, tmp_path, capsys):
    out = tmp_path / "to_label.csv"
    run_main(predict, capsys, "--model", trained_run, known_folder, "--least-confident", 4, "--output", out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    readings = Recognizer.load(trained_run).predict(sorted(known_folder.iterdir()))
    expected = sorted(zip(sorted(p.name for p in known_folder.iterdir()), readings), key=lambda x: x[1].confidence)[:4]
    assert [(row["filename"], row["label"]) for row in rows] == [(name, r.text) for name, r in expected]
    confidences = [float(row["confidence"]) for row in rows]
    assert confidences == sorted(confidences)
    table, notes = data.read_labels_csv(out, known_folder)  # what data.labels reads for the next train.py run
    assert sorted(table) == sorted(row["filename"] for row in rows) and not notes
    with pytest.raises(UserError, match="expected a .csv file"):
        predict.main(["--model", str(trained_run), str(known_folder), "--least-confident", "3", "--output",
                      str(tmp_path / "x.jsonl")])


def test_test_time_augmentation_averages_the_readings_of_shifted_and_scaled_copies(trained_run, capsys):
    seen = []

    def run_batch(batch):  # reads where each image's bright column is, as a fraction of the width
        seen.append(batch.copy())
        column = batch[..., 0].max(axis=1).argmax(axis=1) / (batch.shape[2] - 1)
        return [np.stack([column, 1 - column], axis=1)]

    metadata = {"image_size": [32, 100], "charset": "a", "length": 1}
    image = np.zeros((1, 32, 100, 3), np.uint8)
    image[:, :, 30] = 255
    plain = Recognizer(run_batch, metadata).probabilities(image)[0]
    assert plain[0, 0] == pytest.approx(30 / 99) and len(seen) == 1
    seen.clear()
    averaged = Recognizer(run_batch, metadata, test_time_augmentation=True).probabilities(image)[0]
    columns = sorted(view[0, 0, :, 0].argmax() for view in seen)
    assert len(seen) == len(TEST_TIME_VIEWS) and (seen[0] == image).all()
    assert columns[0] < 30 < columns[-1] and max(columns) - min(columns) <= 6  # moved, slightly
    assert averaged[0, 0] == pytest.approx(np.mean(columns) / 99)
    report = json.loads(run_main(evaluate, capsys, "--model", trained_run, "--json", "--tta"))
    assert report["test_time_augmentation"] and report["count"] > 0
