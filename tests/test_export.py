"""export.py and reading its exports with predict.py. Exporting is slow (ONNX ~20 s), so each
format is exported once for the module and the tests read what it wrote."""
import contextlib
import csv
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, packages_but_tensorflow, run_in_process, run_script

import data
import export
import exporting
from cli import UserError
from recognizer import Recognizer, by_position, load_onnx
import run as run_module
from run import export_metadata_path, file_digest, read_metadata


def run_export(*args):
    """export.main in this process (no second TensorFlow start-up) -> what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export.main([str(a) for a in args]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """format -> (export, what export.py printed), each in its default place in the run."""
    return {"onnx": (trained_run / "export" / "model.onnx", run_export("--model", trained_run, "--format", "onnx")),
            "tflite": (trained_run / "export" / "model.tflite",
                       run_export("--model", trained_run, "--format", "tflite")),
            "savedmodel": (trained_run / "export" / "savedmodel",
                           run_export("--model", trained_run / "model.keras", "--format", "savedmodel"))}


@pytest.fixture(scope="module")
def keras_model(trained_run):
    return Recognizer.load(trained_run, batch_size=8, precision="float32")


@pytest.fixture(scope="module")
def held_out(trained_run):
    labels, _ = data.read_labels_csv(trained_run / "test_split.csv", trained_run.parent / "data" / "synthetic")
    return [trained_run.parent / "data" / "synthetic" / name for name in sorted(labels)]


@pytest.mark.parametrize("form", ["onnx", "tflite", "savedmodel"])
def test_each_format_writes_the_model_its_metadata_and_passes_parity(exports, trained_run, held_out, form):
    path, printed = exports[form]
    assert (path / "saved_model.pb").is_file() if form == "savedmodel" else path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if "partial" in p.name]
    json_path = export_metadata_path(path)
    assert json_path.name == {"onnx": "model.onnx.json", "tflite": "model.tflite.json", "savedmodel": "savedmodel.json"}[form]
    written = json.loads(json_path.read_text())
    parity, made_from, digest = written.pop("parity"), written.pop("made_from"), written.pop("sha256")
    assert written == {**read_metadata(trained_run), "format": form}
    assert made_from["sha256"] == file_digest(trained_run / "model.keras") and digest == file_digest(path)
    assert parity["samples"] == len(held_out) and "held-out" in parity["source"]
    assert parity["text_mismatches"] == 0 and parity["tolerance"] == exporting.PARITY_TOLERANCE
    assert 0 <= parity["max_abs_probability_difference"] <= exporting.PARITY_TOLERANCE
    assert f"parity check passed: {form} export" in printed and "0 texts differ" in printed
    assert f"exported {path}" in printed


@pytest.mark.parametrize("form", ["onnx", "tflite", "savedmodel"])
def test_an_export_reads_as_the_float32_keras_model(exports, keras_model, held_out, form):
    exported = Recognizer.load(exports[form][0], batch_size=8)  # 3 batches, the last padded
    assert exported.metadata["charset"] == "0123456789" and exported.image_size == (32, 64)
    expected, actual = keras_model.predict(held_out), exported.predict(held_out)
    assert [r.text for r in actual] == [r.text for r in expected]
    assert np.allclose([r.position_confidences for r in actual], [r.position_confidences for r in expected],
                       rtol=0, atol=exporting.PARITY_TOLERANCE)
    pixels = np.stack([data.decode_image(p, (32, 64)) for p in held_out])
    for want, got in zip(keras_model.probabilities(pixels), exported.probabilities(pixels)):  # every class, in order
        assert np.abs(want - got).max() <= exporting.PARITY_TOLERANCE


def test_an_export_of_a_length_range_passes_parity_and_reads_as_keras(varied_run):
    """Each output of a range of lengths has one class more, the blank: the export keeps it, in its place."""
    printed = run_export("--model", varied_run, "--format", "onnx")
    assert "parity check passed: onnx export vs float32 Keras model on 8 held-out images: 0 texts differ" in printed
    exported = Recognizer.load(varied_run / "export" / "model.onnx")
    assert exported.lengths == [3, 4]
    keras_model = Recognizer.load(varied_run, precision="float32")
    labels, _ = data.read_labels_csv(varied_run / "test_split.csv", varied_run.parent / "images")
    pixels = np.stack([data.decode_image(varied_run.parent / "images" / name, keras_model.image_size)
                       for name in sorted(labels)])
    for want, got in zip(keras_model.probabilities(pixels), exported.probabilities(pixels)):
        assert got.shape == (8, 11) and np.abs(want - got).max() <= exporting.PARITY_TOLERANCE
    expected, actual = keras_model.read(pixels), exported.read(pixels)
    assert [r.text for r in actual] == [r.text for r in expected]
    assert np.allclose([r.position_confidences for r in actual], [r.position_confidences for r in expected],
                       rtol=0, atol=exporting.PARITY_TOLERANCE)


def test_outputs_are_put_in_position_order_by_name():
    assert by_position(["char_3", "char_1", "char_2"], 3, "m.onnx") == ["char_1", "char_2", "char_3"]
    with pytest.raises(UserError, match="not exported by export.py"):
        by_position(["output_0", "output_1"], 2, "m.onnx")
    with pytest.raises(UserError, match="not exported by export.py"):
        by_position(["char_1", "char_2"], 3, "m.onnx")


def test_predict_command_reads_onnx_without_tensorflow_or_keras(exports, keras_model, trained_run, held_out, tmp_path):
    blocked = tmp_path / "blocked"  # these shadow the installed packages: importing either fails
    for package in ("tensorflow", "keras"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed')\n")
    folder = tmp_path / "images"
    folder.mkdir()
    for path in held_out:
        shutil.copy(path, folder)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")]))}
    result = run_script("predict.py", "--model", exports["onnx"][0], folder, env=env)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["prediction"] for row in rows] == [r.text for r in keras_model.predict(sorted(folder.iterdir()))]
    # The same blocked environment refuses a Keras model in one line.
    assert_one_line_error(run_script("predict.py", "--model", trained_run, folder, env=env), "needs Keras")


def test_a_failed_parity_check_writes_nothing(exports, trained_run, tmp_path, monkeypatch):
    """A model with no run beside it is checked on random images; a failed check keeps nothing."""
    shutil.copy(trained_run / "model.keras", tmp_path / "model.keras")
    # The module's TFLite export stands in for a fresh one (the exporting itself is tested above).
    monkeypatch.setattr(exporting, "export", lambda model, form, path, size: shutil.copy(exports["tflite"][0], path))
    monkeypatch.setattr(exporting, "PARITY_TOLERANCE", -1.0)  # no difference can pass
    with pytest.raises(UserError, match=r"parity check failed, nothing written: .*100 random images"):
        run_export("--model", tmp_path / "model.keras", "--format", "tflite")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["export", "model.keras"]


def test_user_errors_are_one_line(exports, trained_run, held_out, tmp_path):
    with pytest.raises(UserError, match="--format pt: expected one of onnx, tflite, savedmodel"):
        export.main(["--model", str(trained_run), "--format", "pt"])
    with pytest.raises(UserError, match="must be a .onnx file"):
        export.main(["--model", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "model.tflite")])
    with pytest.raises(UserError, match="no model at"):
        export.main(["--model", str(tmp_path / "missing"), "--format", "onnx"])
    fake = tmp_path / "fake.keras"
    fake.write_text("not a model")
    assert_one_line_error(run_in_process("export.py", "--model", fake, "--format", "onnx"), "not a model made by train.py")

    alone = tmp_path / "alone.onnx"  # an export without its metadata
    shutil.copy(exports["onnx"][0], alone)
    assert_one_line_error(run_in_process("predict.py", "--model", alone, held_out[0]), "expected", "alone.onnx.json")
    (tmp_path / "text.onnx").write_text("not a model")
    shutil.copy(export_metadata_path(exports["onnx"][0]), tmp_path / "text.onnx.json")
    with pytest.raises(UserError, match="is not an ONNX model"):
        Recognizer.load(tmp_path / "text.onnx")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None or importlib.util.find_spec("jax2onnx") is not None,
                    reason="needs JAX without jax2onnx, which exports under JAX")
def test_an_onnx_export_under_the_jax_backend_without_jax2onnx_says_what_to_do(trained_run, tmp_path):
    result = run_script("export.py", "--model", trained_run, "--format", "onnx", "--out", tmp_path / "model.onnx",
                        env={"KERAS_BACKEND": "jax"})
    assert_one_line_error(result, "under the Keras backend jax", "jax2onnx", "KERAS_BACKEND=tensorflow")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def int8_run(trained_run, tmp_path_factory):
    """-> (a copy of the run with an int8 export in its default place, what export.py printed). A copy:
    the run is then read through the export, and other modules read the run itself meanwhile. The
    tiny model reads near chance, so its int8 copy may read a held-out captcha otherwise: here any
    loss is allowed (the refusal has its own test)."""
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("int8") / "run", ignore=shutil.ignore_patterns("export"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "INT8_MAX_HELD_OUT_LOSS", 1.0)
        return run, run_export("--model", run, "--format", "onnx", "--int8")


def test_an_int8_onnx_export_is_quantized_checked_on_texts_and_read_by_predict(exports, keras_model, int8_run,
                                                                                held_out):
    run, printed = int8_run
    path = run / "export" / "model.int8.onnx"
    assert "parity check passed: int8 export vs float32 Keras model on 12 held-out images" in printed
    metadata = json.loads(export_metadata_path(path).read_text())
    assert metadata["quantized"] == "int8" and metadata["parity"]["agreement"] == exporting.INT8_AGREEMENT
    assert metadata["parity"]["sure_text_mismatches"] <= (1 - exporting.INT8_AGREEMENT) * metadata["parity"]["sure_samples"]
    # 8-bit weights: about a quarter of the float32 export's size.
    assert path.stat().st_size < 0.4 * exports["onnx"][0].stat().st_size
    # The input scaling computes in float32 (faster): its nodes take no dequantized input.
    import onnx

    nodes = onnx.load(str(path)).graph.node
    dequantized = {output for node in nodes if node.op_type == "DequantizeLinear" for output in node.output}
    scaling = [node for node in nodes if "/normalise" in node.name]
    assert scaling and not any(set(node.input) & dequantized for node in scaling)
    readings = Recognizer.load(path).predict(held_out)
    assert [len(r.position_confidences) for r in readings] == [4] * len(held_out)
    assert all(r.text and set(r.text) <= set("0123456789") and 0 <= r.confidence <= 1 for r in readings)


def test_a_run_is_read_through_its_int8_export_as_scored_on_its_held_out_split(int8_run, held_out):
    run, printed = int8_run
    int8, keras_file = run / "export" / "model.int8.onnx", run / "model.keras"
    check = json.loads(export_metadata_path(int8).read_text())["held_out_check"]
    assert check["images"] == 12 and check["read_by_run"]
    assert check["keras_whole_string_accuracy"] == read_metadata(run)["held_out_whole_string_accuracy"]
    assert f"predict.py, evaluate.py and serve.py --model {run} now read through it" in printed
    recognizer = Recognizer.load(run)
    assert recognizer.source == int8 and recognizer.metadata["quantized"] == "int8"
    assert recognizer.predict(held_out) == Recognizer.load(int8).predict(held_out)
    # What the export recorded is what evaluate.py reports for the run, which names the file it read.
    report = json.loads(run_in_process("evaluate.py", "--model", run, "--json").stdout)
    assert (report["model"], report["whole_string_accuracy"]) == (str(int8), check["whole_string_accuracy"])
    # The .keras file, or a precision asked for, reads the Keras model.
    assert Recognizer.load(keras_file).source == keras_file
    assert Recognizer.load(run, precision="float32").source == keras_file


def test_a_run_is_read_by_keras_where_its_int8_export_loses_accuracy_or_was_made_from_another_model(
        trained_run, int8_run, monkeypatch, tmp_path):
    from model import load_model, save_model

    monkeypatch.setattr(run_module, "int8_allowed_loss", lambda images: -1.0)  # it would have to read 100 points better
    source, _ = int8_run
    run = shutil.copytree(source, tmp_path / "run")
    int8 = run / "export" / "model.int8.onnx"
    metadata = read_metadata(run)
    check = exporting.held_out_check(run, load_onnx(int8, metadata, 64), metadata)
    assert not check["read_by_run"]
    assert "still reads the Keras model; read the export as --model" in exporting.held_out_note(check, int8, run)
    written = json.loads(export_metadata_path(int8).read_text())
    export_metadata_path(int8).write_text(json.dumps({**written, "held_out_check": check}))
    assert Recognizer.load(run).source == run / "model.keras"

    export_metadata_path(int8).write_text(json.dumps(written))  # accepted again
    assert Recognizer.load(run).source == int8
    model, _ = load_model(run)
    save_model(model, run / "model.keras", {**metadata, "epoch": metadata["epoch"] + 1})  # another model
    assert Recognizer.load(run).source == run / "model.keras"


def test_an_int8_export_that_reads_sure_captchas_otherwise_is_refused(trained_run, monkeypatch, tmp_path):
    """The tiny model is sure of nothing, and its int8 copy reads many of its held-out images otherwise:
    counted as sure, they fail the check."""
    monkeypatch.setattr(exporting, "SURE_CONFIDENCE", 0.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError, match=r"parity check failed, nothing written: int8 export .*: of the 12 it is "
                                        r"sure of, \d+ read otherwise \(at most 1% may\)"):
        run_export("--model", trained_run, "--format", "onnx", "--int8", "--out", out)
    assert not list(tmp_path.iterdir())


def test_int8_needs_onnx_and_the_run_s_training_images(trained_run, tmp_path):
    with pytest.raises(UserError, match="--int8 is for --format onnx, not tflite"):
        export.main(["--model", str(trained_run), "--format", "tflite", "--int8"])
    shutil.copy(trained_run / "model.keras", tmp_path / "model.keras")
    assert_one_line_error(run_in_process("export.py", "--model", tmp_path / "model.keras", "--format", "onnx",
                                         "--int8"), "calibrates on the run's training images")
    assert not (tmp_path / "export" / "model.int8.onnx").exists()


def test_a_damaged_or_foreign_int8_export_is_not_read_and_the_run_falls_back_to_keras(int8_run, exports, tmp_path,
                                                                                    capsys):
    source, _ = int8_run
    run = shutil.copytree(source, tmp_path / "run")
    int8 = run / "export" / "model.int8.onnx"
    assert Recognizer.load(run).source == int8
    good = int8.read_bytes()
    for damage in (lambda: int8.write_bytes(good[:len(good) // 2]),  # truncated
                   lambda: shutil.copy(exports["onnx"][0], int8),  # another model's export, with this one's metadata
                   lambda: export_metadata_path(int8).write_text("{not json")):
        damage()
        assert Recognizer.load(run).source == run / "model.keras"
        warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and str(int8) in warning[0] and "reading" in warning[0]
    shutil.copytree(source / "export", run / "export", dirs_exist_ok=True)
    assert Recognizer.load(run).source == int8


def test_an_export_whose_metadata_is_not_its_own_is_one_line(exports, held_out, tmp_path):
    onnx_file = shutil.copy(exports["onnx"][0], tmp_path / "model.onnx")
    metadata = json.loads(export_metadata_path(exports["onnx"][0]).read_text())
    for wrong, fragment in (({"image_size": [48, 120]}, "takes images of [32, 64, 3], but its metadata says"),
                            ({"charset": metadata["charset"] + "X"}, "reads 10 classes per position")):
        export_metadata_path(onnx_file).write_text(json.dumps({**metadata, **wrong}))
        assert_one_line_error(run_in_process("predict.py", "--model", onnx_file, held_out[0]), fragment)


def test_a_run_is_read_and_served_where_tensorflow_is_not_installed(int8_run, held_out, tmp_path):
    """Through its int8 export, which needs onnxruntime alone: predict.py and serve.py import neither
    TensorFlow nor Keras for it."""
    run, _ = int8_run
    env = {**os.environ, "PYTHONPATH": str(packages_but_tensorflow(tmp_path / "site"))}
    result = subprocess.run([sys.executable, "-S", str(ROOT / "predict.py"), "--model", str(run), str(held_out[0])],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(f"{held_out[0]},")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-S", str(ROOT / "serve.py"), "--model", str(run), "--port", str(port)],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        answer = wait_for(lambda: httpx.post(f"http://127.0.0.1:{port}/predict", content=held_out[0].read_bytes(),
                                             headers={"Content-Type": "image/png"}), server)
        assert answer.status_code == 200 and set(answer.json()) == {"text", "confidence", "position_confidences"}
    finally:
        server.terminate()
        assert "model.int8.onnx" in server.communicate(timeout=30)[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(request, process, seconds=120):
    """request() once the server process answers it."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            return request()
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
