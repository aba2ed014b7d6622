"""Exporting a trained model for serving: ONNX, TFLite (LiteRT) or a TensorFlow SavedModel, checked against it.

The export takes raw uint8 pixels (N x H x W x 3), like the .keras model, and has one softmax
output per position, named char_1..char_N. Its metadata is the model's, with what the check found
and the digests that tie it to the model it was made from (run.int8_problem reads them).
"""
import json
import warnings
from pathlib import Path

import numpy as np

import atomic
import data
import run
from cli import UserError, import_keras
from model import load_model
from recognizer import DEFAULT_BATCH_SIZE, EXPORT_LOADERS, SURE_CONFIDENCE, Recognizer, decode_chunk, keras_batch_function
from scoring import score_items

keras = import_keras()

# --format: (Keras's name for the format, default name in RUN_DIR/export/)
FORMATS = {"onnx": ("onnx", "model.onnx"), "tflite": ("litert", "model.tflite"),
           "savedmodel": ("tf_saved_model", "savedmodel")}
PARITY_SAMPLES = 100
# Largest difference of any probability between the export and the float32 Keras model. All three formats
# compute in float32 (other kernels and fusions, same arithmetic), which keeps them well inside it, yet an
# export computing in float16 or bfloat16 fails it, let alone one with a wrong preprocessing or a lost layer.
PARITY_TOLERANCE = 1e-4
# --int8: images whose activation ranges the 8-bit model is fitted to, and the share of the float32
# model's sure readings (confidence >= SURE_CONFIDENCE) it must read alike.
CALIBRATION_IMAGES = 256
INT8_AGREEMENT = 0.99


def default_out(model_arg, form, int8=False):
    run_dir = run.run_dir_of(model_arg)
    return run_dir / run.INT8_EXPORT if int8 else run_dir / "export" / FORMATS[form][1]


def export(model, form, path, image_size):
    """Writes model to path in Keras's exporter for form, with its outputs named char_1..char_N."""
    # Keras's model returns a list, which the exporters name by index (Identity_1, output_1, ...);
    # the same layers returning a dict make every format name its outputs by the dict's keys.
    named = keras.Model(model.inputs, dict(zip(model.output_names, model.outputs)), name=model.name)
    named([np.zeros((1, *image_size, 3), np.uint8)])  # the ONNX exporter refuses a model never called
    with warnings.catch_warnings():  # Keras's tf2onnx patch probes numpy for a removed alias, which warns
        warnings.simplefilter("ignore", FutureWarning)
        try:
            named.export(str(path), format=FORMATS[form][0], verbose=False)
        except ImportError as e:  # e.g. ONNX under the JAX backend, which needs jax2onnx
            raise UserError(f"the {form} export under the Keras backend {keras.backend.backend()} failed: {e}; "
                            f"or run with KERAS_BACKEND=tensorflow") from None


def sample_images(model_arg, metadata):
    """-> (up to PARITY_SAMPLES held-out images of the run, or as many fixed random ones; description)."""
    size = tuple(metadata["image_size"])
    try:
        _, items, _, _ = run.held_out_items(run.run_dir_of(model_arg), None, metadata["case"])
    except UserError:  # no test_split.csv or config.yaml beside the model
        items = []
    pixels = []
    for path, _ in items:
        try:
            pixels.append(data.decode_image(path, size))
        except data.ImageError:
            continue
        if len(pixels) == PARITY_SAMPLES:
            break
    if pixels:
        return np.stack(pixels), f"{len(pixels)} held-out images"
    random = np.random.default_rng(0).integers(0, 256, (PARITY_SAMPLES, *size, 3), dtype=np.uint8)
    return random, f"{PARITY_SAMPLES} random images (no held-out images found)"


def parity(model, run_batch, metadata, samples):
    """-> (largest absolute difference of any probability, number of samples read differently,
    number of samples the float32 model is sure of, number of those read differently)."""
    expected, actual = (Recognizer(batch_function, metadata) for batch_function in (keras_batch_function(model), run_batch))
    expected_probabilities, actual_probabilities = expected.probabilities(samples), actual.probabilities(samples)
    difference = max(float(np.abs(e - a).max()) for e, a in zip(expected_probabilities, actual_probabilities))
    readings = [recognizer.readings(np.stack(p, axis=1))
                for recognizer, p in ((expected, expected_probabilities), (actual, actual_probabilities))]
    differ = [e.text != a.text for e, a in zip(*readings)]
    sure = [e.confidence >= SURE_CONFIDENCE for e in readings[0]]
    return difference, sum(differ), sum(sure), sum(d and s for d, s in zip(differ, sure))


def calibration_images(model_arg, metadata):
    """Up to CALIBRATION_IMAGES of the run's images outside its held-out split, evenly spread."""
    try:
        root, items, _, _ = run.held_out_items(run.run_dir_of(model_arg), None, metadata["case"])
    except UserError:
        raise UserError(f"--int8 calibrates on the run's training images, and {model_arg} has none beside it: "
                        f"export from the run directory, with its data folder in place") from None
    held_out = {Path(path) for path, _ in items}
    paths = [path for path in data.find_images(root) if path not in held_out]
    pixels, _ = decode_chunk(paths[::max(1, len(paths) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES],
                             tuple(metadata["image_size"]))  # unreadable files are left out
    if not len(pixels):
        raise UserError(f"--int8: no readable training images in {root} to calibrate on")
    return pixels


def quantize_int8(path, calibration, per_channel=True):
    """Rewrites the ONNX model at path with 8-bit weights (per output channel, or one scale per tensor)
    and activations, the activation ranges fitted to calibration (uint8 images). The input scaling (the
    layer `normalise`) stays in float32: its input, 8-bit pixels, needs no quantizing, and quantized it
    costs more than it saves."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + 32] for i in range(0, len(calibration), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    prepared = path.with_name(f"{path.stem}.prepared.onnx")
    try:
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)  # folds what onnxruntime would
        scaling = [node.name for node in onnx.load(str(prepared)).graph.node if "/normalise" in node.name]
        quantize_static(str(prepared), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=scaling)
    finally:
        prepared.unlink(missing_ok=True)


def held_out_check(model_arg, run_batch, metadata):
    """The int8 export's reading of the run's held-out split, as evaluate.py reads it, against the Keras
    model's as train.py recorded it -> run.int8_verdict. None where the split cannot be read (no run
    beside the model, data moved)."""
    try:
        root, items, _, _ = run.held_out_items(run.run_dir_of(model_arg), None, metadata["case"])
    except UserError:
        return None
    report, _ = score_items(Recognizer(run_batch, metadata), items, root)
    return run.int8_verdict(report["correct"], report["count"], metadata["held_out_whole_string_accuracy"])


def held_out_note(check, out, model_arg):
    """What held_out_check found, in a line: and whether the run is now read through the export."""
    if check is None:
        return (f"no held-out split to score the int8 export on (test_split.csv, config.yaml and the run's data "
                f"beside {model_arg}): the run is read by its Keras model")
    found = (f"held-out split: the int8 export reads {check['whole_string_accuracy']:.2%} ({check['correct']}/"
             f"{check['images']}), the Keras model {check['keras_whole_string_accuracy']:.2%}")
    if out.resolve() != default_out(model_arg, "onnx", int8=True).resolve():
        return found
    run_dir = run.run_dir_of(model_arg)
    if check["read_by_run"]:
        return f"{found}: predict.py, evaluate.py and serve.py --model {run_dir} now read through it"
    return (f"{found}, more than the {check['max_loss']:.2%} it may lose: --model {run_dir} still reads the Keras "
            f"model; read the export as --model {out}")


def parity_result(form, int8, source, samples, difference, mismatches, sure, sure_mismatches):
    """-> (what the parity check found, in a line; whether it failed)."""
    if not int8:
        return (f"{form} export vs float32 Keras model on {source}: {mismatches} texts differ, largest probability "
                f"difference {difference:.2g} (tolerance {PARITY_TOLERANCE:g})",
                bool(mismatches or difference > PARITY_TOLERANCE))
    if not sure:
        return (f"int8 export vs float32 Keras model on {source}: the float32 model is sure (confidence >= "
                f"{SURE_CONFIDENCE}) of none of them, so their texts were not compared; largest probability "
                f"difference {difference:.2g}", False)
    return (f"int8 export vs float32 Keras model on {source}: of the {sure} it is sure of, {sure_mismatches} read "
            f"otherwise (at most {1 - INT8_AGREEMENT:.0%} may); {mismatches} of all {samples} texts differ; "
            f"largest probability difference {difference:.2g}", sure_mismatches > (1 - INT8_AGREEMENT) * sure)


def write_export(model_arg, form, out, int8=False):
    """Exports the model of model_arg (a run directory or .keras file) to out, checks it as the module
    says, and writes its metadata beside it, with the digests of both files."""
    import tensorflow  # every format here is exported through TensorFlow

    model, metadata = load_model(model_arg)
    # The reference must compute in true float32: on recent GPUs TensorFlow would otherwise use
    # TF32 convolutions, which alone differ from float32 by more than the tolerance.
    tensorflow.config.experimental.enable_tensor_float_32_execution(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    held_out = None
    # Until the new metadata is written, no export is read as the run: a crash leaves the Keras model read.
    atomic.remove(run.export_metadata_path(out))
    with atomic.replacing(out) as partial:
        samples, source = sample_images(model_arg, metadata)
        # Weights per channel first; where that reads the samples otherwise, one scale per tensor: on some
        # models (Xception trained for a few minutes, for one) per-channel weights lose the texts outright.
        for per_channel in (True, False) if int8 else (None,):
            export(model, form, partial, metadata["image_size"])
            if int8:
                quantize_int8(partial, calibration_images(model_arg, metadata), per_channel)
            run_batch = EXPORT_LOADERS[form](partial, metadata, DEFAULT_BATCH_SIZE)
            difference, mismatches, sure, sure_mismatches = parity(model, run_batch, metadata, samples)
            result, failed = parity_result(form, int8, source, len(samples), difference, mismatches, sure,
                                           sure_mismatches)
            if not failed:
                break
            if per_channel:
                print(f"int8 weights per channel fail the parity check ({result}); trying one scale per tensor")
        if failed:
            raise UserError(f"parity check failed, nothing written: {result}")
        print(f"parity check passed: {result}")
        if int8:
            held_out = held_out_check(model_arg, run_batch, metadata)
        if out.is_dir():  # a SavedModel folder is not replaced by a rename onto it
            atomic.remove(out)
    check = {"samples": len(samples), "source": source, "text_mismatches": mismatches,
             "max_abs_probability_difference": difference,
             **({"sure_samples": sure, "sure_text_mismatches": sure_mismatches, "agreement": INT8_AGREEMENT}
                if int8 else {"tolerance": PARITY_TOLERANCE})}
    keras_file = run.model_path(model_arg)
    json_path = run.export_metadata_path(out)
    atomic.write_text(json_path, json.dumps({
        **metadata, "format": form,
        **({"quantized": "int8", "weights_per_channel": per_channel, "held_out_check": held_out} if int8 else {}),
        "parity": check, "sha256": run.file_digest(out),
        "made_from": {"model": str(keras_file.resolve()), "sha256": run.file_digest(keras_file)}}, indent=2))
    print(f"exported {out} (metadata: {json_path})")
    if int8:
        print(held_out_note(held_out, out, model_arg))
