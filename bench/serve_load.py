"""Serving under load: serve.py against ddddocr's own server, on loopback, from one load generator.

    python bench/serve_load.py [--clients 1 8 32] [--requests 160] [--rounds 3] [--shared ../shared/data]
                               [--out bench/results] [--set KEY=VALUE ...]

Starts serve.py with the timing model (its run directory, which serve.py reads through the int8 export
where that passed its held-out check; its .keras file; its ONNX exports, float32 and int8; see
bench/latency.py) and ddddocr's
own server (bench/ddddocr_server.py: `python -m ddddocr api`, whose every OCR request fails as 1.6.1
ships it, with that bug worked around), each on a free port of 127.0.0.1 with its own defaults. For each
number of clients, the servers take turns, in an order that rotates, for --rounds rounds: each
client keeps one connection and sends ddddocr's request, POST /ocr {"image": "<base64>"}, which
serve.py takes too, one after the other, until --requests requests have been answered. Reported:
requests/s over the rounds, and the p50 and p99 latency of a request. Each number of clients is
kept under --out/serve, and a rerun skips what is kept. Needs `pip install ddddocr==1.6.1`.
"""
import argparse
import base64
import http.client
import itertools
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from bench import ROOT, add_settings_argument, on_this_machine, stage, timing_model

import atomic  # noqa: E402
import data  # noqa: E402  (bench puts the repository on the path)
from serve import DEFAULT_BATCH_WAIT_MS  # noqa: E402

IMAGES = 40
SETTLE_SECONDS = 1.0  # a pause before each server's turn (see level)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(stack, name, command, port, log):
    """Starts a server, waits until its GET /health answers -> its port."""
    out = stack.enter_context(open(log, "w"))
    process = subprocess.Popen(command, stdout=out, stderr=out, cwd=ROOT)
    stack.callback(lambda: (process.terminate(), process.wait(30)))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} server stopped; see {log}:\n{Path(log).read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return port
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{name} server did not answer in 300 s; see {log}")


def servers(stack, run_dir, exports, out, batch_wait_ms):
    """name -> port of each server, started."""
    ours = ["serve.py", "--batch-wait-ms", batch_wait_ms, "--model"]
    commands = {"run": [sys.executable, *ours, run_dir], "keras": [sys.executable, *ours, run_dir / "model.keras"],
                **{name: [sys.executable, *ours, path] for name, path in exports.items()},
                "ddddocr": [sys.executable, "bench/ddddocr_server.py"]}
    ports = {}
    for name, command in commands.items():
        port = free_port()
        ports[name] = start(stack, name, [*map(str, command), "--host", "127.0.0.1", "--port", str(port)], port,
                            out / f"{name}_server.log")
    return ports


def load(port, bodies, clients, requests):
    """clients threads, one connection each, sending requests in all -> (seconds, latencies, failures)."""
    numbers, latencies, failures = itertools.count(), [], []

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while (i := next(numbers)) < requests:
            begin = time.perf_counter()
            try:
                connection.request("POST", "/ocr", bodies[i % len(bodies)], {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                if response.status != 200 or not isinstance(answer.get("result"), str):
                    raise ValueError(f"{response.status}: {answer}")
                latencies.append(time.perf_counter() - begin)
            except (OSError, http.client.HTTPException, ValueError) as e:
                failures.append(str(e)[:200])
                connection.close()
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begin, latencies, failures


def health(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


def calls_by_batch_size(before, after):
    """Two readings of serve.py's /health -> {images read in one model call: calls} between them."""
    return {size: calls - before["batch_sizes"].get(size, 0) for size, calls in after["batch_sizes"].items()
            if calls > before["batch_sizes"].get(size, 0)}


def level(ports, bodies, clients, requests, rounds):
    names = list(ports)
    for name in names:  # each server's first requests load or trace its model: not timed
        load(ports[name], bodies, clients, 2 * clients)
    counts_before = {name: health(ports[name]) for name in names}
    seconds, latencies, failures = ({name: 0.0 for name in names}, {name: [] for name in names},
                                    {name: [] for name in names})
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            # The server before it goes quiet first: a rotation keeps each server's predecessor, and the
            # one after ddddocr's served 32 clients 0.88x as fast as the same model after ours.
            time.sleep(SETTLE_SECONDS)
            took, answered, failed = load(ports[name], bodies, clients, requests)
            seconds[name] += took
            latencies[name] += answered
            failures[name] += failed
    counts_after = {name: health(ports[name]) for name in names}
    result = {}
    for name in names:
        times = sorted(latencies[name]) or [float("nan")]
        result[name] = {"requests": rounds * requests, "failed": len(failures[name]),
                        "first_failures": failures[name][:3],
                        "requests_per_second": round(len(latencies[name]) / seconds[name], 1),
                        "p50_ms": round(1000 * statistics.median(times), 1),
                        "p99_ms": round(1000 * times[min(len(times) - 1, int(0.99 * len(times)))], 1)}
        if "batch_sizes" in counts_before[name]:  # serve.py's
            result[name]["model_calls_by_batch_size"] = calls_by_batch_size(counts_before[name], counts_after[name])
    for name in names:
        result[name]["vs_ddddocr"] = round(result[name]["requests_per_second"]
                                           / result["ddddocr"]["requests_per_second"], 2)
    return {"clients": clients, "servers": result}


def table(levels):
    lines = ["| clients | server | requests/s | vs ddddocr | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|---|"]
    names = {"run": "serve.py --model RUN", "keras": "serve.py, Keras", "onnx": "serve.py, ONNX",
             "onnx_int8": "serve.py, ONNX int8",
             "ddddocr": "ddddocr api"}
    for result in levels:
        for name, s in result["servers"].items():
            lines.append(f"| {result['clients']} | {names[name]} | {s['requests_per_second']} | {s['vs_ddddocr']}x | "
                         f"{s['p50_ms']} | {s['p99_ms']} | {s['failed']} of {s['requests']} |")
    lines.append("")
    for result in levels:
        m = result["machine"]
        lines.append(f"{result['clients']} clients, serve.py --batch-wait-ms "
                     f"{result.get('batch_wait_ms', DEFAULT_BATCH_WAIT_MS):g}: commit {m['commit']}, {m['cpu']}, {m['cores']} cores, {m['date']}; "
                     f"load average {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=160, help="requests to each server in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="serve.py's --batch-wait-ms; another than its default is kept under --out/serve_wait_MS")
    add_settings_argument(parser, "the timed model")
    args = parser.parse_args()
    shared = args.shared.resolve()
    run_dir, exports = timing_model(shared, args.out / "timing", args.set)
    paths = data.find_images(shared / "henan_4digit" / "OCR_Dataset")[:IMAGES]
    bodies = [json.dumps({"image": base64.b64encode(path.read_bytes()).decode()}) for path in paths]
    out = args.out / ("serve" if args.batch_wait_ms == DEFAULT_BATCH_WAIT_MS else f"serve_wait_{args.batch_wait_ms:g}")
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        ports = None
        levels = []
        for clients in args.clients:
            path = out / f"clients_{clients}.json"
            if ports is None and not path.exists():
                ports = servers(stack, run_dir, exports, out, args.batch_wait_ms)
            levels.append(stage(path, lambda: on_this_machine(
                lambda: {**level(ports, bodies, clients, args.requests, args.rounds),
                         "batch_wait_ms": args.batch_wait_ms})))
    summary = table(levels)
    print(summary)
    atomic.write_text(out / "results.md", summary + "\n")


if __name__ == "__main__":
    sys.exit(main())
