"""Original EfficientNet-B0 vs its kEffNet conversion: speed, side by side, in one process.

    python benchmarks/bench_speed.py --out benchmarks/results.json
    python benchmarks/bench_speed.py --quick            # a smoke run (about 3 minutes)

Every figure is a RATIO converted/original of the two models measured ALTERNATELY in the same
process (A B A B ..., each turn a few calls, medians of the turns after warm-up), which stays
meaningful on a loaded machine: background load slows both models in the same turns. The load
average is recorded with each section; absolute times are only indicative.

Sections (--sections, comma-separated; default all):

* train    training throughput (images/s), 32x32 inputs, batch 64, RMSprop, `train_on_batch` on
           a fixed synthetic batch after warm-up.
* infer    Keras inference time at 224x224, batch 1 and 16, `predict_on_batch` (a compiled
           function), of the models as they are, and of both after the inference folding of
           `keffconvert.export.inference_model` (BN and interleave folds, linear residual merges).
* tflite   TFLite float32 at 224x224, batch 1, 2 threads (XNNPACK): latency and file size, both
           models exported the same way (`keffconvert.export_tflite.to_tflite`), plus the int8 file
           sizes (post-training quantisation, random calibration images: only the size is used),
           per-channel (TFLite's default) and, for the converted model, per-tensor weights.
* convert  `keffconvert.convert` time for B0 and B7 against building the same
           `keras.applications` model.

Model: `keras.applications.EfficientNetB0(weights=None, classes=10)` and
`keffconvert.convert(model, 16)`.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SECTIONS = ("train", "infer", "tflite", "convert")


def load():
    return [round(v, 2) for v in os.getloadavg()]


def alternate(calls, reps, inner=1, warmup=1):
    """Run each callable `inner` times per turn, turns alternating across callables, `reps`
    turns each after `warmup` turns; returns {name: [seconds per call, one per turn]}."""
    for _ in range(warmup):
        for fn in calls.values():
            for _ in range(inner):
                fn()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median(values):
    return float(statistics.median(values))


def models(size, classes=10):
    import keras

    import keffconvert

    keras.utils.set_random_seed(0)
    original = keras.applications.EfficientNetB0(weights=None, classes=classes, input_shape=(size, size, 3))
    converted, plan = keffconvert.convert(original, 16)
    return original, converted, plan


def section_train(args):
    import keras
    import numpy as np

    original, converted, _ = models(32)
    batch = 64
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, batch)
    calls = {}
    for name, model in (("original", original), ("converted", converted)):
        model.compile(optimizer=keras.optimizers.RMSprop(0.003), loss="sparse_categorical_crossentropy")
        for _ in range(3):  # trace and warm up
            model.train_on_batch(x, y)
        calls[name] = (lambda m: lambda: m.train_on_batch(x, y))(model)
    steps = 1 if args.quick else 3
    times = alternate(calls, reps=args.reps, inner=steps)
    o, c = batch / median(times["original"]), batch / median(times["converted"])
    return {"what": "training throughput, EfficientNet-B0 32x32, batch 64, RMSprop, train_on_batch",
            "original_img_per_s": o, "converted_img_per_s": c, "ratio": c / o,
            "turns": args.reps, "steps_per_turn": steps}


def section_infer(args):
    import numpy as np

    from keffconvert.export import inference_model

    original, converted, _ = models(224)
    folded = {"original": inference_model(original), "converted": inference_model(converted)}
    result = {"what": "Keras inference 224x224, predict_on_batch (compiled), seconds per batch"}
    rng = np.random.default_rng(0)
    for batch in (1, 16):
        x = rng.uniform(0, 255, (batch, 224, 224, 3)).astype("float32")
        calls = {
            "original": lambda: original.predict_on_batch(x),
            "converted": lambda: converted.predict_on_batch(x),
            "original_folded": lambda: folded["original"].predict_on_batch(x),
            "converted_folded": lambda: folded["converted"].predict_on_batch(x),
        }
        inner = (3 if batch == 1 else 1) if args.quick else (5 if batch == 1 else 2)
        times = alternate(calls, reps=args.reps, inner=inner, warmup=2)
        med = {name: median(t) for name, t in times.items()}
        result[f"batch{batch}"] = {
            **{f"{name}_s": value for name, value in med.items()},
            "ratio": med["converted"] / med["original"],
            "ratio_folded": med["converted_folded"] / med["original_folded"],
            "ratio_converted_folded_vs_original": med["converted_folded"] / med["original"],
        }
    return result


def section_tflite(args):
    import numpy as np

    from keffconvert.export import FoldReport
    from keffconvert.export.tflite import interpreter, to_tflite

    original, converted, _ = models(224)
    flat, reports = {}, {}
    for name, model in (("original", original), ("converted", converted)):
        reports[name] = FoldReport()
        flat[name] = to_tflite(model, report=reports[name])
    x = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    calls = {}
    for name, content in flat.items():
        it = interpreter(content, threads=2)
        it.set_tensor(it.get_input_details()[0]["index"], x)
        calls[name] = it.invoke
    reps = max(args.reps * 3, 9)
    times = alternate(calls, reps=reps, inner=3 if args.quick else 5, warmup=3)
    med = {name: median(t) for name, t in times.items()}
    result = {
        "what": "TFLite float32 224x224 batch 1, 2 threads, both exported by keffconvert.export_tflite",
        "original_ms": med["original"] * 1e3, "converted_ms": med["converted"] * 1e3,
        "latency_ratio": med["converted"] / med["original"],
        "original_bytes": len(flat["original"]), "converted_bytes": len(flat["converted"]),
        "size_ratio": len(flat["converted"]) / len(flat["original"]),
        "converted_folds": reports["converted"].summary(), "turns": reps,
    }
    if not args.no_int8:
        calibration = np.random.default_rng(1).uniform(0, 255, (4 if args.quick else 16, 224, 224, 3)).astype("float32")
        sizes = {name: len(to_tflite(model, int8=True, calibration=calibration))
                 for name, model in (("original", original), ("converted", converted))}
        per_tensor = len(to_tflite(converted, int8=True, calibration=calibration, per_channel=False))
        result.update({
            "original_int8_bytes": sizes["original"], "converted_int8_bytes": sizes["converted"],
            "converted_int8_vs_original_float32": sizes["converted"] / len(flat["original"]),
            "converted_int8_vs_original_int8": sizes["converted"] / sizes["original"],
            "converted_int8_per_tensor_bytes": per_tensor,
            "converted_int8_per_tensor_vs_original_float32": per_tensor / len(flat["original"]),
        })
    return result


def section_convert(args):
    import gc

    import keras

    import keffconvert

    result = {"what": "keffconvert.convert(model, 16) time vs building the keras.applications model"}
    variants = [("B0", keras.applications.EfficientNetB0)] + ([] if args.quick else [("B7", keras.applications.EfficientNetB7)])
    for name, build in variants:
        builds, converts = [], []
        for _ in range(1 if args.quick else args.convert_reps):
            start = time.perf_counter()
            model = build(weights=None)
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            converted, _ = keffconvert.convert(model, 16)
            converts.append(time.perf_counter() - start)
            del model, converted
            keras.backend.clear_session()
            gc.collect()
        result[name] = {"build_s": median(builds), "convert_s": median(converts),
                        "ratio": median(converts) / median(builds), "turns": len(builds)}
    return result


TARGETS = [
    ("train", ("ratio",), ">=", 1.0, "training throughput at 32x32 (converted/original)"),
    ("infer", ("batch16", "ratio"), "<=", 0.8, "Keras inference time 224 batch 16"),
    ("infer", ("batch16", "ratio_folded"), "<=", 0.8, "Keras inference time 224 batch 16, both folded"),
    ("tflite", ("latency_ratio",), "<=", 0.8, "TFLite float32 latency 224 batch 1, 2 threads"),
    ("tflite", ("size_ratio",), "<=", 0.2, "TFLite float32 file size"),
    ("tflite", ("converted_int8_vs_original_float32",), "<=", 0.06, "TFLite int8 file vs float32 original"),
    ("tflite", ("converted_int8_per_tensor_vs_original_float32",), "<=", 0.06,
     "TFLite int8 (per-tensor weights) file vs float32 original"),
    ("convert", ("B7", "ratio"), "<=", 1.5, "converting B7 vs building B7"),
]


def check_targets(results):
    rows = []
    for section, path, op, limit, label in TARGETS:
        value = results.get(section)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        met = value >= limit if op == ">=" else value <= limit
        rows.append({"target": label, "value": round(value, 3), "limit": f"{op} {limit}", "met": bool(met)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few turns, no B7, tiny int8 calibration")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--reps", type=int, default=None, help="alternating turns per model (default 9, quick 2)")
    parser.add_argument("--convert-reps", type=int, default=3, help="turns for the conversion timing")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 TFLite file sizes")
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 9)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    import keras
    import tensorflow as tf

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "tensorflow": tf.__version__, "keras": keras.__version__, "quick": args.quick,
                           "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}}
    functions = {"train": section_train, "infer": section_infer, "tflite": section_tflite, "convert": section_convert}
    for name in sections:
        before = load()
        start = time.perf_counter()
        print(f"[{name}] running (load average {before})", flush=True)
        results[name] = functions[name](args)
        results[name]["load_average_before"] = before
        results[name]["load_average_after"] = load()
        results[name]["section_s"] = round(time.perf_counter() - start, 1)
        print(f"[{name}] " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                        for k, v in results[name].items() if not isinstance(v, dict)}), flush=True)
        for key, value in results[name].items():
            if isinstance(value, dict):
                print(f"[{name}] {key}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                       for k, v in value.items()}), flush=True)
    results["targets"] = check_targets(results)
    print("\nratio converted/original (same process, alternating, medians):")
    for row in results["targets"]:
        print(f"  {row['target']:<52s} {row['value']:>7.3f}  target {row['limit']:<7s} {'met' if row['met'] else 'NOT met'}")
    if args.out:
        from keffconvert.outputs import write_json

        print(f"wrote {write_json(args.out, results, force=True)}")


if __name__ == "__main__":
    main()
