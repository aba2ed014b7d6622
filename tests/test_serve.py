"""serve.py as a user starts it: one server process for the module, on a free loopback port."""
import base64
import os
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, packages_but_tensorflow, run_in_process
from test_data import bomb_png

import data
from recognizer import Recognizer

MAX_BODY_BYTES = 100_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """-> (base URL, the server's log file)."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(trained_run), "--port",
                                    str(port), "--max-body-bytes", str(MAX_BODY_BYTES)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    yield url, log
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def recognizer(trained_run):
    return Recognizer.load(trained_run)


@pytest.fixture(scope="module")
def images(digits):
    return [path.read_bytes() for path in data.find_images(digits)[:32]]


def health(url):
    answer = httpx.get(f"{url}/health")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    return answer.json()


def test_every_request_shape_reads_an_image_as_the_recognizer_does(server, recognizer, images, trained_run):
    url, log = server
    content = images[0]
    expected = recognizer.predict([content])[0]
    encoded = base64.b64encode(content).decode()
    answers = {
        "raw": httpx.post(f"{url}/predict", content=content, headers={"Content-Type": "image/png"}),
        "octet-stream": httpx.post(f"{url}/predict", content=content,
                                   headers={"Content-Type": "application/octet-stream"}),
        "multipart": httpx.post(f"{url}/predict", files={"file": ("x.png", content, "image/png")}),
        "json": httpx.post(f"{url}/predict", json={"image": encoded}),
    }
    for shape, answer in answers.items():
        assert answer.status_code == 200, (shape, answer.text)
        reading = answer.json()
        assert reading["text"] == expected.text, shape
        assert reading["confidence"] == pytest.approx(expected.confidence, rel=1e-4), shape
        assert reading["position_confidences"] == pytest.approx(expected.position_confidences, rel=1e-4), shape

    # A ddddocr API client changes only the URL: the same requests, the same answer's shape.
    ddddocr_json = httpx.post(f"{url}/ocr", json={"image": encoded, "probability": False, "colors": [],
                                                  "custom_color_ranges": None})
    ddddocr_file = httpx.post(f"{url}/ocr/file", files={"file": ("x.png", content, "image/png")},
                              data={"probability": "false", "colors": "[]", "custom_color_ranges": "null"})
    for answer in (ddddocr_json, ddddocr_file):
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == expected.text and answer.json()["processing_time"] >= 0

    metadata = httpx.get(f"{url}/model").json()
    assert {"charset", "length", "image_size", "backbone"} <= metadata.keys() and metadata["file"] == "model.keras"
    assert all(metadata[key] == value for key, value in recognizer.metadata.items() if key in metadata)
    assert str(trained_run.parent) not in json.dumps(metadata)  # no local path: where the model lives is nobody's business
    assert f"Uvicorn running on {url}" in log.read_text()  # loopback only, as nobody asked for more


def corrupt_cases(content):
    """(request keyword arguments, status, fragment of the reason) for each kind of bad request."""
    return [
        ({"content": b"<html>503</html>", "headers": {"Content-Type": "image/png"}}, 400, "not an image"),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
        ({"files": {"file": ("x.png", content[:len(content) // 2], "image/png")}}, 400, "corrupt image"),
        ({"json": {"image": base64.b64encode(bomb_png()).decode()}}, 400, "too large"),
        # PostScript is not an image here: it is never handed to Ghostscript to run.
        ({"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "headers": {"Content-Type": "image/png"}},
         400, "not an image"),
        ({"content": b"\0" * (MAX_BODY_BYTES + 1), "headers": {"Content-Type": "image/png"}}, 413, "over the limit"),
        # Streamed without a declared length, the limit is enforced as it arrives.
        ({"content": iter([b"\0" * 60_000] * 2), "headers": {"Content-Type": "image/png"}}, 413, "over the limit"),
        ({"json": {"image": "not base64!"}}, 400, "base64"),
        ({"json": {"picture": "x"}}, 400, '"image"'),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"content": content, "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
        ({"files": {"note": ("note", b"x", "text/plain")}, "data": {}}, 400, "not an image"),
        ({"data": {"field": "no file"}}, 415, "application/x-www-form-urlencoded"),
    ]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, images):
    url, _ = server
    for request, status, reason in corrupt_cases(images[0]):
        answer = httpx.post(f"{url}/predict", **request)
        assert answer.status_code == status, (request.get("headers"), answer.text)
        assert reason in answer.json()["detail"], answer.json()
    ocr_cases = [
        ("/ocr", {"json": {"image": base64.b64encode(images[0]).decode(), "colors": ["red"]}}, 400, "colour"),
        ("/ocr", {"json": {"image": base64.b64encode(images[0]).decode(), "probability": "maybe"}}, 400,
         "probability"),
        ("/ocr", {"json": {"image": base64.b64encode(images[0]).decode(), "probability": "yes"}}, 400,
         "probability must be true or false"),
        ("/ocr/file", {"files": {"upload": ("x.png", images[0], "image/png")}}, 400, "no file in field file"),
        ("/ocr", {"files": {"file": ("x.png", images[0], "image/png")}}, 415, "JSON"),
        ("/ocr/file", {"json": {"image": base64.b64encode(images[0]).decode()}}, 415, "multipart"),
    ]
    for path, request, status, reason in ocr_cases:
        answer = httpx.post(f"{url}{path}", **request)
        assert answer.status_code == status and reason in answer.json()["detail"], (path, answer.text)
    health(url)
    assert httpx.post(f"{url}/predict", files={"file": ("x.png", images[0], "image/png")}).status_code == 200
    # No page that loads its scripts from a CDN, blank offline.
    assert httpx.get(f"{url}/docs").status_code == 404 and httpx.get(f"{url}/redoc").status_code == 404


def test_concurrent_requests_are_read_together_and_each_gets_its_own_answer(server, recognizer, images):
    url, _ = server
    before = health(url)
    answers = [None] * len(images)
    start = threading.Barrier(len(images))

    def send(i):
        with httpx.Client(timeout=120) as client:
            start.wait()
            answers[i] = client.post(f"{url}/ocr", json={"image": base64.b64encode(images[i]).decode(),
                                                         "probability": True})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    expected = np.stack(recognizer.probabilities(np.stack([data.decode_image(content, recognizer.image_size)
                                                           for content in images])), axis=1)
    charset = recognizer.metadata["charset"]
    for answer, probabilities in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        result = answer.json()["result"]
        # Each image's own probabilities, whatever it was batched with; its text is their reading.
        assert np.allclose(result["probabilities"], probabilities, atol=1e-5)
        assert result["text"] == "".join(charset[i] for i in np.argmax(result["probabilities"], axis=-1))
    after = health(url)
    assert after["images_read"] - before["images_read"] == len(images)
    assert after["model_calls"] - before["model_calls"] < len(images)
    assert after["largest_batch"] > 1
    assert httpx.post(f"{url}/predict", content=images[1], headers={"Content-Type": "image/png"}).json()[
        "text"] == recognizer.predict([images[1]])[0].text


def test_a_keras_model_served_on_a_cpu_points_to_its_faster_int8_export(server, trained_run):
    from model import has_gpu

    _, log = server
    command = f"serve.py --model {trained_run / 'export' / 'model.int8.onnx'}"
    assert (command in log.read_text()) == (not has_gpu()), log.read_text()


def test_command_line_mistakes_are_one_line(tmp_path):
    assert_one_line_error(run_in_process("serve.py", "--model", tmp_path / "absent"), "no model at")
    assert_one_line_error(run_in_process("serve.py", "--model", tmp_path, "--batch-size", "0"), "--batch-size")


def test_a_keras_model_is_served_under_jax_where_tensorflow_is_not_installed(trained_run, images, tmp_path):
    pytest.importorskip("jax")
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(packages_but_tensorflow(tmp_path / "site"))}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-S", str(ROOT / "serve.py"), "--model",
                                    str(trained_run / "model.keras"), "--port", str(port)], stdout=out, stderr=out,
                                   env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/predict", content=images[0],
                                    headers={"Content-Type": "image/png"})
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert answer.status_code == 200 and len(answer.json()["text"]) == 4, answer.text
    finally:
        process.terminate()
        process.wait(30)
