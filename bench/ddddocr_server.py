"""ddddocr 1.6.1's own API server, as `python -m ddddocr api` runs it, with its one bug worked around.

    python bench/ddddocr_server.py [--host 127.0.0.1] [--port 8000]

As shipped, its POST /ocr and /ocr/file call DdddOcr.classification(image, colors=...,
custom_color_ranges=...), keywords that classification names color_filter_colors and
color_filter_custom_ranges: every request fails with 500 (TypeError). Here classification takes
those keywords too, and everything else is ddddocr's: its FastAPI app (ddddocr.api.app), its
handlers, and uvicorn with one worker, as its main() starts it.
"""
import argparse

import ddddocr
import uvicorn

shipped = ddddocr.DdddOcr.classification


def classification(self, img, png_fix=False, probability=False, colors=None, custom_color_ranges=None):
    return shipped(self, img, png_fix=png_fix, probability=probability, color_filter_colors=colors or None,
                   color_filter_custom_ranges=custom_color_ranges or None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    ddddocr.DdddOcr.classification = classification
    from ddddocr.api.app import app

    uvicorn.run(app, host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
