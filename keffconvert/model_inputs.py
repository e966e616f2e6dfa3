"""Images as a model takes them (its input size, channels and pixel scale), from any data source.

The data-aware conversion needs two disjoint sets: calibration images to fit on, drawn from the
training split, and held-out images to measure agreement on, from the test split, so the
reported agreement is never measured on images the fit has seen.
"""

from dataclasses import dataclass

import numpy as np

from keffconvert.errors import DataError

# How a model wants its pixels: `raw` 0..255 (Keras EfficientNet rescales inside the model),
# `unit` 0..1, `symmetric` -1..1.
INPUT_SCALES = ("raw", "unit", "symmetric")


def scale_pixels(images, scale):
    """uint8-range pixels (0..255) -> float32 in the range the model expects (`INPUT_SCALES`)."""
    x = np.asarray(images, "float32")
    if scale == "unit":
        return x / 255.0
    if scale == "symmetric":
        return x / 127.5 - 1.0
    return x


def model_image_shape(model):
    """(height, width, channels) of an image model's fixed input; DataError otherwise."""
    from keffconvert.model_info import input_shape

    shape = input_shape(model)
    if shape is None or len(shape) != 3 or None in shape:
        raise DataError(f"{model.name} takes input of shape {shape}; calibration needs a fixed image size (H, W, C)")
    return shape


@dataclass
class CalibrationImages:
    """Calibration images (from the training split) and held-out images (from the test split)."""

    calibration: np.ndarray
    held_out: np.ndarray
    description: str


def calibration_images(spec, model, *, samples=512, held_out=512, seed=0, scale="auto", **source_options):
    """`samples` seeded training images and up to `held_out` test images of `spec` for `model`.

    `spec` is what `train --data` takes: 'digits', an .npz, an image folder or TFRecord shards
    (read through the same stream as training, only the sampled images decoded; `source_options`:
    `image_key`, `label_key`). `scale` 'auto' feeds 0..255 to a model that rescales its own input
    (Keras EfficientNet), else 0..1.
    """
    from keffconvert.data import open_data
    from keffconvert.train import guess_input_scale

    height, width, channels = model_image_shape(model)
    dataset = open_data(spec, (height, width), channels, seed=seed, **source_options)
    sizes = dataset.sizes
    if sizes["train"] + sizes["val"] == 0 or sizes["test"] == 0:
        raise DataError(f"{spec}: no images to calibrate on")
    pool = dataset.sample(("train", "val"), samples, seed)
    scale = guess_input_scale(model) if scale == "auto" else scale
    test = dataset.sample(("test",), held_out)
    description = (f"{len(pool)} calibration images from the training split of {spec}, "
                   f"{len(test)} held-out test images for agreement, pixels '{scale}'")
    return CalibrationImages(scale_pixels(pool, scale), scale_pixels(test, scale), description)
