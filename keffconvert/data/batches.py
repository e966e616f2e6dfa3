"""Calibration images as the fit reads them: a known number of images, handed out in batches.

The data-aware fit reads its images once, batch by batch (`keffconvert.fit.stream`), so they
need not all be in memory: `ArrayBatches` serves an array the caller holds, and the command
line's sources (an image folder, TFRecords, an `.npz`) serve batches decoded as they are read
(`keffconvert.data.model_inputs`). Anything with `__len__` (the number of images) and
`batches(batch_size)` (an iterator of float32 arrays (n, H, W, C), as the model takes them) will do.
"""

import numpy as np

from keffconvert.errors import DataError


class ArrayBatches:
    """An array of images (N, H, W, C) as batches."""

    def __init__(self, images):
        images = np.asarray(images)
        if images.ndim < 2:
            raise DataError(f"calibration images must be an array of images (N, H, W, C); got shape {images.shape}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def batches(self, batch_size):
        for start in range(0, len(self.images), batch_size):
            yield np.asarray(self.images[start:start + batch_size], "float32")


class CheckedBatches:
    """`source`'s batches, each checked: the shape the model takes, finite values; one-line
    `DataError`s otherwise (the walk stops at the first bad batch, before any weight is set)."""

    def __init__(self, source, image_shape, what="calibration images"):
        self.source = source
        self.image_shape = tuple(image_shape)
        self.what = what
        if len(source) == 0:
            raise DataError(f"no {what}: the set is empty")

    def __len__(self):
        return len(self.source)

    def batches(self, batch_size):
        seen = 0
        for batch in self.source.batches(batch_size):
            batch = np.asarray(batch, "float32")
            if tuple(batch.shape[1:]) != self.image_shape:
                raise DataError(f"{self.what} have shape {tuple(batch.shape[1:])}; the model takes "
                                f"{self.image_shape}")
            if not np.isfinite(batch).all():
                bad = seen + int(np.flatnonzero(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))[0])
                raise DataError(f"{self.what}: image {bad} holds NaN or infinite values")
            seen += len(batch)
            yield batch
        if seen != len(self.source):
            raise DataError(f"{self.what}: {len(self.source)} images announced, {seen} read")


def as_batches(images):
    """`images` as a batch source: an object with `batches` is one already, an array is wrapped."""
    if hasattr(images, "batches") and hasattr(images, "__len__"):
        return images
    if iter_once(images):
        raise DataError("calibration images: got an iterator, which can be read once; the fit reads its images "
                        "once per pass: give an array or a batch source (__len__ and batches(batch_size))")
    return ArrayBatches(images)


def iter_once(value):
    """Whether `value` is an iterator (a generator, say): iterating it again yields nothing."""
    try:
        return iter(value) is value
    except TypeError:
        return False
