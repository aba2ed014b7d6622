"""Shared fixtures: tiny synthetic data and one tiny trained run, made once per session.

Everything is small (32x64 inputs, a few hundred images, weights=none, MobileNet), so the suite
needs no network and runs in minutes on two CPU cores.
"""
import contextlib
import fcntl
import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import synth  # noqa: E402

# MobileNet: the backbone quickest to trace and to step through of those with BatchNorm, as tracing a
# training step costs more than everything else in a tiny run (Xception's takes about 40 s on two
# cores, MobileNet's 25). The default, Xception, is built in tests/test_train.py.
# No int8 export: it adds an ONNX conversion to every run, and the tests that want one ask for it.
TINY = ["data.image_size=[32,64]", "model.weights=none", "model.backbone=MobileNet", "train.batch_size=16",
        "train.precision=float32", "train.min_steps=0", "train.int8_export=false"]


def overrides(*extra, cache_dir):
    return [*TINY, f"data.cache_dir={cache_dir}", *extra]


def copy_digits(digits, folder, count, start=0):
    folder.mkdir(exist_ok=True)
    for path in data.find_images(digits)[start:start + count]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def run_script(script, *args, env=None, cwd=None, timeout=300):
    """Runs one of the project's scripts as a user would; -> CompletedProcess with text output."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


def run_in_process(script, *args):
    """The same, in this process: main() under cli.run_main, as the script's command line runs it, without
    a second TensorFlow start-up -> CompletedProcess with what it printed."""
    import cli

    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli.run_main(lambda: module.main([str(a) for a in args]))
    return subprocess.CompletedProcess([script, *args], exit_.value.code or 0, out.getvalue(), err.getvalue())


def packages_but_tensorflow(folder):
    """folder, holding a link to every installed package but TensorFlow: with `python -S` and it as
    PYTHONPATH, Python sees what a GPU machine with JAX and no TensorFlow has (tensorboard among it)."""
    folder.mkdir()
    for site in (Path(p) for p in sys.path if p.endswith("site-packages")):
        for entry in site.iterdir():
            if not entry.name.startswith(("tensorflow", "tf_keras")) and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def assert_one_line_error(result, *fragments):
    """A user's mistake: non-zero exit, no traceback, and a message naming what was wrong."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """120 four-digit captchas, labelled in their file names."""
    folder = tmp_path_factory.mktemp("digits")
    synth.draw_set(folder, 120, [4, 4], "0123456789", (32, 64), seed=1)
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def made_once(tmp_path_factory, name, make):
    """A session fixture's folder, made by make(folder) once for all of pytest-xdist's workers: the
    first makes it under a lock, the others wait for it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's, not an earlier one's
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / name / "made").exists():
            shutil.rmtree(shared / name, ignore_errors=True)
            (shared / name).mkdir()
            make(shared / name)
            (shared / name / "made").touch()
    return shared / name


@pytest.fixture(scope="session")
def varied_run(tmp_path_factory, cache_dir):
    """A run on captchas of 3 or 4 digits (data.length=3-4): 80 drawn 4:1 by `data.py synth --length 3-4`,
    trained for one epoch at data.image_size=auto, made tiny like every test's input (32x160,
    the least width for 4 characters and a spare column, not 40x152). Shared by the tests of training,
    reading, evaluating and exporting it."""
    import config
    import train

    def make(work):
        data.main(["synth", "--out", str(work / "images"), "--count", "80", "--length", "3-4", "--charset",
                   "0123456789", "--size", "32x128", "--seed", "2"])
        cfg = config.load_config(None, overrides(f"data.dir={work / 'images'}", "data.length=3-4", "train.epochs=1",
                                                 "data.image_size=auto",
                                                 "data.charset=0123456789", cache_dir=cache_dir))
        pixels, data.AUTO_PIXELS = data.AUTO_PIXELS, 32 * 64
        try:
            train.train(cfg, work / "run")
        finally:
            data.AUTO_PIXELS = pixels

    return made_once(tmp_path_factory, "varied", make) / "run"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """The shipped config's embedded default, a synthetic set generated on first use (made small
    here), trained for two epochs from a fresh working directory, on the tiny settings."""
    import config
    import train

    def make(work):
        cwd, default_set = os.getcwd(), synth.DEFAULT_SET
        os.chdir(work)
        synth.DEFAULT_SET = {**default_set, "count": 120}
        try:
            cfg = config.load_config(None, overrides("train.epochs=2", "data.charset=0123456789",
                                                     cache_dir=cache_dir))
            train.train(cfg, work / "run")
        finally:
            os.chdir(cwd)
            synth.DEFAULT_SET = default_set

    return made_once(tmp_path_factory, "work", make) / "run"
