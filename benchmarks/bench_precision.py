"""Training-step time of a converted model in float32, mixed_bfloat16 and mixed_float16, side by side.

    python benchmarks/bench_precision.py [--size 32] [--batch 64] [--rounds 5]

Builds a small CNN with two convertible 1x1 convs, converts it (cpg 16), rebuilds it in each
precision as `keffconvert train` does (`train.rebuild`, output layer in float32) and times
`train_on_batch`, the three alternating (A B C A B C ...) so that other load on the machine hits
them alike; prints the median per step and the optimizer Keras chose (a LossScaleOptimizer for
float16). It answers what `--mixed-precision on` costs or gains on the machine it runs on.
"""

import argparse
import time

import keras
import numpy as np

from keffconvert.converter import convert
from keffconvert.train.precision import dtype_policy, rebuild

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def small_cnn(size):
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="head")(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    args = parser.parse_args()
    converted, _ = convert(small_cnn(args.size), 16)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32")
    y = np.arange(args.batch) % 10
    nets = {}
    for policy in POLICIES:
        with dtype_policy(policy):
            net = rebuild(converted, dtype=policy)
            net.compile(keras.optimizers.RMSprop(1e-3), "sparse_categorical_crossentropy")
            net.train_on_batch(x, y)  # trace and warm up
            nets[policy] = net
    times = {policy: [] for policy in POLICIES}
    for _ in range(args.rounds):
        for policy, net in nets.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                net.train_on_batch(x, y)
            times[policy].append((time.perf_counter() - start) / args.steps)
    base = np.median(times["float32"])
    for policy in POLICIES:
        median = np.median(times[policy])
        print(f"{policy:15s} {1000 * median:8.1f} ms/step  x{median / base:.2f}  "
              f"({type(nets[policy].optimizer).__name__})")


if __name__ == "__main__":
    main()
