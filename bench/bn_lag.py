"""Why a model trained from random initialisation reads nothing for many epochs: the same weights
scored three ways after every epoch.

    python bench/bn_lag.py --name NAME --run-dir DIR [--set section.key=value ...]

It trains with train.py's own train() and config, adding one diagnostic after every epoch, which
changes no weight: the held-out split and 300 training images are read (1) in inference mode with
Keras's moving BatchNorm averages, as evaluate.py would read them without precise BN, (2) in
inference mode after the statistics are recomputed over train.batchnorm_images training images,
the fix (then put back as they were), and (3) with BatchNorm on each batch's own statistics and no
dropout (training mode). The per-epoch figures are written beside the run as NAME.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import recompute_batchnorm  # noqa: E402
from recognizer import Recognizer, keras_batch_function  # noqa: E402

keras = train.keras


class ThreeWays(keras.callbacks.Callback):
    def __init__(self, dataset, batchnorm_images, batch_size, momentum):
        super().__init__()
        rng = np.random.default_rng(0)
        self.images, self.targets, self.batch_size, self.momentum = (dataset["images"], dataset["targets"],
                                                                     batch_size, momentum)
        self.sets = {"held_out": np.sort(dataset["test"]),
                     "train": np.sort(rng.permutation(dataset["train"])[:300])}
        self.sample = self.images[np.sort(rng.permutation(dataset["train"])[:batchnorm_images])]
        self.metadata = {"image_size": list(self.images.shape[1:3]), "charset": dataset["charset"],
                         "length": self.targets.shape[1]}
        self.epochs = []

    def on_train_begin(self, logs=None):
        for layer in self.norms():
            layer.momentum = self.momentum  # read when fit traces its training step, which comes after

    def norms(self):
        return [layer for layer in self.model.layers if isinstance(layer, keras.layers.BatchNormalization)]

    def accuracy(self, read):
        return {name: float(np.mean(np.all(read(self.images[idx]) == self.targets[idx], axis=1)))
                for name, idx in self.sets.items()}

    def inference(self, pixels):
        probabilities = Recognizer(keras_batch_function(self.model), self.metadata).probabilities(pixels)
        return np.stack([p.argmax(-1) for p in probabilities], 1)

    def batch_statistics(self, pixels):
        dropout = self.model.get_layer("dropout")
        rate, dropout.rate = dropout.rate, 0.0
        try:
            out = [np.stack([np.asarray(p).argmax(-1) for p in self.model(pixels[i:i + self.batch_size],
                                                                           training=True)], 1)
                   for i in range(0, len(pixels), self.batch_size)]
        finally:
            dropout.rate = rate
        return np.concatenate(out)

    def on_epoch_end(self, epoch, logs=None):
        started = time.perf_counter()
        saved = [layer.get_weights() for layer in self.norms()]
        row = {"epoch": epoch + 1, "moving_averages": self.accuracy(self.inference)}
        recompute_batchnorm(self.model, self.sample, self.batch_size)
        row["recomputed"] = self.accuracy(self.inference)
        row["batch_statistics"] = self.accuracy(self.batch_statistics)
        for layer, weights in zip(self.norms(), saved):
            layer.set_weights(weights)
        self.epochs.append(row)
        logs["diagnostic_seconds"] = round(time.perf_counter() - started, 1)  # not training time: the bench subtracts it
        print(f"  three ways, epoch {epoch + 1}: " + "; ".join(
            f"{way} held-out {v['held_out']:.3f} train {v['train']:.3f}" for way, v in row.items() if way != "epoch"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--momentum", type=float, default=0.99, help="every BatchNormalization layer's momentum")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = train.resolved(config.load_config(None, args.set))
    diagnostic = ThreeWays(data.load_dataset(cfg), max(cfg["train"]["batchnorm_images"], 512),
                           cfg["train"]["batch_size"], args.momentum)
    train.train(cfg, args.run_dir, extra_callbacks=[diagnostic])
    out = args.run_dir.parent / f"{args.name}.json"
    out.write_text(json.dumps({"name": args.name, "settings": args.set, "momentum": args.momentum,
                               "epochs": diagnostic.epochs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run_main(main)
