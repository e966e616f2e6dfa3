"""Convert a small custom CNN of your own with the Python API, then save and reload it.

    python examples/convert_custom_model.py

Builds a functional CNN with the usual pointwise-conv patterns (conv -> BN -> ReLU, a 1x1
projection with a residual add), converts every eligible 1x1 convolution to the kEffNet
sub-architecture, prints the plan's totals, writes the result as a .keras file, loads it back
and checks that the reloaded model predicts exactly what the converted one does.
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keffconvert  # noqa: E402
from keffconvert.layers import custom_objects  # noqa: E402


def build_model(classes=5):
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_act")(x)
    x = keras.layers.Conv2D(128, 1, use_bias=False, name="expand")(x)  # 32 -> 128: an expansion
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dwconv")(x)  # never touched
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="project")(x)  # 128 -> 64: gets a 2nd conv
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    skip = x
    x = keras.layers.Conv2D(64, 1, activation="relu", name="mix")(x)  # its own activation
    x = keras.layers.Add(name="residual")([x, skip])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="custom_cnn")


def main():
    model = build_model()
    new_model, plan = keffconvert.convert(model, channels_per_group=16)

    print(f"converted {len(plan.converted)} of {len(plan.layers)} Conv2D layers")
    for entry in plan.converted:
        print(f"  {entry.name}: C={entry.in_channels} F={entry.filters} groups={entry.groups} "
              f"{entry.trainable_before:,} -> {entry.trainable_after:,} trainable parameters")
    print(f"trainable parameters: {plan.trainable_params_before:,} -> {plan.trainable_params_after:,} "
          f"({plan.reduction_pct:.1f}% fewer)")
    print(f"all parameters: {plan.total_params_before:,} -> {plan.total_params_after:,}")
    print(f"MACs per image: {plan.macs_before:,} -> {plan.macs_after:,}")

    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    expected = new_model.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "custom_cnn_keff.keras")
        new_model.save(path)
        reloaded = keras.models.load_model(path, custom_objects=custom_objects())
        got = reloaded.predict(x, verbose=0)
    diff = float(np.max(np.abs(expected - got)))
    print(f"saved and reloaded {os.path.basename(path)}: max prediction difference {diff:.2g}")
    assert diff < 1e-6, diff
    print("reloaded predictions match")


if __name__ == "__main__":
    main()
