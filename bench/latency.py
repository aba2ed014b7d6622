"""One captcha at a time: Recognizer.predict([one image]) against ddddocr.classification, in one process.

    python bench/latency.py [--shared ../shared/data] [--images 40] [--rounds 5] [--out bench/results]
                            [--set KEY=VALUE ...]

The calls are interleaved on the same real henan_4digit captchas (JPEG bytes, decoding included),
in an order that rotates, so that a busy machine slows each alike: compare the ratios. Then the
folder speed, in the same process: the same readers taking turns on 128 captchas, ours in one call.
Ours: the run directory as Recognizer.load reads it (through its int8 export where that passed its
held-out check), its .keras file, and its ONNX exports, float32 and int8. The model is trained once
for timing under --out/timing; each measurement is kept under --out/latency, and a rerun skips what
is kept: delete a file to measure it again. Needs `pip install ddddocr==1.6.1`.

On a CPU that computes bfloat16 natively it also times the Keras model on one batch of each padded
size in float32 and in bfloat16, interleaved: the measurement behind predict.FLOAT32_BATCH_LIMIT.

Last, which backbones could read one captcha in ddddocr's time through Keras at all: each of
--backbones, untrained (speed does not depend on the weights), at the timed model's input size, and
Xception at a smaller one, called on one captcha in float32, interleaved with ddddocr.classification.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench import ROOT, add_settings_argument, on_this_machine, stage, timing_model

import atomic  # noqa: E402
import run  # noqa: E402
import data  # noqa: E402  (bench puts the repository on the path)
from recognizer import DEFAULT_BATCH_SIZE, Recognizer  # noqa: E402

FOLDER_IMAGES = 128  # two batches of 64 for ours
FOLDER_ROUNDS = 8  # short turns in a rotating order, so that a change of load falls on every reader


def readers(run_dir, exports):
    """name -> function reading one captcha's bytes; name -> function reading a list of them; and the
    file that Recognizer.load(run_dir) reads, relative to run_dir."""
    import ddddocr

    ours = {"run": Recognizer.load(run_dir), "keras": Recognizer.load(run_dir / "model.keras"),
            **{name: Recognizer.load(path) for name, path in exports.items()}}
    ocr = ddddocr.DdddOcr(show_ad=False)
    one = {**{name: (lambda image, r=recognizer: r.predict([image])) for name, recognizer in ours.items()},
           "ddddocr": ocr.classification}
    many = {**{name: recognizer.predict for name, recognizer in ours.items()},
            "ddddocr": lambda images: [ocr.classification(image) for image in images]}
    return one, many, str(Path(ours["run"].source).relative_to(run_dir))


def milliseconds(times):
    times = sorted(times)
    return {"median_ms": round(1000 * statistics.median(times), 2),
            "p99_ms": round(1000 * times[min(len(times) - 1, int(0.99 * len(times)))], 2),
            "fastest_ms": round(1000 * times[0], 2), "calls": len(times)}


def latency(one, images, rounds):
    names = list(one)
    for image in images:  # first calls build graphs and allocate: not timed
        for name in names:
            one[name](image)
    times = {name: [] for name in names}
    for r in range(rounds):
        for i, image in enumerate(images):
            shift = (r * len(images) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                one[name](image)
                times[name].append(time.perf_counter() - start)
    calls = {name: milliseconds(t) for name, t in times.items()}
    for name in names:
        calls[name]["median_vs_ddddocr"] = round(calls[name]["median_ms"] / calls["ddddocr"]["median_ms"], 2)
    return {"images": len(images), "rounds": rounds, "calls": calls}


def folder_speed(many, images):
    seconds = {name: 0.0 for name in many}
    for name in many:  # warm
        many[name](images[:64])
    for r in range(FOLDER_ROUNDS):
        for name in list(many)[r % len(many):] + list(many)[:r % len(many)]:
            start = time.perf_counter()
            many[name](images)
            seconds[name] += time.perf_counter() - start
    rates = {name: round(FOLDER_ROUNDS * len(images) / s, 1) for name, s in seconds.items()}
    return {"images": len(images), "images_per_second": rates,
            "ratio_to_ddddocr": {name: round(rate / rates["ddddocr"], 2) for name, rate in rates.items()}}


def precision_by_batch_size(run_dir, images, rounds):
    """Median ms of one batch of each padded size (1, 2, 4, ... DEFAULT_BATCH_SIZE) for the Keras model
    in float32 and in bfloat16, called directly (not through keras_batch_function, which picks one)."""
    from model import cpu_has_native_bfloat16, load_model, with_precision

    if not cpu_has_native_bfloat16():
        return {"skipped": "this CPU has no native bfloat16: models are trained and read in float32"}
    float32_model, metadata = load_model(run_dir)
    models = {"float32": float32_model, "bfloat16": with_precision(float32_model, "mixed_bfloat16")}
    pixels = np.stack([data.decode_image(image, metadata["image_size"]) for image in images[:DEFAULT_BATCH_SIZE]])
    sizes, result = [1 << i for i in range(DEFAULT_BATCH_SIZE.bit_length())], {}
    for size in sizes:
        batch = pixels[np.arange(size) % len(pixels)]
        for model in models.values():  # the first call of a shape builds its graph: not timed
            model.predict_on_batch(batch)
        times = {name: [] for name in models}
        for r in range(rounds):
            for name in list(models)[r % 2:] + list(models)[:r % 2]:
                start = time.perf_counter()
                models[name].predict_on_batch(batch)
                times[name].append(time.perf_counter() - start)
        result[size] = {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}
    return {"rounds": rounds, "median_ms_per_batch": result}


def backbones_alone(backbones, image_size, images, rounds):
    """Median ms of one captcha through each backbone's model, bare (predict_on_batch, the image already
    decoded), against ddddocr.classification of the same captcha's bytes, interleaved."""
    import ddddocr

    from model import build_model

    ocr = ddddocr.DdddOcr(show_ad=False)
    timed = {name: (name, tuple(image_size)) for name in backbones}
    timed["Xception, smaller input"] = ("Xception", (32, 80))  # under half the pixels of the default 50x120
    models = {name: build_model(size, 4, 10, backbone, weights="none")[0] for name, (backbone, size) in timed.items()}
    pixels = {name: np.stack([data.decode_image(image, size) for image in images])[:, None]
              for name, (_, size) in timed.items()}
    calls = {**{name: (lambda i, m=model, p=pixels[name]: m.predict_on_batch(p[i])) for name, model in models.items()},
             "ddddocr": lambda i: ocr.classification(images[i])}
    result = latency(calls, range(len(images)), rounds)  # each call takes the captcha's number
    for name, model in models.items():
        result["calls"][name].update(input=list(timed[name][1]), parameters=model.count_params())
    return result


def where(result):
    m = result["machine"]
    return (f"commit {m['commit']}, {m['cpu']}, {m['cores']} cores, {m['date']}; load average "
            f"{m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after")


def table(lat, speed):
    calls = {"run": f"`Recognizer.load(run).predict([image])`, reading {lat.get('run_reads', '?')}",
             "keras": "the same, Recognizer.load(run/model.keras)", "onnx": "the same, ONNX export",
             "onnx_int8": "the same, ONNX export --int8", "ddddocr": "`ddddocr.classification(image)`"}
    lines = [where(lat), "", "| call | median ms | p99 ms | fastest ms | median vs ddddocr |", "|---|---|---|---|---|"]
    lines += [f"| {calls[name]} | {t['median_ms']} | {t['p99_ms']} | {t['fastest_ms']} | {t['median_vs_ddddocr']}x |"
              for name, t in lat["calls"].items()]
    rates, ratios = speed["images_per_second"], speed["ratio_to_ddddocr"]
    lines += ["", f"folder of {speed['images']} captchas, images/s: "
              + ", ".join(f"{name} {rates[name]} ({ratios[name]}x)" for name in rates) + "; " + where(speed)]
    return "\n".join(lines)


def precision_table(by_size):
    if "skipped" in by_size:
        return f"precision by batch size: skipped, {by_size['skipped']}"
    lines = [f"Keras model, median ms per batch ({by_size['rounds']} calls each); {where(by_size)}", "",
             "| batch | float32 | bfloat16 | bfloat16 / float32 |", "|---|---|---|---|"]
    lines += [f"| {size} | {ms['float32']} | {ms['bfloat16']} | {ms['bfloat16'] / ms['float32']:.2f} |"
              for size, ms in by_size["median_ms_per_batch"].items()]
    return "\n".join(lines)


def backbones_table(alone):
    lines = [f"one captcha through each backbone alone, float32, {alone['rounds']} x {alone['images']} calls; "
             f"{where(alone)}", "", "| model | input | parameters | median ms | p99 ms | median vs ddddocr |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {'x'.join(map(str, t.get('input', []))) or '-'} | {t.get('parameters') or '-'} | "
              f"{t['median_ms']} | {t['p99_ms']} | {t['median_vs_ddddocr']}x |" for name, t in alone["calls"].items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=40, help="captchas timed one at a time")
    parser.add_argument("--rounds", type=int, default=5, help="times each captcha is read by each reader")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--backbones", nargs="+", default=["Xception", "MobileNet", "MobileNetV2", "MobileNetV3Small",
                                                            "EfficientNetB0", "ResNet50V2"],
                        help="keras.applications models timed alone on one captcha")
    add_settings_argument(parser, "the timed model")
    args = parser.parse_args()
    shared = args.shared.resolve()
    run_dir, exports = timing_model(shared, args.out / "timing", args.set)
    paths = data.find_images(shared / "henan_4digit" / "OCR_Dataset")
    images = [path.read_bytes() for path in paths[:max(args.images, FOLDER_IMAGES)]]
    one, many, run_reads = readers(run_dir, exports)
    out = args.out / "latency"
    lat = stage(out / "latency.json", lambda: on_this_machine(lambda: {
        **latency(one, images[:args.images], args.rounds), "run_reads": run_reads}))
    speed = stage(out / "folder.json", lambda: on_this_machine(lambda: folder_speed(many, images[:FOLDER_IMAGES])))
    by_size = stage(out / "precision_by_batch_size.json",
                    lambda: on_this_machine(lambda: precision_by_batch_size(run_dir, images, 4 * args.rounds)))
    alone = stage(out / "backbones.json", lambda: on_this_machine(lambda: backbones_alone(
        args.backbones, run.read_metadata(run_dir)["image_size"], images[:args.images], args.rounds)))
    summary = table(lat, speed) + "\n\n" + precision_table(by_size) + "\n\n" + backbones_table(alone)
    print(summary)
    atomic.write_text(out / "results.md", summary + "\n")


if __name__ == "__main__":
    sys.exit(main())
