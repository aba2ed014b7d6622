"""What every command line shares: a user's mistake is one line, and outputs are checked before slow work."""
import csv
import importlib.util
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's data, config or command line: shown as one line, no traceback."""


def run_main(main, interrupted="interrupted"):
    """Runs a script's main(): a user's mistake is one line on stderr, not a traceback."""
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def check_output(path, overwrite, option, suffixes):
    """Refuses an output file that could not be written, or that would be replaced unasked: before
    the slow work, not after it."""
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


# A spreadsheet evaluates a cell that starts with one of these: a file named `=HYPERLINK(...).png` must
# reach it as text. A leading apostrophe makes it text there, and read_csv_cell takes it off again.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    text = str(value)
    return f"'{text}" if text.startswith(FORMULA_STARTS) or (text.startswith("'") and text[1:2] in
                                                              (*FORMULA_STARTS, "'")) else text


def read_csv_cell(text):
    return text[1:] if text.startswith("'") and text[1:2] in (*FORMULA_STARTS, "'") else text


class CsvWriter:
    """csv.writer whose rows are safe to open in a spreadsheet (see FORMULA_STARTS)."""

    def __init__(self, f):
        self.writer = csv.writer(f)

    def writerow(self, row):
        self.writer.writerow([csv_cell(cell) for cell in row])

    def writerows(self, rows):
        for row in rows:
            self.writerow(row)


def import_keras():
    """Imports Keras with TensorFlow's start-up notices hidden: they are printed on stderr before its
    log level applies (TF_CPP_MIN_LOG_LEVEL hides only the later ones)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" or not importlib.util.find_spec("tensorflow"):
        import keras

        return keras
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras
        import tensorflow

        tensorflow.config.list_physical_devices("GPU")  # looking for a GPU logs too
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras
