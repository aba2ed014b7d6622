"""Read captchas with a trained model.

    python predict.py --model RUN_DIR_OR_MODEL PATH... [--output FILE.csv|FILE.jsonl] [--html FILE.html]
                      [--least-confident N] [--batch-size N] [--overwrite]

A PATH is a folder (read recursively), a file or a glob. Rows are `path,prediction,confidence`;
JSONL adds the confidence of each position. An unreadable file is reported on stderr and
the others are still read; the exit status is then 1. --html writes a review page of the readings,
least confident first, to correct them into labels (see review.py). --least-confident N writes
only the N least confident readings, as a label CSV to correct: the captchas to label next.

The model is a run directory, a .keras file, or an export made by export.py: X.onnx, X.tflite or a
SavedModel folder, with its metadata beside it (X.onnx.json, ...). A run directory is read through its
int8 export, RUN/export/model.int8.onnx, where train.py or export.py --int8 wrote one there and found
that it reads the run's held-out split as well as the Keras model (see run_int8_export); its .keras
file is always read by Keras. An ONNX model needs only onnxruntime: this module imports Keras and
TensorFlow only when a model needs them.

From Python:
    from predict import Recognizer
    recognizer = Recognizer.load("runs/20260101-120000")
    recognizer.predict(["a.png", open("b.jpg", "rb").read(), pil_image, numpy_array])
    least_confident(list(zip(paths, recognizer.predict(paths))), 100)  # the captchas to label next
"""
import argparse
import contextlib
import csv
import functools
import importlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

import data
import review
from config import UserError, quiet_backend_startup, run

DEFAULT_BATCH_SIZE = 64
# Where train.py and export.py --int8 put a run's int8 export, which the run is read through (run_int8_export).
RUN_INT8_EXPORT = Path("export") / "model.int8.onnx"
# The largest batch that a model computing in bfloat16 reads in float32 instead (see keras_batch_function).
FLOAT32_BATCH_LIMIT = 8
# A reading at least this confident is trusted: evaluate.py suspects the label of a wrong one, and a
# review page calls the others unsure.
SURE_CONFIDENCE = 0.9


class Reading(NamedTuple):
    text: str
    confidence: float  # product of the positions' confidences: the chance that the whole string is right
    position_confidences: list  # the probability of what the text puts at each position (past its end: the blank)


class Recognizer:
    """A trained model with its metadata, which alone decides the charset, lengths and input size.

    run_batch: uint8 array n x H x W x 3 -> one array of probabilities per position, where n is a
    power of two up to batch_size (see padded_size). source: the model file read, where there is one."""

    def __init__(self, run_batch, metadata, batch_size=DEFAULT_BATCH_SIZE, source=None):
        self.run_batch, self.metadata, self.batch_size, self.source = run_batch, metadata, batch_size, source
        self.image_size = tuple(metadata["image_size"])
        self.lengths = data.model_lengths(metadata)

    @classmethod
    def load(cls, path, batch_size=DEFAULT_BATCH_SIZE, precision="auto"):
        """path: a run directory, a .keras file or an export (.onnx, .tflite, SavedModel folder).
        precision, for a Keras model only (exports compute in their own precision): as train.precision;
        `auto` reads a run directory through its int8 export where it reads the held-out split as well
        as the Keras model (see run_int8_export), else computes as the model was trained where this
        machine allows (see model.inference_precision)."""
        if batch_size < 1:
            raise UserError(f"the batch size must be at least 1, got {batch_size}")
        path, form = Path(path), export_format(path)
        int8 = run_int8_export(path) if precision == "auto" else None
        if int8:
            return cls.load(int8, batch_size)
        if form:
            if not path.exists():
                raise UserError(f"no model at {path}")
            metadata = read_export_metadata(path)
            return cls(EXPORT_LOADERS[form](path, metadata, batch_size), metadata, batch_size, path)
        try:
            quiet_backend_startup()
            from model import inference_precision, load_model, with_precision
        except ImportError as e:
            raise UserError(f"reading a Keras model needs Keras and TensorFlow ({e}); an export made by export.py "
                            f"needs neither") from None

        model, metadata = load_model(path)
        policy = inference_precision(precision, metadata.get("trained_precision", "float32"))
        model = model if policy == "float32" else with_precision(model, policy)
        return cls(keras_batch_function(model), metadata, batch_size, data.model_path(path))

    def probabilities(self, pixels):
        """uint8 array N x H x W x 3 -> one N x classes array per position. Batches are padded to a
        few fixed sizes, so that the model is compiled once for each and every batch is computed
        alike, without ever computing many more images than there are."""
        outputs = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start:start + self.batch_size]
            missing = padded_size(len(batch), self.batch_size) - len(batch)
            padded = np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), np.uint8)]) if missing else batch
            outputs.append([np.asarray(p)[:len(batch)] for p in self.run_batch(padded)])
        if not outputs:
            return [np.zeros((0, data.class_count(self.metadata["charset"], self.lengths)))] * self.lengths[1]
        return outputs[0] if len(outputs) == 1 else [np.concatenate(position) for position in zip(*outputs)]

    def read(self, pixels):
        """uint8 array N x H x W x 3 -> list of Reading."""
        return self.readings(np.stack(self.probabilities(pixels), axis=1))

    def readings(self, probabilities):
        """N x length x classes probabilities -> list of Reading. The text is each position's likeliest
        class, up to the first blank. A position's confidence is the probability of what the text puts
        there, the blank past its end, so that a character the text leaves out after a blank lowers it.
        A text shorter than the model's shortest length is a reading the model is unsure of: confidence 0."""
        charset, (shortest, longest) = self.metadata["charset"], self.lengths
        texts = data.decode(probabilities.argmax(axis=-1), charset)
        read = data.encode(texts, charset, longest)
        position_confidences = np.take_along_axis(probabilities, read[..., None], axis=-1)[..., 0]
        return [Reading(text, float(np.prod(conf)) if len(text) >= shortest else 0.0, [float(c) for c in conf])
                for text, conf in zip(texts, position_confidences)]

    def predict(self, images):
        """images: a list of paths, bytes, PIL images or numpy arrays, or one of them -> list of Reading,
        one per image. Raises data.ImageError."""
        one = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)
        if isinstance(images, one) or (isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]  # not a list of characters, bytes or rows of pixels
        if not len(images):
            return []
        return self.read(np.stack([data.decode_image(image, self.image_size) for image in images]))


def keras_batch_function(model):
    """A Keras model -> its run_batch. train.py scores the held-out split through it too, so that
    the score it records is the one evaluate.py reports.

    A model computing in bfloat16 (on a CPU that has it natively) reads batches of at most
    FLOAT32_BATCH_LIMIT images through a float32 copy of itself: bfloat16 pays on large batches,
    float32 is faster on small ones (README, "One captcha at a time"). Which copy reads a batch
    depends only on its padded size, so train.py and evaluate.py still read each image alike.

    predict_on_batch calls a compiled function already: a TensorFlow graph (XLA where Keras uses it,
    not on a CPU), a jitted JAX function. A bare tf.function of the model saved 0.2 ms a call, under
    1% of one captcha at 50x120 on a CPU, and read one captcha no faster: nothing is put around it."""
    if not any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in model.layers):
        return model.predict_on_batch
    from model import with_precision

    float32_copy = functools.cache(lambda: with_precision(model, "float32"))  # made at the first small batch only
    return lambda batch: (float32_copy() if len(batch) <= FLOAT32_BATCH_LIMIT else model).predict_on_batch(batch)


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


def run_int8_export(path):
    """RUN/export/model.int8.onnx, for a run directory whose model it was made from, where export.py
    (run by train.py, or by hand with --int8) found that it reads the run's held-out split whole at
    most export.int8_allowed_loss worse than the Keras model: on a CPU with 8-bit dot products
    it reads one captcha 4x, and a folder 2x, as fast (README, "One captcha at a time"). Else None."""
    path = Path(path)
    int8 = path / RUN_INT8_EXPORT
    if not int8.is_file() or not export_metadata_path(int8).is_file():  # also None for a .keras file
        return None
    metadata = read_export_metadata(int8)
    made_from = data.read_metadata(path)
    same_model = all(metadata.get(key) == value for key, value in made_from.items())
    return int8 if same_model and metadata.get("held_out_check", {}).get("read_by_run") else None


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
    # (One captcha on one thread instead: the int8 export no faster, the float32 one 8.6 ms against 6.8.)
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


def check_output(path, overwrite, option="--output", suffixes=(".csv", ".jsonl")):
    """Refuses an output file that could not be written, or that would be replaced unasked:
    before the slow work, not after it."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: expected a {' or '.join(suffixes)} file")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: there is no folder {path.parent}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder")
    if path.exists() and not overwrite:
        raise UserError(f"{option} {path} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def open_output(path):
    """Yields the file to write. A file is written beside its target and renamed into place at the
    end, so an interrupted run never leaves half an output, and removes what it had written."""
    if path is None:
        yield sys.stdout
        return
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", newline="", encoding="utf-8") as f:
            yield f
    except BaseException:  # Ctrl-C too
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def least_confident(read, count):
    """The count (path, Reading) pairs of read that the model is least sure of, least sure first:
    labelling these gains the most."""
    return sorted(read, key=lambda item: item[1].confidence)[:count]


def inputs_root(paths):
    """The folder that holds every input: the data.dir that labels written for them are relative to."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def write_to_label(out, read, root):
    """(path, Reading) pairs as a label CSV that data.labels reads, each reading the label to correct."""
    writer = csv.writer(out)
    writer.writerow(["filename", "label", "confidence"])
    for path, reading in read:
        writer.writerow([data.shown_path(os.path.abspath(path), root).replace(os.sep, "/"), reading.text,
                         f"{reading.confidence:.6f}"])


def write_review(path, model, paths, read, metadata):
    """The review page of read = [(path, Reading)], least confident first, each reading the label to correct.
    Its paths are relative to the folder that holds every input, the data.dir to train on."""
    root = inputs_root(paths)
    shown = [(data.shown_path(os.path.abspath(p), root), reading) for p, reading in read]
    cards = [{"path": name, "label": None, "reading": reading.text, "confidence": reading.confidence,
              "suspected": False} for name, reading in sorted(shown, key=lambda item: item[1].confidence)]
    review.write_page(path, f"Readings of {len(read)} captchas, least confident first", model, root, cards,
                      [(name, reading.text) for name, reading in shown], metadata, SURE_CONFIDENCE)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, .keras file or export (.onnx, .tflite, "
                                                       "SavedModel folder)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folder, file or glob")
    parser.add_argument("--output", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    parser.add_argument("--html", help="also write a review page, least confident first, to correct the readings "
                                       "into labels")
    parser.add_argument("--least-confident", type=int, metavar="N",
                        help="write only the N readings the model is least sure of, least sure first, as a label CSV "
                             "(filename,label,confidence) relative to the folder of the inputs: the captchas to "
                             "label next")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output or --html file")
    args = parser.parse_args(argv)

    if args.least_confident is not None and args.least_confident < 1:
        raise UserError(f"--least-confident must be at least 1, got {args.least_confident}")
    check_output(args.output, args.overwrite, suffixes=(".csv",) if args.least_confident else (".csv", ".jsonl"))
    if args.html:
        review.check_page_path(args.html, args.overwrite)
    paths, unmatched = data.expand_paths(args.paths)
    for arg in unmatched:
        print(f"{arg}: no such file, folder or matching image", file=sys.stderr)
    if not paths:
        raise UserError(f"no images found in {' '.join(args.paths)}")
    recognizer = Recognizer.load(args.model, args.batch_size)
    jsonl = args.output is not None and args.output.lower().endswith(".jsonl")
    failed, read = len(unmatched), []
    with open_output(args.output) as out:
        writer = None if jsonl or args.least_confident else csv.writer(out)
        if writer:
            writer.writerow(["path", "prediction", "confidence"])
        for path, reading, error in read_files(recognizer, [str(p) for p in paths]):
            if error:
                failed += 1
                print(f"{path}: {error}", file=sys.stderr)
            elif args.least_confident:
                pass  # written once every reading is in
            elif jsonl:
                out.write(json.dumps({"path": path, "prediction": reading.text,
                                      "confidence": round(reading.confidence, 6),
                                      "position_confidences": [round(c, 6) for c in reading.position_confidences]})
                          + "\n")
            else:
                writer.writerow([path, reading.text, f"{reading.confidence:.6f}"])
            if reading and (args.html or args.least_confident):
                read.append((path, reading))
        if args.least_confident:
            write_to_label(out, least_confident(read, args.least_confident), inputs_root(paths))
    if args.html:
        write_review(args.html, args.model, paths, read, recognizer.metadata)
    if failed:
        print(f"{failed} of {len(paths) + len(unmatched)} inputs could not be read; the other rows are written",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
