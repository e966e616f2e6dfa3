"""Where Keras inference time goes: EfficientNet-B0 against its kEffNet, both folded for inference.

Each layer is timed on its own (inside a tf.function, on the inputs it sees in the model, median
of several calls) and the times are summed by kind of work. This shows what the conversion can
speed up (the pointwise work) and what it cannot (swish, depthwise, padding, squeeze-and-excite),
which is what bounds the whole-model ratio.

    python benchmarks/profile_inference.py [--size 224] [--batch 16] [--reps 5] [--out FILE.json]
"""

import argparse
import time
from collections import defaultdict

import numpy as np

import keffconvert  # noqa: F401  (quiet TF start-up, registered layers)
import keras
import tensorflow as tf

from keffconvert.export import inference_model
from keffconvert.graph.view import Graph
from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels
from keffconvert.outputs import write_json


def kind(layer):
    """The kind of work a layer does, for the breakdown."""
    if isinstance(layer, (GroupedPointwiseConv2D, InterleaveChannels)):
        return "pointwise (grouped, interleave)"
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise conv"
    if isinstance(layer, keras.layers.Conv2D):
        return "pointwise (grouped, interleave)" if layer.kernel_size == (1, 1) else "other conv"
    if isinstance(layer, keras.layers.Add) and layer.name.endswith("_sum"):
        return "pointwise (grouped, interleave)"
    if isinstance(layer, keras.layers.Activation):
        return "activation"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch norm"
    if isinstance(layer, keras.layers.ZeroPadding2D):
        return "padding"
    if isinstance(layer, keras.layers.Multiply):
        return "SE multiply"
    if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.Reshape)):
        return "pooling / reshape"
    return "other"


def profile(model, x, reps):
    graph = Graph(model)
    nodes = graph.nodes
    probe = keras.Model(model.inputs, [n.input_tensors[0] if len(n.input_tensors) == 1 else n.input_tensors
                                       for n in nodes])
    inputs = probe.predict(x, batch_size=len(x), verbose=0)
    times = defaultdict(float)
    for node, value in zip(nodes, inputs):
        layer = node.operation
        args = value if isinstance(value, list) else [value]
        tensors = [tf.constant(a) for a in args]
        call = tf.function(lambda *t, layer=layer: layer(list(t) if len(t) > 1 else t[0]))
        call(*tensors)  # trace and warm up
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            out = call(*tensors)
            _ = out.numpy() if hasattr(out, "numpy") else out
            samples.append(time.perf_counter() - start)
        times[kind(layer)] += float(np.median(samples))
    return dict(times)


def main():
    tf.get_logger().setLevel("ERROR")  # one tf.function per layer is the point here, not a retrace bug
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    original = keras.applications.EfficientNetB0(weights=None, classes=10, input_shape=(args.size, args.size, 3))
    converted, _ = keffconvert.convert(original, 16)
    x = np.random.default_rng(0).uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32")
    result = {}
    for name, model in (("original", original), ("converted", converted)):
        result[name] = profile(inference_model(model), x, args.reps)
    kinds = sorted(set(result["original"]) | set(result["converted"]),
                   key=lambda k: -result["original"].get(k, 0))
    print(f"EfficientNet-B0 vs kEffNet-B0, both folded, {args.size}x{args.size}, batch {args.batch}: "
          f"ms per batch, each layer timed alone (median of {args.reps})")
    print(f"{'kind of work':34s} {'original':>9s} {'converted':>10s}")
    for k in kinds:
        print(f"{k:34s} {1e3 * result['original'].get(k, 0):9.1f} {1e3 * result['converted'].get(k, 0):10.1f}")
    totals = {name: sum(times.values()) for name, times in result.items()}
    print(f"{'total':34s} {1e3 * totals['original']:9.1f} {1e3 * totals['converted']:10.1f}   "
          f"ratio {totals['converted'] / totals['original']:.2f}")
    if args.out:
        write_json(args.out, {"size": args.size, "batch": args.batch, "seconds": result}, force=True)


if __name__ == "__main__":
    main()
