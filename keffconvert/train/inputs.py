"""What a run trains on: the source model and its data, checked against each other, and the
image samples the data-aware conversion and batch-norm recalibration take from that data."""

import os

import keras

from keffconvert.errors import DataError, UnsupportedModelError, UsageConflict
from keffconvert.graph.model_info import input_shape
from keffconvert.loading import is_model_path


def image_input_shape(model):
    """(height, width, channels) of `model`'s input, each possibly None; refuses non-image models."""
    shape = input_shape(model)
    if shape is None or len(shape) != 3:
        raise UnsupportedModelError(f"{model.name} takes input of shape {shape}; train needs images (H, W, C)")
    return shape


def load_model_and_data(model, data, *, image_size, recipe, unsafe):
    """(source model, data): the data at the model's input size, the model's classes checked.

    The data is a `data.Dataset` (digits, .npz: in memory) or a `data_stream.StreamDataset` (image
    folders, TFRecords: file lists only, decoded as training reads them).
    """
    from keffconvert.data.sources import open_data as load_dataset

    split = dict(val_split=recipe.val_split, test_split=recipe.test_split,
                 seed=recipe.seed if recipe.split_seed is None else recipe.split_seed)
    if recipe.image_key != "image/encoded" or recipe.label_key != "image/class/label":
        split.update(image_key=recipe.image_key, label_key=recipe.label_key)
    if isinstance(model, str) and not is_model_path(model):
        from keffconvert.loading import load_model

        size = image_size or 224
        dataset = load_dataset(data, (size, size), 3, **split)
        source = load_model(model, unsafe=unsafe, classes=dataset.num_classes, input_size=size)
        return source, dataset
    if isinstance(model, keras.Model):
        source = model
    else:
        from keffconvert.loading import load_model

        source = load_model(model, unsafe=unsafe)
    height, width, channels = image_input_shape(source)
    if height is None or width is None:
        height = width = image_size or 224
    elif image_size is not None and (image_size, image_size) != (height, width):
        raise UsageConflict(f"--image-size {image_size} contradicts the model's input {height}x{width}")
    dataset = load_dataset(data, (height, width), channels or 3, **split)
    units = source.outputs[0].shape[-1]
    if units != dataset.num_classes:
        raise DataError(f"the model has {units} outputs but the data has {dataset.num_classes} classes "
                        f"(labels 0..{dataset.num_classes - 1})")
    return source, dataset


def calibration_sample(spec, samples, source, dataset, scale, recipe):
    """Calibration images for the data-aware conversion, or None for the plain slices."""
    from keffconvert.data.model_inputs import calibration_sets

    if spec is None or os.fspath(spec) == "none":
        return None
    if os.fspath(spec) == "train":
        return training_sample(dataset, scale, samples, recipe.seed)
    return calibration_sets(spec, source, samples=samples, seed=recipe.seed, scale=scale,
                            image_key=recipe.image_key, label_key=recipe.label_key).calibration


def recalibration_images(recipe, dataset, scale, samples=512):
    return training_sample(dataset, scale, samples, recipe.seed + 1) if recipe.bn_mode == "recalibrate" else None


def training_sample(dataset, scale, samples, seed):
    """`samples` training images (a seeded draw, in their original order), scaled for the model."""
    from keffconvert.data.pixels import scale_pixels

    return scale_pixels(dataset.sample(("train",), samples, seed), scale)
