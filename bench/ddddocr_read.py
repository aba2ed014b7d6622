"""Reads every image of a folder with the pretrained OCR ddddocr, as it ships; a benchmark peer.

    python bench/ddddocr_read.py FOLDER --output FILE.csv

Run as its own process, so that its whole-process time compares with predict.py's.
"""
import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    import ddddocr

    ocr = ddddocr.DdddOcr(show_ad=False)
    with open(args.output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction"])
        for path in data.find_images(args.folder):
            writer.writerow([str(path), ocr.classification(path.read_bytes())])


if __name__ == "__main__":
    main()
