"""The input pipeline and the training step, with and without the distortions: before and after they moved
onto the device.

    python bench/pipeline.py [--code DIR] [--set thsr_4char] [--size 48x120] [--batch 32] [--steps 20]
                             [--out bench/results/pipeline]

It times, on this machine and its Keras backend:
- loader: images per second that the training input delivers, distorted where the code distorts them
  (before: a PyDataset distorting with Pillow on the host, in the batch's threads; after: the epoch's
  uint8 arrays, which fit shuffles, the distortions being computed in the step);
- step: seconds per training step of the shipped model (Xception, random weights), with the shipped
  distortions and without, after a warm-up.
--code is the checkout to measure (a `git worktree` of an older commit measures "before"); a row is
appended to results.csv under --out, naming the commit, machine and backend.
"""
import argparse
import csv
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", default=str(ROOT))
    parser.add_argument("--set", default="thsr_4char", help="a folder under --shared whose images are timed")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--size", default="48x120")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline"))
    args = parser.parse_args()
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code))
    data, config = importlib.import_module("data"), importlib.import_module("config")
    height, width = map(int, args.size.split("x"))
    paths = data.find_images(Path(args.shared) / args.set)[:512]
    images = np.stack([data.decode_image(p, (height, width)) for p in paths])
    targets = np.random.default_rng(0).integers(0, 10, (len(images), 4)).astype(np.int32)
    train_settings = config.load_config(None, ["model.weights=none"])["train"]
    after = importlib.util.find_spec("augment") is not None
    if after:
        training, augment = importlib.import_module("training"), importlib.import_module("augment")
        keras = augment.keras
    else:
        training = importlib.import_module("train")
        keras = training.keras
    from model import build_model

    steps = args.steps + 3

    def inputs(distorted):
        """fit's inputs, as train.py gives them: before, a PyDataset distorting on the host; after, arrays."""
        if after:
            x, y = training.epoch_arrays(images, np.arange(len(images)), targets, 10, args.batch, 0, steps)
            return {"x": x, "y": y, "batch_size": args.batch, "shuffle": True}
        return {"x": training.Batches(images, np.arange(len(images)), targets, 10, args.batch, 0, steps,
                                      augmentation=training.augmentation(train_settings) if distorted else None,
                                      workers=min(8, os.cpu_count() or 1))}

    rows = []
    for distorted in (True, False):
        started = time.perf_counter()
        loader = inputs(distorted)["x"]
        if not after:
            for i in range(len(loader)):
                loader[i]
        loader_rate = steps * args.batch / (time.perf_counter() - started)
        model, _ = build_model((height, width), 4, 10, "Xception", "none")
        fitted = model
        if after:
            fitted = augment.training_model(model, augment.distortion(train_settings, 0) if distorted else None)
        fitted.compile(optimizer=keras.optimizers.Adam(1e-3), loss=[keras.losses.CategoricalCrossentropy()] * 4)
        ends = []
        timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
        fitted.fit(**inputs(distorted), epochs=1, verbose=0, callbacks=[timer])
        step = float(np.median(np.diff(ends[2:])))  # between the ends of consecutive steps, after the warm-up
        rows.append({"distortions": "on" if distorted else "off", "loader_images_per_s": f"{loader_rate:.0f}",
                     "step_s": f"{step:.3f}"})
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, new = out / "results.csv", not (out / "results.csv").exists()
    with open(table, "a", newline="") as f:
        writer = csv.DictWriter(f, ["code", "commit", "machine", "backend", "size", "batch", "distortions",
                                    "loader_images_per_s", "step_s"])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"code": "after" if after else "before", "commit": commit, "machine": machine(),
                             "backend": keras.backend.backend(), "size": args.size, "batch": args.batch, **row})


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()}-core {cpu}"


if __name__ == "__main__":
    main()
