"""Read captchas with a trained model.

    python predict.py --model RUN_DIR_OR_MODEL PATH... [--output FILE.csv|FILE.jsonl] [--batch-size N] [--overwrite]

A PATH is a folder (read recursively), a file or a glob. Rows are `path,prediction,confidence`;
JSONL adds the confidence of each position. An unreadable file is reported on stderr and
the others are still read; the exit status is then 1.

The model is a run directory, a .keras file, or an export made by export.py: X.onnx, X.tflite or a
SavedModel folder, with its metadata beside it (X.onnx.json, ...). An ONNX model needs only onnxruntime:
this module imports Keras and TensorFlow only when a model needs them.

From Python:
    from predict import Recognizer
    recognizer = Recognizer.load("runs/20260101-120000")
    recognizer.predict(["a.png", open("b.jpg", "rb").read(), pil_image, numpy_array])
"""
import argparse
import csv
import importlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import data
from config import UserError, quiet_backend_startup, run

DEFAULT_BATCH_SIZE = 64


class Reading(NamedTuple):
    text: str
    confidence: float  # product of the positions' confidences: the chance that the whole string is right
    position_confidences: list


class Recognizer:
    """A trained model with its metadata, which alone decides the charset, length and input size.

    run_batch: uint8 array n x H x W x 3 -> one array of probabilities per position, where n is a
    power of two up to batch_size (see padded_size)."""

    def __init__(self, run_batch, metadata, batch_size=DEFAULT_BATCH_SIZE):
        self.run_batch, self.metadata, self.batch_size = run_batch, metadata, batch_size
        self.image_size = tuple(metadata["image_size"])

    @classmethod
    def load(cls, path, batch_size=DEFAULT_BATCH_SIZE, precision="auto"):
        """path: a run directory, a .keras file or an export (.onnx, .tflite, SavedModel folder).
        precision, for a Keras model only (exports compute in float32): as train.precision; `auto`
        computes as the model was trained where this machine allows (see model.inference_precision)."""
        path, form = Path(path), export_format(path)
        if form:
            if not path.exists():
                raise UserError(f"no model at {path}")
            metadata = read_export_metadata(path)
            return cls(EXPORT_LOADERS[form](path, metadata, batch_size), metadata, batch_size)
        try:
            quiet_backend_startup()
            from model import inference_precision, load_model, with_precision
        except ImportError as e:
            raise UserError(f"reading a Keras model needs Keras and TensorFlow ({e}); an export made by export.py "
                            f"needs neither") from None

        model, metadata = load_model(path)
        policy = inference_precision(precision, metadata.get("trained_precision", "float32"))
        model = model if policy == "float32" else with_precision(model, policy)
        return cls(keras_batch_function(model), metadata, batch_size)

    def probabilities(self, pixels):
        """uint8 array N x H x W x 3 -> one N x classes array per position. Batches are padded to a
        few fixed sizes, so that the model is compiled once for each and every batch is computed
        alike, without ever computing many more images than there are."""
        outputs = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start:start + self.batch_size]
            padded = np.zeros((padded_size(len(batch), self.batch_size), *batch.shape[1:]), np.uint8)
            padded[:len(batch)] = batch
            outputs.append([np.asarray(p)[:len(batch)] for p in self.run_batch(padded)])
        if not outputs:
            return [np.zeros((0, len(self.metadata["charset"])))] * self.metadata["length"]
        return [np.concatenate(position) for position in zip(*outputs)]

    def read(self, pixels):
        """uint8 array N x H x W x 3 -> list of Reading."""
        return self.readings(np.stack(self.probabilities(pixels), axis=1))

    def readings(self, probabilities):
        """N x length x classes probabilities -> list of Reading."""
        indices = probabilities.argmax(axis=-1)
        position_confidences = probabilities.max(axis=-1)
        texts = data.decode(indices, self.metadata["charset"])
        return [Reading(text, float(np.prod(conf)), [float(c) for c in conf])
                for text, conf in zip(texts, position_confidences)]

    def predict(self, images):
        """images: paths, bytes, PIL images or numpy arrays -> list of Reading. Raises data.ImageError."""
        return self.read(np.stack([data.decode_image(image, self.image_size) for image in images])) if images else []


def keras_batch_function(model):
    """A Keras model -> its run_batch. train.py scores the held-out split through it too, so that
    the score it records is the one evaluate.py reports.

    predict_on_batch calls a compiled function already: a TensorFlow graph (XLA where Keras uses it,
    not on a CPU), a jitted JAX function. A bare tf.function of the model saved 0.2 ms a call, under
    1% of one captcha at 50x120 on a CPU, and read one captcha no faster: nothing is put around it."""
    return model.predict_on_batch


def padded_size(count, batch_size):
    """The batch shape that count images are padded to: the smallest power of two that holds
    them, at most batch_size."""
    return min(batch_size, 1 << max(0, count - 1).bit_length())


# ---------------------------------------------------------------- exported models

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


def by_position(names, length, path):
    """Output names -> the same names in position order. The exporters keep the names (char_1..char_N)
    but not always the model's order of outputs."""
    expected = [f"char_{i}" for i in range(1, length + 1)]
    if sorted(names) != sorted(expected):
        raise UserError(f"{path} has outputs {', '.join(names)}, not {', '.join(expected)}: "
                        f"it was not exported by export.py for its metadata")
    return expected


def load_onnx(path, metadata, batch_size):
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"reading {path} needs onnxruntime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    # Idle worker threads sleep instead of spinning, which took the CPU from everything else running:
    # on a busy 2-core machine one captcha read in 95 ms instead of 137 (median), a batch as fast.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime has its own exception types for a file that is not a model
        raise UserError(f"{path} is not an ONNX model onnxruntime can run: {str(e).splitlines()[0]}") from None
    outputs = by_position([o.name for o in session.get_outputs()], metadata["length"], path)
    pixels = session.get_inputs()[0].name
    return lambda batch: session.run(outputs, {pixels: batch})


def tflite_interpreter_class():
    """The lightest TFLite interpreter installed: LiteRT, then tflite-runtime, then TensorFlow's."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            pass
    try:
        quiet_backend_startup()
        import tensorflow
    except ImportError:
        raise UserError("reading a .tflite model needs a TFLite interpreter: pip install ai-edge-litert") from None
    return tensorflow.lite.Interpreter


def load_tflite(path, metadata, batch_size):
    interpreter_class = tflite_interpreter_class()
    try:
        with warnings.catch_warnings():  # TensorFlow's interpreter warns that LiteRT replaces it: it works the same
            warnings.simplefilter("ignore", UserWarning)
            interpreter = interpreter_class(model_path=str(path))
        signature = interpreter.get_signature_runner()  # it names the outputs; their indices are the interpreter's
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a TFLite model with one signature: {str(e).splitlines()[0]}") from None
    (pixels,) = signature.get_input_details().values()
    details = signature.get_output_details()
    outputs = [details[name]["index"] for name in by_position(list(details), metadata["length"], path)]
    del signature  # it holds the interpreter's internals, and resizing refuses while anything does
    interpreter.allocate_tensors()

    def run_batch(batch):
        if interpreter.get_input_details()[0]["shape"][0] != len(batch):  # resized only when the batch shape changes
            interpreter.resize_tensor_input(pixels["index"], list(batch.shape))
            interpreter.allocate_tensors()
        interpreter.set_tensor(pixels["index"], batch)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in outputs]

    return run_batch


def load_savedmodel(path, metadata, batch_size):
    quiet_backend_startup()
    import tensorflow

    try:
        serve = tensorflow.saved_model.load(str(path)).signatures["serving_default"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a SavedModel with a serving_default signature: {e}") from None
    outputs = by_position(list(serve.structured_outputs), metadata["length"], path)
    (pixels,) = serve.structured_input_signature[1]  # the signature takes keyword arguments only

    def run_batch(batch):
        probabilities = serve(**{pixels: tensorflow.constant(batch)})
        return [probabilities[name].numpy() for name in outputs]

    return run_batch


EXPORT_LOADERS = {"onnx": load_onnx, "tflite": load_tflite, "savedmodel": load_savedmodel}


# ---------------------------------------------------------------- reading files

def decode_chunk(paths, size):
    pixels, errors = [], {}
    for path in paths:
        try:
            pixels.append(data.decode_image(path, size))
        except data.ImageError as e:
            errors[path] = str(e)
    return np.stack(pixels) if pixels else np.zeros((0, *size, 3), np.uint8), errors


def read_files(recognizer, paths, desc="reading"):
    """Yields (path, Reading or None, error or None) in order. The next chunk is decoded in a
    thread while the model reads this one."""
    step = recognizer.batch_size * 4
    chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(1) as pool, tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr) as bar:
        pending = pool.submit(decode_chunk, chunks[0], recognizer.image_size) if chunks else None
        for i, chunk in enumerate(chunks):
            pixels, errors = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(decode_chunk, chunks[i + 1], recognizer.image_size)
            readings = iter(recognizer.read(pixels))
            for path in chunk:
                yield (path, None, errors[path]) if path in errors else (path, next(readings), None)
            bar.update(len(chunk))


def check_output(path, overwrite):
    if path is not None and Path(path).suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--output {path}: expected a .csv or .jsonl file")
    if path is not None and Path(path).exists() and not overwrite:
        raise UserError(f"--output {path} exists; pass --overwrite to replace it")


def open_output(path):
    """-> (file to write, function that completes it). A file is written beside its target and
    renamed into place at the end, so an interrupted run never leaves half an output."""
    if path is None:
        return sys.stdout, lambda: None
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    f = open(partial, "w", newline="", encoding="utf-8")

    def finish():
        f.close()
        os.replace(partial, path)

    return f, finish


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, .keras file or export (.onnx, .tflite, "
                                                       "SavedModel folder)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folder, file or glob")
    parser.add_argument("--output", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)

    check_output(args.output, args.overwrite)
    paths, unmatched = data.expand_paths(args.paths)
    for arg in unmatched:
        print(f"{arg}: no such file, folder or matching image", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {' '.join(args.paths)}")
    recognizer = Recognizer.load(args.model, args.batch_size)
    out, finish = open_output(args.output)
    jsonl = args.output is not None and args.output.lower().endswith(".jsonl")
    writer = None if jsonl else csv.writer(out)
    if writer:
        writer.writerow(["path", "prediction", "confidence"])
    failed = len(unmatched)
    for path, reading, error in read_files(recognizer, [str(p) for p in paths]):
        if error:
            failed += 1
            print(f"{path}: {error}", file=sys.stderr)
        elif jsonl:
            out.write(json.dumps({"path": path, "prediction": reading.text, "confidence": round(reading.confidence, 6),
                                  "position_confidences": [round(c, 6) for c in reading.position_confidences]}) + "\n")
        else:
            writer.writerow([path, reading.text, f"{reading.confidence:.6f}"])
    finish()
    if failed:
        print(f"{failed} of {len(paths) + len(unmatched)} inputs could not be read; the other rows are written",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
