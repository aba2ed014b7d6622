"""Serve a trained model over HTTP; requests that arrive together are read in one model call.

    python serve.py --model RUN_DIR_OR_EXPORT [--host 127.0.0.1] [--port 8000] [--batch-size 32]
                    [--batch-wait-ms 2] [--max-body-bytes 1048576]

POST /predict   one image: the raw body (Content-Type image/... or application/octet-stream), a
                multipart file, or JSON {"image": "<base64>"}
                -> {"text": "7364", "confidence": 0.98, "position_confidences": [...]}
POST /ocr       ddddocr's API request, JSON {"image": "<base64>", "probability": false}
                -> {"result": "7364", "probability": null, "processing_time": 0.02}
POST /ocr/file  ddddocr's multipart upload (field `file`), with the same answer
GET  /health    {"status": "ok", ...} and how many images the model read in how many calls
GET  /model     the model's metadata: charset, length, image_size, backbone, ... (no local paths)

A bad request is answered 4xx with {"detail": "the reason"}, and the server goes on serving.
Nothing in a request runs as code: images are decoded by data.decode_image, JSON by json.
"""
import argparse
import asyncio
import base64
import binascii
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

import data
import run
from cli import UserError, run_main
from recognizer import Recognizer, padded_size

DEFAULT_SERVE_BATCH = 32  # the most requests read in one model call
MAX_SERVE_BATCH = 1024  # warm-up reads a batch of every padded size up to it: far more would not fit in memory
DEFAULT_BATCH_WAIT_MS = 2.0
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a captcha is a few kilobytes
# What /model tells a client: how the model reads, never where its files are.
PUBLIC_METADATA = ("charset", "length", "min_length", "image_size", "case", "backbone", "trained_precision", "epoch",
                   "train_images", "held_out_images", "held_out_whole_string_accuracy", "format", "quantized")


class BodyTooLarge(Exception):
    pass


def limit_body(app, max_bytes):
    """ASGI middleware: a request body over max_bytes is refused with 413, whether its length is
    declared up front or only known as it streams in."""
    async def limited(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > max_bytes:
            return await JSONResponse(too_large(max_bytes), 413)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise BodyTooLarge()
            return message

        await app(scope, counted, send)

    return limited


def too_large(max_bytes):
    return {"detail": f"request body over the limit of {max_bytes} bytes"}


async def read_batches(recognizer, queue, batch_size, batch_wait, stats):
    """Reads the queued (pixels, future) pairs: each model call takes what is queued when the
    model is free, and, while a burst is under way (the call before read more than one image, or
    more than one is queued), what else arrives, each within batch_wait seconds of the one before,
    up to batch_size images. A lone client never waits: the wait cost it its length on every
    request."""
    model_thread = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    last_batch = 0
    while True:
        batch = [await queue.get()]
        burst = last_batch > 1 or not queue.empty()
        while batch_wait and burst and 1 + queue.qsize() < batch_size:
            queued = queue.qsize()
            await asyncio.sleep(batch_wait)
            if queue.qsize() == queued:  # nothing arrived: the burst is over
                break
        while len(batch) < batch_size and not queue.empty():
            batch.append(queue.get_nowait())
        pixels = np.stack([item[0] for item in batch])
        try:
            probabilities = await loop.run_in_executor(
                model_thread, lambda: np.stack(recognizer.probabilities(pixels), axis=1))
            results = zip(recognizer.readings(probabilities), probabilities)
        except Exception as e:  # the model failed: every request of the batch is told, the server goes on
            results = [e] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():  # its client went away
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        last_batch = len(batch)
        stats["model_calls"] += 1
        stats["images_read"] += len(batch)
        stats["largest_batch"] = max(stats["largest_batch"], len(batch))
        stats["batch_sizes"][len(batch)] = stats["batch_sizes"].get(len(batch), 0) + 1


# ---------------------------------------------------------------- reading requests

def media_type(request):
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def unsupported(request, accepted):
    return HTTPException(415, f"Content-Type {media_type(request) or '(none)'} is not accepted here; "
                              f"send {accepted}")


async def json_object(request):
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        raise HTTPException(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, 'expected a JSON object like {"image": "<base64>"}')
    return body


def base64_image(body):
    image = body.get("image")
    if not isinstance(image, str) or not image.strip():
        raise HTTPException(400, '"image" must be a non-empty base64 string')
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, '"image" is not valid base64') from None


async def multipart_form(request):
    try:
        return await request.form(max_files=1)
    except Exception as e:  # Starlette's MultiPartException and python-multipart's parse errors
        if isinstance(e, BodyTooLarge):
            raise
        raise HTTPException(400, f"the multipart body cannot be read: {getattr(e, 'detail', e)}") from None


async def uploaded_file(form, field=None):
    """The uploaded file: the one in `field` where given (ddddocr's API names it), else the only one."""
    files = [value for name, value in form.items() if isinstance(value, UploadFile) and field in (None, name)]
    if not files:
        raise HTTPException(400, f"the multipart body holds no file{f' in field {field}' if field else ''}; send "
                                 f"the image as a file field, e.g. {field or 'file'}=@x.png")
    return await files[0].read()


def flag(value, name):
    """ddddocr's booleans: true or false, in JSON or as form text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise HTTPException(400, f"{name} must be true or false")


async def json_fields(request):
    """ddddocr's JSON request -> (image bytes, probability, colors, custom_color_ranges)."""
    body = await json_object(request)
    return base64_image(body), body.get("probability", False), body.get("colors"), body.get("custom_color_ranges")


async def form_fields(request):
    """ddddocr's multipart upload -> (image bytes, probability, colors, custom_color_ranges)."""
    form = await multipart_form(request)
    try:
        colors = json.loads(form.get("colors") or "[]")
    except (TypeError, ValueError):
        raise HTTPException(400, "colors must be a JSON list") from None
    return await uploaded_file(form, "file"), form.get("probability", "false"), colors, form.get("custom_color_ranges")


def no_colour_filter(colors, custom_color_ranges):
    """ddddocr can filter colours before reading; this model reads the captcha as it was trained."""
    if colors or (custom_color_ranges and custom_color_ranges != "null"):
        raise HTTPException(400, "colour filtering (colors, custom_color_ranges) is not supported: the model "
                                 "reads captchas as they come")


# ---------------------------------------------------------------- the app

def create_app(recognizer, batch_size=DEFAULT_SERVE_BATCH, batch_wait=DEFAULT_BATCH_WAIT_MS / 1000,
               max_body_bytes=DEFAULT_MAX_BODY_BYTES):
    stats = {"model_calls": 0, "images_read": 0, "largest_batch": 0, "batch_sizes": {}}  # size -> model calls
    queue = None

    @asynccontextmanager
    async def lifespan(app):
        nonlocal queue
        queue = asyncio.Queue()
        reader = asyncio.create_task(read_batches(recognizer, queue, batch_size, batch_wait, stats))
        yield
        reader.cancel()

    # No /docs: its page loads its scripts from a CDN, which an offline server cannot reach.
    app = FastAPI(title="captcha recogniser", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(limit_body, max_bytes=max_body_bytes)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, exc):
        return JSONResponse(too_large(max_body_bytes), 413)

    async def read(content):
        """Image bytes -> (Reading, probabilities of each position), read with whatever else is queued."""
        try:
            pixels = await asyncio.to_thread(data.decode_image, content, recognizer.image_size)
        except data.ImageError as e:
            raise HTTPException(400, f"image: {e}") from None
        future = asyncio.get_running_loop().create_future()
        await queue.put((pixels, future))
        return await future

    def ddddocr_answer(result, probability, start):
        reading, probabilities = result
        answer = reading.text
        if probability:  # ddddocr's keys; here one probability row per position, and the whole string's confidence
            charset = list(recognizer.metadata["charset"])
            charset += [""] * (probabilities.shape[-1] - len(charset))  # a range of lengths: the blank, as ddddocr writes it
            answer = {"text": reading.text, "probabilities": probabilities.tolist(),
                      "charset": charset, "confidence": reading.confidence}
        return {"result": answer, "probability": None, "processing_time": time.perf_counter() - start}

    @app.post("/predict")
    async def predict(request: Request):
        kind = media_type(request)
        if kind == "application/json":
            content = base64_image(await json_object(request))
        elif kind == "multipart/form-data":
            content = await uploaded_file(await multipart_form(request))
        elif kind.startswith("image/") or kind == "application/octet-stream":
            content = await request.body()
        else:
            raise unsupported(request, "the image as the body (image/... or application/octet-stream), "
                                       "a multipart file, or JSON {\"image\": \"<base64>\"}")
        reading, _ = await read(content)
        return reading._asdict()

    async def ddddocr_request(request, kind, accepted, fields):
        """ddddocr's request, of Content-Type kind, its fields read by fields(request) -> ddddocr's answer."""
        start = time.perf_counter()
        if media_type(request) != kind:
            raise unsupported(request, accepted)
        content, probability, colors, colour_ranges = await fields(request)
        no_colour_filter(colors, colour_ranges)
        return ddddocr_answer(await read(content), flag(probability, "probability"), start)

    @app.post("/ocr")
    async def ocr(request: Request):
        return await ddddocr_request(request, "application/json", 'JSON {"image": "<base64>"}', json_fields)

    @app.post("/ocr/file")
    async def ocr_file(request: Request):
        return await ddddocr_request(request, "multipart/form-data", "a multipart upload with the image in field file",
                                     form_fields)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": queue.qsize(), **stats}

    @app.get("/model")
    async def model():
        return {"file": recognizer.source.name, **{key: recognizer.metadata[key] for key in PUBLIC_METADATA
                                                   if key in recognizer.metadata}}

    return app


def warm_up(recognizer, batch_size):
    """Reads once at every batch shape a request can meet, so that no client waits for a first call."""
    for size in sorted({padded_size(n, batch_size) for n in range(1, batch_size + 1)}):
        recognizer.read(np.zeros((size, *recognizer.image_size, 3), np.uint8))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, .keras file or export (.onnx, .tflite, "
                                                       "SavedModel folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                            "machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_SERVE_BATCH,
                        help=f"most images in one model call, at most {MAX_SERVE_BATCH}")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="how long a model call waits for more requests to join it")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies are refused with 413")
    args = parser.parse_args(argv)
    if not 1 <= args.batch_size <= MAX_SERVE_BATCH:
        raise UserError(f"--batch-size must be from 1 to {MAX_SERVE_BATCH}, got {args.batch_size}")
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch-wait-ms must not be negative, got {args.batch_wait_ms:g}")
    if args.max_body_bytes < 1:
        raise UserError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")

    recognizer = Recognizer.load(args.model, args.batch_size)
    print(f"serving {recognizer.source}", file=sys.stderr)
    if not run.export_format(recognizer.source):  # a Keras model, so Keras is loaded already
        from model import has_gpu

        if not has_gpu():
            int8 = run.run_dir_of(args.model) / run.INT8_EXPORT
            print(f"note: on a CPU an int8 export reads one captcha about 4x as fast as Keras: python export.py "
                  f"--model {run.run_dir_of(args.model)} --format onnx --int8 makes it, then serve.py --model "
                  f"{int8}", file=sys.stderr)
    warm_up(recognizer, args.batch_size)
    app = create_app(recognizer, args.batch_size, args.batch_wait_ms / 1000, args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    run_main(main)
