"""Reading captchas with a trained model: a Keras model or an export, and the metadata that travels with it.

The metadata alone decides the charset, lengths and input size. Reading an export (ONNX, TFLite)
imports neither Keras nor TensorFlow; they are imported only when a model needs them.

    from recognizer import Recognizer
    recognizer = Recognizer.load("runs/20260101-120000")
    recognizer.predict(["a.png", open("b.jpg", "rb").read(), pil_image, numpy_array])
"""
import functools
import importlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

import data
import run
from cli import UserError, import_keras

DEFAULT_BATCH_SIZE = 64
MAX_BATCH_SIZE = 4096  # a batch is padded only to the images it holds, but a folder fills it
# The largest batch that a model computing in bfloat16 reads in float32 instead (see keras_batch_function).
FLOAT32_BATCH_LIMIT = 8
# Test-time augmentation's views: (scale, rows down, columns right) as fractions of the input's height and
# width, the identity first; within the distortions training applies (train.augment_shift, augment_scale).
TEST_TIME_VIEWS = ((1.0, 0.0, 0.0), (1.0, 0.0, 0.02), (1.0, 0.0, -0.02), (1.0, 0.04, 0.0), (1.0, -0.04, 0.0),
                   (0.95, 0.0, 0.0), (1.05, 0.0, 0.0))
TEST_TIME_AUGMENTATION_HELP = (f"read each image as the average of {len(TEST_TIME_VIEWS)} slightly shifted and "
                               f"scaled copies of it: the model reads {len(TEST_TIME_VIEWS)} times as many images")
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
    power of two up to batch_size (see padded_size). source: the model file read, where there is one.
    test_time_augmentation: average each position's probabilities over TEST_TIME_VIEWS of every image."""

    def __init__(self, run_batch, metadata, batch_size=DEFAULT_BATCH_SIZE, source=None, test_time_augmentation=False):
        self.run_batch, self.metadata, self.batch_size, self.source = run_batch, metadata, batch_size, source
        self.test_time_augmentation = test_time_augmentation
        self.image_size = tuple(metadata["image_size"])
        self.lengths = run.model_lengths(metadata)

    @classmethod
    def load(cls, path, batch_size=DEFAULT_BATCH_SIZE, precision="auto", test_time_augmentation=False):
        """path: a run directory, a .keras file or an export (.onnx, .tflite, SavedModel folder).
        precision, for a Keras model only (exports compute in their own precision): as train.precision;
        `auto` reads a run directory through the file run.file_to_read chooses, and a Keras model as it
        was trained where this machine allows (model.inference_precision)."""
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise UserError(f"the batch size must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}")
        path = run.file_to_read(path) if precision == "auto" else run.model_path(path)
        form = run.export_format(path)
        if form:
            if not path.exists():
                raise UserError(f"no model at {path}")
            metadata = run.read_export_metadata(path)
            return cls(EXPORT_LOADERS[form](path, metadata, batch_size), metadata, batch_size, path,
                       test_time_augmentation)
        try:
            import_keras()
            from model import inference_precision, load_model, with_precision
        except ImportError as e:
            raise UserError(f"reading a Keras model needs Keras and a backend such as TensorFlow ({e}); an ONNX "
                            f"export made by export.py needs neither") from None
        model, metadata = load_model(path)
        policy = inference_precision(precision, metadata.get("trained_precision", "float32"))
        model = model if policy == "float32" else with_precision(model, policy)
        return cls(keras_batch_function(model), metadata, batch_size, path, test_time_augmentation)

    def probabilities(self, pixels):
        """uint8 array N x H x W x 3 -> one N x classes array per position. Batches are padded to a
        few fixed sizes, so that the model is compiled once for each and every batch is computed
        alike, without ever computing many more images than there are."""
        if self.test_time_augmentation and len(pixels):
            views = [self.probabilities_of_view(shifted_view(pixels, *view)) for view in TEST_TIME_VIEWS]
            return [np.mean(position, axis=0) for position in zip(*views)]
        return self.probabilities_of_view(pixels)

    def probabilities_of_view(self, pixels):
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
    float32 is faster on small ones. Which copy reads a batch depends only on its padded size, so
    train.py and evaluate.py still read each image alike. predict_on_batch is a compiled function
    already (a TensorFlow graph, a jitted JAX function): nothing is put around it."""
    if not any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in model.layers):
        return model.predict_on_batch
    from model import with_precision

    float32_copy = functools.cache(lambda: with_precision(model, "float32"))  # made at the first small batch only
    return lambda batch: (float32_copy() if len(batch) <= FLOAT32_BATCH_LIMIT else model).predict_on_batch(batch)


def shifted_view(pixels, scale, down, right):
    """uint8 N x H x W x 3 -> the same images scaled about their centre and moved by fractions of their
    height and width, each output pixel taken from the nearest input pixel, the border repeated."""
    height, width = pixels.shape[1:3]
    return pixels[:, nearest_sources(height, scale, down)][:, :, nearest_sources(width, scale, right)]


def nearest_sources(size, scale, shift):
    """For each output index along an axis of size pixels, the input index it is taken from."""
    centre = (size - 1) / 2
    return np.clip(np.rint((np.arange(size) - centre) / scale + centre - shift * size), 0, size - 1).astype(int)


def padded_size(count, batch_size):
    """The batch shape that count images are padded to: the smallest power of two that holds
    them, at most batch_size."""
    return min(batch_size, 1 << max(0, count - 1).bit_length())


# ---------------------------------------------------------------- exported models

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
    # Idle worker threads sleep instead of spinning, which would take the CPU from everything else running.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime has its own exception types for a file that is not a model
        raise UserError(f"{path} is not an ONNX model onnxruntime can run: {str(e).splitlines()[0]}") from None
    outputs = by_position([o.name for o in session.get_outputs()], metadata["length"], path)
    (pixels,) = session.get_inputs()
    check_shapes(path, metadata, pixels.shape[1:], [o.shape[-1] for o in session.get_outputs()])
    return lambda batch: session.run(outputs, {pixels.name: batch})


def check_shapes(path, metadata, input_shape, classes):
    """The export's own input shape (H, W, 3) and each output's classes must be those of its metadata."""
    expected = data.class_count(metadata["charset"], run.model_lengths(metadata))
    if list(input_shape) != [*metadata["image_size"], 3]:
        raise UserError(f"{path} takes images of {list(input_shape)}, but its metadata says image_size "
                        f"{metadata['image_size']}: the metadata beside it is not its own")
    if any(count != expected for count in classes):
        raise UserError(f"{path} reads {classes[0]} classes per position, but its metadata's charset "
                        f"{metadata['charset']!r} and lengths make {expected}: the metadata beside it is not its own")


def tflite_interpreter_class():
    """The lightest TFLite interpreter installed: LiteRT, then tflite-runtime, then TensorFlow's."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            pass
    try:
        import_keras()
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
    check_shapes(path, metadata, pixels["shape"][1:], [int(d["shape"][-1]) for d in details.values()])
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
    import_keras()
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


def least_confident(read, count):
    """The count (path, Reading) pairs of read that the model is least sure of, least sure first:
    labelling these gains the most."""
    return sorted(read, key=lambda item: item[1].confidence)[:count]


