"""Data parallelism through each backend's own engine, on CPU devices standing in for GPUs."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, overrides, packages_but_tensorflow


def training_args(run_dir, digits, cache_dir, *extra):
    settings = overrides("train.epochs=1", "train.batch_size=8", "train.distribute=data_parallel", "data.max_train_images=32",
                         f"data.dir={digits}", *extra, cache_dir=cache_dir)
    return ["--run-dir", str(run_dir), *[arg for s in settings for arg in ("--set", s)]]


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_distributed_tensorflow_mirrored_over_two_logical_cpus(tmp_path, digits, cache_dir):
    script = ("import sys, tensorflow as tf\n"
              "cpu = tf.config.list_physical_devices('CPU')[0]\n"
              "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
              f"sys.path.insert(0, {str(ROOT)!r})\n"
              "import cli, train\n"
              "cli.run_main(lambda: train.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, *training_args(tmp_path / "run", digits, cache_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 16 over 2 devices" in result.stdout
    assert len(history(tmp_path / "run")) == 1 and (tmp_path / "run" / "model.keras").exists()


def test_distributed_jax_data_parallel_over_two_host_devices_without_tensorflow(tmp_path, digits, cache_dir):
    """Also the end-to-end run under the JAX backend where TensorFlow is not installed: a JAX-trained
    model loads under TensorFlow."""
    pytest.importorskip("jax")
    import model

    result = subprocess.run([sys.executable, "-S", str(ROOT / "train.py"), *training_args(tmp_path / "run", digits,
                                                                                          cache_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(packages_but_tensorflow(
                                tmp_path / "site")), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 16 over 2 devices" in result.stdout
    assert json.loads((tmp_path / "run" / "metadata.json").read_text())["backend"] == "jax"
    keras_model, _ = model.load_model(tmp_path / "run")
    assert len(keras_model.outputs) == 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_tensorflow_two_worker_processes_on_loopback(tmp_path, digits, cache_dir):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    run_dir = tmp_path / "run"
    workers = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *training_args(run_dir, digits, cache_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                            "task": {"type": "worker", "index": i}})})
               for i in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert all("batch 16 over 2 devices" in stdout for stdout, _ in outputs)
    first, second = history(run_dir), history(tmp_path / "run.worker_1")
    assert len(first) == len(second) == 1
    assert first[0]["loss"] == second[0]["loss"]  # the same synchronised steps on both
    assert (run_dir / "model.keras").exists()
