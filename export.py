"""Export a trained model for serving: ONNX, TFLite (LiteRT) or a TensorFlow SavedModel.

    python export.py --model RUN_DIR_OR_MODEL --format onnx|tflite|savedmodel [--out PATH] [--int8]

The export takes raw uint8 pixels (N x H x W x 3), like the .keras model, and has one softmax
output per position, named char_1..char_N (for a range of lengths each has one class more, the
blank, last: see data.encode). Its metadata (charset, length, min_length, image size, ...) is
written beside it: X.onnx -> X.onnx.json, X.tflite -> X.tflite.json, SavedModel folder D -> D.json.
predict.py and evaluate.py read exports like run directories: --model X.onnx.

Default --out: RUN_DIR/export/model.onnx, model.tflite or savedmodel; an existing export there
is replaced. Before it is put in place, the export and the float32 Keras model read up to 100
held-out images of the run (or 100 fixed random images when those cannot be found): they must
give the same text, and probabilities within PARITY_TOLERANCE, else nothing is written.

--int8 (ONNX only) quantizes the weights and activations to 8-bit integers, calibrated on up to
CALIBRATION_IMAGES of the run's training images: a model a quarter of the size, read 1.7x (one
captcha) to 2x (a folder) as fast on a CPU with AVX512-VNNI (README, "Export"). Its probabilities
differ more, so its check is on the texts: they must agree on at least INT8_AGREEMENT of the samples
the float32 model is sure of. Then it reads the run's whole held-out split, as evaluate.py does: where
it reads it at most int8_allowed_loss worse than the Keras model (as train.py recorded), an int8
export in its default place is what the run is read through (predict.run_int8_export). train.py makes
this export itself at the end of training (train.int8_export).
"""
import argparse
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from config import UserError, quiet_backend_startup, run

quiet_backend_startup()
import keras  # noqa: E402
import tensorflow  # noqa: E402  (every format here is exported through TensorFlow)

import data  # noqa: E402
from evaluate import evaluate, held_out_items  # noqa: E402
from model import load_model  # noqa: E402
from predict import (DEFAULT_BATCH_SIZE, EXPORT_LOADERS, RUN_INT8_EXPORT, SURE_CONFIDENCE, Recognizer,  # noqa: E402
                     decode_chunk, export_metadata_path, keras_batch_function)

# --format: (Keras's name for the format, default name in RUN_DIR/export/)
FORMATS = {"onnx": ("onnx", "model.onnx"), "tflite": ("litert", "model.tflite"),
           "savedmodel": ("tf_saved_model", "savedmodel")}
PARITY_SAMPLES = 100
# Largest difference of any probability between the export and the float32 Keras model. All
# three formats compute in float32; measured on Xception with confident outputs: SavedModel 0,
# ONNX 8e-7, TFLite 3e-6 (other kernels and fusions, same arithmetic). 1e-4 leaves a 30x margin
# for other models and CPUs, yet fails an export computing in float16 or bfloat16 (3e-4 and 4e-3
# on that model), let alone one with a wrong preprocessing or a lost layer.
PARITY_TOLERANCE = 1e-4
# --int8: images whose activation ranges the 8-bit model is fitted to, and the share of the float32
# model's sure readings (confidence >= SURE_CONFIDENCE) it must read alike. Xception on mixed_4_5digit,
# 256 images: the int8 export read 99.79% of the 2,351 held-out captchas, the float32 model 99.74%.
CALIBRATION_IMAGES = 256
INT8_AGREEMENT = 0.99
# The most whole-string accuracy on the held-out split that the int8 export of a run may lose against its
# Keras model and still be what the run is read through: a fifth of a point, or one captcha where that is
# more, as precision alone moves one: two runs' Keras models read one held-out captcha fewer in float32 than
# in bfloat16, as their int8 exports did (README, "Which model --model RUN reads").
INT8_MAX_HELD_OUT_LOSS = 0.002


def default_out(model_arg, form, int8=False):
    run_dir = data.model_path(model_arg).parent
    return run_dir / RUN_INT8_EXPORT if int8 else run_dir / "export" / FORMATS[form][1]


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
        _, items, _, _ = held_out_items(model_arg, None, metadata["case"])
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
        root, items, _, _ = held_out_items(model_arg, None, metadata["case"])
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


def quantize_int8(path, calibration):
    """Rewrites the ONNX model at path with 8-bit weights (per channel) and activations, the activation
    ranges fitted to calibration (uint8 images). The input scaling (the layer `normalise`) stays in
    float32: quantized, its multiply and add took 6% of one captcha's reading (3.00 against 2.82 ms, int8
    Xception at 48x120 on 2 cores), and its input, 8-bit pixels, needs no quantizing."""
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
        quantize_static(str(prepared), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=scaling)
    finally:
        prepared.unlink(missing_ok=True)


def int8_allowed_loss(images):
    """The whole-string accuracy an int8 export may lose on a held-out split of `images` and still be
    what its run is read through."""
    return max(INT8_MAX_HELD_OUT_LOSS, 1 / images)


def held_out_check(model_arg, run_batch, metadata):
    """The int8 export's whole-string accuracy on the run's held-out split, read as evaluate.py reads
    it, against the Keras model's as train.py recorded it; read_by_run: whether it loses at most
    int8_allowed_loss. None where the split cannot be read (no run beside the model, data moved)."""
    try:
        root, items, _, _ = held_out_items(model_arg, None, metadata["case"])
    except UserError:
        return None
    report, _ = evaluate(Recognizer(run_batch, metadata), items, root)
    accuracy, keras_accuracy = report["whole_string_accuracy"], metadata["held_out_whole_string_accuracy"]
    allowed = int8_allowed_loss(report["count"])
    return {"images": report["count"], "correct": report["correct"], "whole_string_accuracy": accuracy,
            "keras_whole_string_accuracy": keras_accuracy, "max_loss": allowed,
            "read_by_run": keras_accuracy - accuracy <= allowed + 1e-9}  # 1e-9: float rounding


def held_out_note(check, out, model_arg):
    """What held_out_check found, in a line: and whether the run is now read through the export."""
    if check is None:
        return (f"no held-out split to score the int8 export on (test_split.csv, config.yaml and the run's data "
                f"beside {model_arg}): the run is read by its Keras model")
    found = (f"held-out split: the int8 export reads {check['whole_string_accuracy']:.2%} ({check['correct']}/"
             f"{check['images']}), the Keras model {check['keras_whole_string_accuracy']:.2%}")
    if out.resolve() != default_out(model_arg, "onnx", int8=True).resolve():
        return found
    run_dir = data.model_path(model_arg).parent
    if check["read_by_run"]:
        return f"{found}: predict.py, evaluate.py and serve.py --model {run_dir} now read through it"
    return (f"{found}, more than the {check['max_loss']:.2%} it may lose: --model {run_dir} still reads the Keras "
            f"model; read the export as --model {out}")


def write_export(model_arg, form, out, int8=False):
    """Exports the model of model_arg (a run directory or .keras file) to out, checks it as the module
    says, and writes its metadata beside it."""
    model, metadata = load_model(model_arg)
    # The reference must compute in true float32: on recent GPUs TensorFlow would otherwise use
    # TF32 convolutions, which alone differ from float32 by more than the tolerance.
    tensorflow.config.experimental.enable_tensor_float_32_execution(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Exported and checked under a temporary name, then renamed: a crash or a failed check never
    # leaves a partial or wrong export where a good one is expected.
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    remove(partial)
    held_out = None
    try:
        export(model, form, partial, metadata["image_size"])
        if int8:
            quantize_int8(partial, calibration_images(model_arg, metadata))
        samples, source = sample_images(model_arg, metadata)
        run_batch = EXPORT_LOADERS[form](partial, metadata, DEFAULT_BATCH_SIZE)
        difference, mismatches, sure, sure_mismatches = parity(model, run_batch, metadata, samples)
        name = f"{form} int8" if int8 else form
        result = f"{name} export vs float32 Keras model on {source}: {mismatches} texts differ"
        if int8:
            result += (f", {sure_mismatches} of the {sure} it is sure of (at most {1 - INT8_AGREEMENT:.0%} may); "
                       f"largest probability difference {difference:.2g}")
            failed = sure_mismatches > (1 - INT8_AGREEMENT) * sure
        else:
            result += f", largest probability difference {difference:.2g} (tolerance {PARITY_TOLERANCE:g})"
            failed = mismatches or difference > PARITY_TOLERANCE
        if failed:
            raise UserError(f"parity check failed, nothing written: {result}")
        print(f"parity check passed: {result}")
        if int8:
            held_out = held_out_check(model_arg, run_batch, metadata)
        remove(out)
        remove(export_metadata_path(out))  # until the new one is written, the export is not read as the run
        os.replace(partial, out)
    finally:
        remove(partial)
    check = {"samples": len(samples), "source": source, "text_mismatches": mismatches,
             "max_abs_probability_difference": difference,
             **({"sure_samples": sure, "sure_text_mismatches": sure_mismatches, "agreement": INT8_AGREEMENT}
                if int8 else {"tolerance": PARITY_TOLERANCE})}
    json_path = export_metadata_path(out)
    data.write_atomically(json_path, json.dumps({**metadata, "format": form, **(
        {"quantized": "int8", "held_out_check": held_out} if int8 else {}), "parity": check}, indent=2))
    print(f"exported {out} (metadata: {json_path})")
    if int8:
        print(held_out_note(held_out, out, model_arg))


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or .keras file")
    parser.add_argument("--format", required=True, help=", ".join(FORMATS))
    parser.add_argument("--out", help="where to write (default: RUN_DIR/export/model.onnx, model.tflite or "
                                      "savedmodel, model.int8.onnx with --int8); the metadata goes beside it as .json")
    parser.add_argument("--int8", action="store_true", help="ONNX only: quantize to 8-bit integers, calibrated on the "
                                                            "run's training images")
    args = parser.parse_args(argv)

    form = args.format.lower()
    if form not in FORMATS:
        raise UserError(f"--format {args.format}: expected one of {', '.join(FORMATS)}")
    if args.int8 and form != "onnx":
        raise UserError(f"--int8 is for --format onnx, not {form}")
    out = Path(args.out) if args.out else default_out(args.model, form, args.int8)
    if form != "savedmodel" and out.suffix.lower() != f".{form}":
        raise UserError(f"--out {out}: the {form} export must be a .{form} file")
    write_export(args.model, form, out, args.int8)
    return 0


if __name__ == "__main__":
    run(main)
