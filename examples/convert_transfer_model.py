"""Convert the usual transfer-learning model: an EfficientNet-B0 base nested inside a Sequential.

    python examples/convert_transfer_model.py

    model = Sequential([EfficientNetB0(include_top=False), GlobalAveragePooling2D(), Dense(5)])

keffconvert walks into the nested base model and converts its pointwise convolutions (every
expand, squeeze-excite and project conv and top_conv); the pooling and the Dense head are left
as they are. (Real use would pass weights="imagenet"; weights=None keeps this example offline.)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keffconvert  # noqa: E402
from keffconvert.layers import GroupedPointwiseConv2D  # noqa: E402


def count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def main():
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        base,
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, activation="softmax"),
    ], name="transfer")

    new_model, plan = keffconvert.convert(model, channels_per_group=16)

    nested = [layer for layer in new_model.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 1, nested
    new_base = nested[0]
    grouped = [layer for layer in new_base.layers if isinstance(layer, GroupedPointwiseConv2D)]
    in_base = [e for e in plan.converted if e.name.startswith(f"{base.name}/")]
    print(f"converted {len(plan.converted)} of {len(plan.layers)} Conv2D layers, "
          f"{len(in_base)} of them inside the nested base model {base.name!r}")
    print(f"e.g. {in_base[0].name}: C={in_base[0].in_channels} F={in_base[0].filters} groups={in_base[0].groups}")
    print(f"nested base {new_base.name!r} now holds {len(grouped)} GroupedPointwiseConv2D layers")
    print(f"base trainable parameters: {count(base.trainable_weights):,} -> {count(new_base.trainable_weights):,}")
    print(f"model trainable parameters: {plan.trainable_params_before:,} -> {plan.trainable_params_after:,} "
          f"({plan.reduction_pct:.2f}% fewer)")
    head_before, head_after = model.layers[-1], new_model.layers[-1]
    print(f"classifier head {head_after.name!r} kept: {count(head_before.weights):,} parameters, weights copied: "
          f"{all(np.array_equal(a, b) for a, b in zip(head_before.get_weights(), head_after.get_weights()))}")

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    print(f"prediction shape: {new_model.predict(x, verbose=0).shape}")


if __name__ == "__main__":
    main()
