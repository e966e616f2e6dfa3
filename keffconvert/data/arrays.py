"""Data held in memory (digits, `.npz`): the three splits as arrays, with the interface that
training, calibration and fidelity use (`sizes`, `labels`, `pipeline`, `sample`), which the
streamed sources (`keffconvert.data.stream`) offer too."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class LabelledSplits:
    """What every data set knows of its classes."""

    class_names: list

    @property
    def num_classes(self):
        return len(self.class_names)


@dataclass
class Dataset(LabelledSplits):
    """Images (uint8, N x H x W x C, values 0..255) and integer labels for the three splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list
    description: dict = field(default_factory=dict)

    @property
    def image_shape(self):
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def sizes(self):
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def labels(self, split):
        return getattr(self, f"y_{split}")

    def pipeline(self, split, batch_size, *, scale="raw", training=False, augment=None, seed=0, repeat=False,
                 cache=None):
        """A batched tf.data pipeline over one split (`data_tf.make_dataset`; `cache` is moot here)."""
        from keffconvert.data.images_tf import make_dataset

        return make_dataset(getattr(self, f"x_{split}"), getattr(self, f"y_{split}"), batch_size, scale=scale,
                            training=training, augment=augment, seed=seed, repeat=repeat)

    def sample(self, splits=("train",), count=None, seed=None):
        """`count` images of `splits` (joined in order) drawn with `seed`, in their order in the
        split, or the first `count` without a seed (all with neither)."""
        parts = [getattr(self, f"x_{split}") for split in splits]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if seed is None:
            return x[:count]
        return x[np.sort(np.random.default_rng(seed).permutation(len(x))[:count])]
