"""One tiny finished training run (original and converted), shared by the per-class and heatmap
tests so that it is trained once per test session.

The data decides the class by the colour of one patch (red, blue or magenta) at a random place,
with a brighter green patch elsewhere that says nothing about the class: a model that learned the
task looks at the coloured patch, and so must its heatmap; bright pixels alone would draw it to
the green one.
"""

import keras
import numpy as np

from keffconvert.train.recipe import Recipe
from keffconvert.train import train

_RUNS = {}
CLASSES = ["red", "blue", "magenta"]
SIZE, PATCH = 12, 3
CHANNELS = {0: (0,), 1: (2,), 2: (0, 2)}


def patch_images(count, seed):
    """(uint8 images, labels, (row, col) of each image's coloured patch)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 30, (count, SIZE, SIZE, 3)).astype(np.uint8)
    y = np.arange(count) % len(CLASSES)
    where = np.zeros((count, 2), dtype=np.int64)
    for i, label in enumerate(y):
        while True:
            signal, distractor = rng.integers(0, SIZE - PATCH + 1, (2, 2))
            if np.abs(signal - distractor).max() > PATCH:
                break
        where[i] = signal
        for channel in CHANNELS[int(label)]:
            x[i, signal[0]:signal[0] + PATCH, signal[1]:signal[1] + PATCH, channel] = 200
        x[i, distractor[0]:distractor[0] + PATCH, distractor[1]:distractor[1] + PATCH, 1] = 255
    return x, y, where


def small_model():
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="expand")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="top")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(len(CLASSES), activation="softmax", name="head")(x), name="patchnet")


def tiny_run(tmp_path_factory):
    """(run folder, report, test images, test labels, patch places) of a short scratch run of
    `small_model` and its conversion on the patch data."""
    base = tmp_path_factory.getbasetemp()
    if base not in _RUNS:
        folder = tmp_path_factory.mktemp("tiny_run")
        x_train, y_train, _ = patch_images(300, seed=0)
        x_test, y_test, where = patch_images(60, seed=1)
        data = folder / "patches.npz"
        np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=CLASSES)
        out = folder / "run"
        report = train(small_model(), str(data), with_original=True, out=out, channels_per_group=8,
                       recipe=Recipe(epochs=2, batch_size=32, augment=False, optimizer="adam", lr=0.01, lr_decay=1.0,
                                     seed=0))
        _RUNS[base] = (out, report, x_test, y_test, where)
    return _RUNS[base]
