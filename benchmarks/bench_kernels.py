"""Kernel alternatives of the two kEffNet layers, on every layer shape of a converted B0.

    python benchmarks/bench_kernels.py --out benchmarks/kernels.json
    python benchmarks/bench_kernels.py --quick

Every GroupedPointwiseConv2D layer of `keffconvert.convert(EfficientNetB0(weights=None,
classes=10), 16)` runs, with each implementation of `keffconvert.layers.grouped_pointwise`, in
one compiled tf.function per implementation (so per-call overhead is paid once, as in a model
step), the implementations ALTERNATING (A B C ... A B C ...) and the median of the turns kept;
the same for the interleave implementations on every InterleaveChannels layer. With
--per-shape, each distinct layer shape is also timed on its own (the table the `auto` rule was
derived from). Two regimes:

* train: 32x32 inputs, batch 64, forward and backward (gradients for input and kernel);
* infer: 224x224 inputs, batch 16, forward only.

The ratios are to `einsum` (the previous kernel) for the grouped conv and to `transpose` for the
interleave. In the one-function figures independent layers may overlap on the two cores, which
favours the big single matmuls of `blockdiag` in training; the whole-model training step
(benchmarks/bench_speed.py) is the figure that decides. Medians in one
process make the ratios robust to background load, the absolute times are not.
"""

import argparse
import collections
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GROUPED = ("einsum", "matmul", "blockdiag", "broadcast", "conv", "auto")
INTERLEAVE = ("transpose", "take", "slices")
REGIMES = {"train": (32, 64, True), "infer": (224, 16, False)}


def layer_shapes(size):
    import keras

    import keffconvert
    from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels

    original = keras.applications.EfficientNetB0(weights=None, classes=10, input_shape=(size, size, 3))
    converted, _ = keffconvert.convert(original, 16)
    grouped = collections.Counter((tuple(l.input.shape[1:]), l.filters, l.groups)
                                  for l in converted.layers if isinstance(l, GroupedPointwiseConv2D))
    shuffles = collections.Counter((tuple(l.input.shape[1:]), l.step_size)
                                   for l in converted.layers if isinstance(l, InterleaveChannels))
    return grouped, shuffles


def timed(functions, reps, inner):
    for fn in functions.values():
        fn()
        fn()
    times = {name: [] for name in functions}
    for _ in range(reps):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def make_step(op, x, weights, train):
    import tensorflow as tf

    @tf.function
    def step():
        if not train:
            return op(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(op(x))
        return tape.gradient(loss, [x, *weights])

    return step


def bench_grouped(regime, shapes, implementations, reps, inner):
    import numpy as np
    import tensorflow as tf

    from keffconvert.layers import choose_implementation, grouped_pointwise

    size, batch, train = REGIMES[regime]
    rng = np.random.default_rng(0)
    rows = []
    for (shape, filters, groups), count in shapes.items():
        channels = shape[-1]
        x = tf.constant(rng.normal(size=(batch,) + shape).astype("float32"))
        kernel = tf.Variable(rng.normal(size=(1, 1, channels // groups, filters)).astype("float32") * 0.1)
        functions = {name: make_step(lambda t, n=name: grouped_pointwise(t, kernel, groups, n), x, [kernel], train)
                     for name in implementations}
        ms = timed(functions, reps, inner)
        rows.append({"input": list(shape), "filters": filters, "groups": groups, "count": count,
                     "auto_picks": choose_implementation(channels, filters, groups), "ms": ms})
        print(f"  {regime} {str(shape):16s} F={filters:5d} g={groups:3d} x{count}: "
              + " ".join(f"{n}={v:.3f}" for n, v in ms.items()), flush=True)
    return rows


def bench_interleave(regime, shapes, implementations, reps, inner):
    import numpy as np
    import tensorflow as tf

    from keffconvert.layers import interleave

    size, batch, train = REGIMES[regime]
    rng = np.random.default_rng(1)
    rows = []
    for (shape, step), count in shapes.items():
        x = tf.constant(rng.normal(size=(batch,) + shape).astype("float32"))
        functions = {name: make_step(lambda t, n=name: interleave(t, step, n), x, [], train) for name in implementations}
        ms = timed(functions, reps, inner)
        rows.append({"input": list(shape), "step": step, "count": count, "ms": ms})
        print(f"  {regime} interleave {str(shape):16s} step={step:4d} x{count}: "
              + " ".join(f"{n}={v:.3f}" for n, v in ms.items()), flush=True)
    return rows


def bench_all_in_one(regime, shapes, implementations, reps, kind):
    """One tf.function per implementation running every layer of the model (each shape as many
    times as layers have it): the per-call overhead is paid once, as in a real model step."""
    import numpy as np
    import tensorflow as tf

    from keffconvert.layers import grouped_pointwise, interleave

    size, batch, train = REGIMES[regime]
    rng = np.random.default_rng(2)
    inputs, weights, ops_ = [], [], []
    for spec, count in shapes.items():
        for _ in range(count):
            if kind == "grouped":
                shape, filters, groups = spec
                x = tf.constant(rng.normal(size=(batch,) + shape).astype("float32"))
                k = tf.Variable(rng.normal(size=(1, 1, shape[-1] // groups, filters)).astype("float32") * 0.1)
                weights.append(k)
                ops_.append(lambda t, n, k=k, g=groups: grouped_pointwise(t, k, g, n))
            else:
                shape, step = spec
                x = tf.constant(rng.normal(size=(batch,) + shape).astype("float32"))
                ops_.append(lambda t, n, s=step: interleave(t, s, n))
            inputs.append(x)

    def make(name):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                total = 0.0
                for op, x in zip(ops_, inputs):
                    tape.watch(x)
                    y = op(x, name)
                    total += tf.reduce_sum(y * y)
            if train:
                return tape.gradient(total, inputs + weights)
            return total

        return step

    ms = timed({name: make(name) for name in implementations}, reps, inner=2)
    print(f"  {regime} {kind} all layers in one function: " + " ".join(f"{n}={v:.1f}" for n, v in ms.items()),
          flush=True)
    return ms


def totals(rows, names, base):
    total = {name: sum(r["count"] * r["ms"][name] for r in rows) for name in names}
    best = sum(r["count"] * min(r["ms"].values()) for r in rows)
    return {"total_ms": total, "ratio_to_" + base: {n: total[n] / total[base] for n in names},
            "best_per_shape_ms": best}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="2 turns, no `conv` (slow) in training")
    parser.add_argument("--regimes", default="train,infer")
    parser.add_argument("--reps", type=int, default=None, help="alternating turns (default 5, quick 2)")
    parser.add_argument("--per-shape", action="store_true",
                        help="also time every layer shape on its own (the table the `auto` rule comes from)")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    results = {"load_average_before": list(os.getloadavg()), "cpus": os.cpu_count()}
    for regime in [r for r in args.regimes.split(",") if r]:
        size, batch, train = REGIMES[regime]
        grouped_shapes, interleave_shapes = layer_shapes(size)
        names = [n for n in GROUPED if not (args.quick and n == "conv")]
        print(f"[{regime}] {size}x{size}, batch {batch}, {'forward+backward' if train else 'forward'}", flush=True)
        whole_grouped = bench_all_in_one(regime, grouped_shapes, names, reps, "grouped")
        whole_interleave = bench_all_in_one(regime, interleave_shapes, INTERLEAVE, reps, "interleave")
        results[regime] = {
            "all_layers_ms": {"grouped": whole_grouped, "interleave": whole_interleave},
            "all_layers_ratio": {"grouped": {n: v / whole_grouped["einsum"] for n, v in whole_grouped.items()},
                                 "interleave": {n: v / whole_interleave["transpose"] for n, v in whole_interleave.items()}},
        }
        if args.per_shape:
            grouped = bench_grouped(regime, grouped_shapes, names, reps, inner=3 if train else 1)
            shuffles = bench_interleave(regime, interleave_shapes, INTERLEAVE, reps, inner=3 if train else 1)
            results[regime].update({"grouped": grouped, "grouped_totals": totals(grouped, names, "einsum"),
                                    "interleave": shuffles,
                                    "interleave_totals": totals(shuffles, INTERLEAVE, "transpose")})
    results["load_average_after"] = list(os.getloadavg())
    print("\nall layers of converted B0 in one function (ms; ratio to einsum / to transpose):")
    for regime in REGIMES:
        if regime not in results:
            continue
        for kind in ("grouped", "interleave"):
            ms, ratio = results[regime]["all_layers_ms"][kind], results[regime]["all_layers_ratio"][kind]
            print(f"  {regime:5s} {kind:10s} " + "  ".join(f"{n}={ms[n]:.1f} ({ratio[n]:.2f})" for n in ms))
        if "grouped_totals" in results[regime]:
            t = results[regime]["grouped_totals"]
            print(f"  {regime:5s} per-shape sum: " + "  ".join(
                f"{n}={t['total_ms'][n]:.1f}" for n in t["total_ms"]) + f"  best-per-shape={t['best_per_shape_ms']:.1f}")
    if args.out:
        from keffconvert.outputs import write_json

        print(f"wrote {write_json(args.out, results, force=True)}")


if __name__ == "__main__":
    main()
