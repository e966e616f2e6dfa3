"""The TensorFlow side of the data: decode and resize images, build tf.data pipelines, augment.

Kept apart from `keffconvert.data` (numpy checks and splits) because it needs TensorFlow itself,
not only Keras: `tf.image` and `tf.data`. Streamed sources (folders, TFRecords) decode in
`keffconvert.data_stream`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keffconvert.errors import DataError


def fit_images(x, height, width, channels=3):
    """uint8 images (N, h, w, c) resized (bilinear) to (N, height, width, channels)."""
    if x.shape[1:3] != (height, width):
        out = np.empty((len(x), height, width, x.shape[-1]), dtype=np.uint8)
        for start in range(0, len(x), 256):  # in chunks: bounded memory for big sets
            chunk = tf.image.resize(tf.constant(x[start:start + 256], tf.float32), (height, width),
                                    method="bilinear")
            out[start:start + 256] = np.clip(np.round(chunk.numpy()), 0, 255).astype(np.uint8)
        x = out
    return convert_channels(x, channels)


def convert_channels(x, channels):
    """(N, H, W, c) -> (N, H, W, channels): gray repeated to RGB, RGB averaged to gray, alpha dropped."""
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.shape[-1] == channels:
        return x
    if x.shape[-1] == 1:
        return np.repeat(x, channels, axis=-1)
    if channels == 1:
        return np.round(x.astype(np.float32).mean(axis=-1, keepdims=True)).astype(np.uint8)
    raise DataError(f"images have {x.shape[-1]} channels; the model takes {channels}")


def scale_pixels(images, scale):
    """uint8 0..255 -> float32 in the range the model expects (`keffconvert.model_inputs.INPUT_SCALES`)."""
    x = tf.cast(images, tf.float32)
    if scale == "unit":
        return x / 255.0
    if scale == "symmetric":
        return x / 127.5 - 1.0
    return x


def augmenter(shift=0.1, zoom=0.1, flip=False, seed=0):
    """Small random shifts and zooms (and horizontal flips if asked), as Keras preprocessing layers.

    Flips are off by default: they turn a 2 into something that is not a digit.
    """
    import keras

    layers = []
    if shift:
        layers.append(keras.layers.RandomTranslation(shift, shift, fill_mode="nearest", seed=seed,
                                                     dtype="float32"))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, zoom, fill_mode="nearest", seed=seed + 1, dtype="float32"))
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 2, dtype="float32"))
    if not layers:
        return None
    model = keras.Sequential(layers, name="augmentation")
    model.ranges = {"shift": float(shift), "zoom": float(zoom), "flip": bool(flip)}  # for streamed data
    return model


def make_dataset(x, y, batch_size, *, scale="raw", training=False, augment=None, seed=0, repeat=False):
    """A batched, prefetched tf.data pipeline over in-memory uint8 images and integer labels.

    Training pipelines reshuffle every epoch (seeded) and apply `augment` (a Keras layer or None)
    to the 0..255 pixels before scaling. `repeat` makes the pipeline endless (`steps_per_epoch`).
    Image folders and TFRecords are streamed instead (`keffconvert.data_stream`).
    """
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64)))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    if training and augment is not None:
        ds = ds.map(lambda a, b: (scale_pixels(augment(tf.cast(a, tf.float32), training=True), scale), b),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda a, b: (scale_pixels(a, scale), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def gpu_available():
    return bool(tf.config.list_physical_devices("GPU"))
