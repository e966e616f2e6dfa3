import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Legacy tf.keras 2.x files written by old TensorFlow releases; committed in the repository so a
# lone clone has them (see tests/fixtures/legacy/README.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEGACY = FIXTURES / "legacy"


def count(weights):
    """How many numbers `weights` hold. Deliberately not `keffconvert.model_info.count_weights`:
    the tests check keffconvert's counts (plan, check, reports) against this independent re-count,
    which a bug in the shared helper would otherwise pass on both sides."""
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.fixture(scope="session")
def b0_small():
    """EfficientNet-B0 with 10 classes at 32x32: the paper's architecture, quick to build."""
    return keras.applications.EfficientNetB0(weights=None, classes=10, input_shape=(32, 32, 3))


def small_cnn(name="small_cnn", activation="relu"):
    """A functional CNN with every chain kind: conv+BN+act, conv(activation), conv+BN, expansion."""
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", name="stem")(inp)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="expand")(x)  # C < F: no L
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation(activation, name="expand_act")(x)
    x = keras.layers.Conv2D(32, 1, activation=activation, name="reduce")(x)  # C >= F, own activation
    skip = x
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.Add(name="residual")([x, skip])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(4, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name=name)


def randomize(model, seed=0):
    """Give every weight (BN statistics included) non-trivial values, as training would.

    Walks nested models itself (seed + 1 for each), independently of keffconvert's own
    `model_info.leaf_layers`, like `count` above."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize(layer, seed + 1)
            continue
        new = []
        for w in layer.get_weights():
            v = rng.normal(0, 0.3, w.shape).astype(w.dtype)
            if isinstance(layer, keras.layers.BatchNormalization):
                v = np.abs(v) + 0.5  # positive variances and scales
            new.append(v)
        layer.set_weights(new)
    return model
