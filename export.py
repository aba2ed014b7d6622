"""Export a trained model for serving: ONNX, TFLite (LiteRT) or a TensorFlow SavedModel.

    python export.py --model RUN_DIR_OR_MODEL --format onnx|tflite|savedmodel [--out PATH] [--int8] [--overwrite]

The export takes raw uint8 pixels (N x H x W x 3), like the .keras model, and has one softmax
output per position, named char_1..char_N (for a range of lengths each has one class more, the
blank, last). Its metadata (charset, length, min_length, image size, ...) is written beside it:
X.onnx -> X.onnx.json, X.tflite -> X.tflite.json, SavedModel folder D -> D.json. predict.py and
evaluate.py read exports like run directories: --model X.onnx.

Default --out: RUN_DIR/export/model.onnx, model.tflite or savedmodel (model.int8.onnx with --int8); an
existing export is replaced only with --overwrite. Before it is put in place, the export and the
float32 Keras model read up to 100 held-out images of the run (or 100 fixed random images when those
cannot be found): they must give the same text, and probabilities within 1e-4, else nothing is written.

--int8 (ONNX only) quantizes the weights and activations to 8-bit integers, calibrated on up to 256
of the run's training images. Its check is on the texts the float32 model is sure of; then it reads
the run's whole held-out split, and where it reads it as well as the Keras model (run.int8_verdict),
`--model RUN` reads through it. train.py makes this export itself at the end of training.
"""
import argparse
from pathlib import Path

from cli import UserError, run_main
from exporting import FORMATS, default_out, write_export


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or .keras file")
    parser.add_argument("--format", required=True, help=", ".join(FORMATS))
    parser.add_argument("--out", help="where to write (default: RUN_DIR/export/model.onnx, model.tflite or "
                                      "savedmodel, model.int8.onnx with --int8); the metadata goes beside it as .json")
    parser.add_argument("--int8", action="store_true", help="ONNX only: quantize to 8-bit integers, calibrated on the "
                                                            "run's training images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)

    form = args.format.lower()
    if form not in FORMATS:
        raise UserError(f"--format {args.format}: expected one of {', '.join(FORMATS)}")
    if args.int8 and form != "onnx":
        raise UserError(f"--int8 is for --format onnx, not {form}")
    out = Path(args.out) if args.out else default_out(args.model, form, args.int8)
    if form != "savedmodel" and out.suffix.lower() != f".{form}":
        raise UserError(f"--out {out}: the {form} export must be a .{form} file")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    write_export(args.model, form, out, args.int8)
    return 0


if __name__ == "__main__":
    run_main(main)
