"""Fine-tune a converted model on an image folder (one sub-folder of images per class).

    python examples/finetune_image_folder.py

Writes a tiny image folder (3 classes of 32x32 PNG files, in a temporary directory), trains a
small CNN on it for 2 epochs with plain Keras (standing in for your trained model), then lets
keffconvert's training API convert it (the trained weights are carried over) and fine-tune the
converted model for 1 epoch: `keffconvert.train.train(model, data=FOLDER, mode="finetune")`.
The run folder gets report.json, report.md and plots. Swap in your own folder
(DIR/<class>/*.png, or DIR/train/... and DIR/test/...) and model to do the same for real.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from keffconvert.train import recipe_from_options, train  # noqa: E402

CLASSES = ("circles", "stripes", "squares")
SIZE = 32


def draw(kind, rng):
    """A 32x32 RGB image of one simple pattern, randomly coloured and placed."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    colour = rng.uniform(80, 255, 3)
    if kind == "circles":
        cy, cx, r = rng.uniform(10, 22, 2).tolist() + [rng.uniform(5, 9)]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    elif kind == "stripes":
        mask = ((xx + int(rng.integers(0, 8))) // 4) % 2 == 0
    else:
        y0, x0 = rng.integers(2, 16, 2)
        side = int(rng.integers(8, 14))
        mask = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
    image = rng.uniform(0, 40, (SIZE, SIZE, 3))
    image[mask] = colour
    return image.astype("uint8")


def write_image_folder(root, per_class=16, seed=0):
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        folder = Path(root) / kind
        folder.mkdir(parents=True)
        for n in range(per_class):
            Image.fromarray(draw(kind, rng)).save(folder / f"{kind}_{n:03d}.png")
    return root


def small_cnn(classes):
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="stem")(x)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu", name="dwconv")(x)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.Activation("relu", name="project_act")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="small_cnn")


def main():
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_image_folder(Path(tmp) / "images")
        print(f"image folder: {len(CLASSES)} classes {sorted(CLASSES)}, "
              f"{sum(len(list((root / c).iterdir())) for c in CLASSES)} PNG files")

        # Your trained model; here 2 quick epochs of plain Keras on the same folder.
        pretrain = keras.utils.image_dataset_from_directory(root, image_size=(SIZE, SIZE), batch_size=8,
                                                            seed=0, verbose=False)
        model = small_cnn(len(CLASSES))
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(pretrain, epochs=2, verbose=0)

        # Convert and fine-tune: held-out validation and test splits are made from the folder.
        # The fine-tuning defaults (Adam 1e-4, frozen batch norms, distillation, a data-aware start
        # fitted on training images) apply to what is not given here.
        report = train(model, data=str(root), mode="finetune",
                       recipe=recipe_from_options("finetune", epochs=1, batch_size=8), out=Path(tmp) / "run")
        plan = report["plan"]
        print(f"converted {plan['converted_layers']} pointwise convs: trainable parameters "
              f"{plan['trainable_params_before']:,} -> {plan['trainable_params_after']:,} "
              f"({plan['reduction_pct']:.1f}% fewer)")
        result = next(m for m in report["models"] if m["role"] == "converted")
        assert np.isfinite(result["test_loss"]), result
        print(f"fine-tuned {result['epochs']} epoch: {result['name']}, "
              f"test accuracy {result['test_accuracy']:.2f}, test loss {result['test_loss']:.3f}")
        print(f"run folder: {', '.join(sorted(p.name for p in (Path(tmp) / 'run').iterdir()))}")


if __name__ == "__main__":
    main()
