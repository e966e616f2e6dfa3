"""How a model wants its pixels: its fixed image shape and its input scale (0..255, 0..1, -1..1)."""

import keras
import numpy as np

from keffconvert.errors import DataError
from keffconvert.graph.model_info import input_shape, leaf_layers

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


def guess_input_scale(model):
    """'raw' (0..255) when the model rescales its own input (Keras EfficientNet), else 'unit'."""
    for layer in leaf_layers(model)[:4]:
        if isinstance(layer, keras.layers.Rescaling):
            return "raw"
    return "unit"


def model_image_shape(model):
    """(height, width, channels) of an image model's fixed input; DataError otherwise."""
    shape = input_shape(model)
    if shape is None or len(shape) != 3 or None in shape:
        raise DataError(f"{model.name} takes input of shape {shape}; calibration needs a fixed image size (H, W, C)")
    return shape
