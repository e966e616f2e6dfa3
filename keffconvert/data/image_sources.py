"""Images for the data-aware fit and for measuring agreement, from the data users have.

A calibration set needs no labels, and its size is the user's choice; so besides the sources
training reads (digits, an `.npz` with train/test arrays, an image folder with one subfolder per
class, TFRecord shards) this also opens a flat folder of images and an `.npz` holding only `x`.
Labels, where the data has them, are kept for measuring accuracy; the number of classes is the
model's, never inferred from them.

An `ImageSource` reads its images only when its batches are asked for (files and records are
decoded batch by batch at the model's input size; arrays are sliced), scaled as the model takes
them, so any number of images can be used without holding them. Every problem a user can cause
is one `DataError` line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keffconvert.data.checks import as_images, as_labels, open_npz, to_uint8
from keffconvert.data.folders import IMAGE_SUFFIXES
from keffconvert.data.pixels import scale_pixels
from keffconvert.errors import DataError


class ArrayPart:
    """Images held in an array (uint8, 0..255) at the model's size."""

    def __init__(self, images):
        self.images = images

    def read(self, positions, batch_size):
        for start in range(0, len(positions), batch_size):
            yield self.images[positions[start:start + batch_size]]


class StreamPart:
    """One split of a streamed data set (`keffconvert.data.stream.StreamDataset`), decoded as read."""

    def __init__(self, dataset, split):
        self.dataset, self.split = dataset, split

    def read(self, positions, batch_size):
        from keffconvert.data.stream import data_errors

        positions = np.sort(positions)  # TFRecords are read in file order: so are the labels
        with data_errors(self.dataset):
            for start in range(0, len(positions), batch_size):
                chunk = positions[start:start + batch_size]
                for batch, _ in self.dataset.images(self.split, chunk).batch(len(chunk)):
                    yield batch.numpy()


@dataclass
class ImageSource:
    """Some images of a data set, as a model takes them, read batch by batch (`batches`).

    `parts` are (reader, positions) pairs, read in order; `labels` (one per image, or None) are
    the data's own.
    """

    parts: list
    labels: np.ndarray | None
    scale: str
    description: str = ""
    _sizes: list = field(default_factory=list)

    def __post_init__(self):
        self._sizes = [len(positions) for _, positions in self.parts]

    def __len__(self):
        return sum(self._sizes)

    def batches(self, batch_size):
        """float32 batches (n, H, W, C) in the model's pixel scale."""
        for reader, positions in self.parts:
            for batch in reader.read(np.asarray(positions), batch_size):
                yield scale_pixels(batch, self.scale)

    def take(self, indices, description=None):
        """The images at `indices` of this source, in this source's order, as a new source."""
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        parts, offset = [], 0
        for (reader, positions), size in zip(self.parts, self._sizes):
            mine = indices[(indices >= offset) & (indices < offset + size)] - offset
            if len(mine):
                parts.append((reader, np.asarray(positions)[mine]))
            offset += size
        labels = None if self.labels is None else self.labels[indices]
        return ImageSource(parts, labels, self.scale, description or self.description)

    def array(self, batch_size=64):
        """Every image in one array (for the few that need it: TFLite's int8 calibration)."""
        batches = list(self.batches(batch_size))
        return np.concatenate(batches) if batches else np.zeros((0,), "float32")


@dataclass
class SplitSource:
    """A data source opened for calibration: its images in a `pool` to draw calibration images
    from, and its own `test` images when it has a test split (else None)."""

    pool: ImageSource
    test: ImageSource | None
    kind: str


def open_images(spec, image_shape, scale, *, image_key="image/encoded", label_key="image/class/label"):
    """`spec` as a `SplitSource` of images at `image_shape` (H, W, C), pixels in `scale`."""
    spec = os.fspath(spec)
    if spec == "digits":
        return _digits(image_shape, scale)
    path = Path(spec)
    if spec.lower().endswith(".npz"):
        return _npz(path, image_shape, scale)
    if path.is_dir():
        return _folder(path, image_shape, scale)
    from keffconvert.data.tfrecords import is_tfrecord_spec

    if is_tfrecord_spec(spec):
        return _streamed(spec, image_shape, scale, image_key=image_key, label_key=label_key)
    if path.exists():
        raise DataError(f"{spec}: not a folder of images, an .npz file nor TFRecord shards")
    raise DataError(f"{spec}: no such data (give 'digits', an .npz file, an image folder or TFRecord shards)")


def _digits(image_shape, scale):
    """Digits with the test split training holds out (so agreement is measured on those images)."""
    from keffconvert.data.sources import load_dataset

    data = load_dataset("digits", image_shape[:2], image_shape[2])
    x = np.concatenate([data.x_train, data.x_val])
    pool = ImageSource([(ArrayPart(x), np.arange(len(x)))], np.concatenate([data.y_train, data.y_val]), scale)
    test = ImageSource([(ArrayPart(data.x_test), np.arange(len(data.x_test)))], data.y_test, scale)
    return SplitSource(pool, test, "scikit-learn's digits")


def _npz(path, image_shape, scale):
    with open_npz(path) as archive:
        keys = set(archive.files)
        if "x" in keys:
            splits = {"pool": ("x", "y")}
        elif {"x_train", "x_test"} <= keys:
            splits = {"pool": ("x_train", "y_train"), "test": ("x_test", "y_test")}
        elif "x_test" in keys:
            splits = {"pool": ("x_test", "y_test")}
        else:
            raise DataError(f"{path} holds no images: expected an array x (or x_train and x_test); "
                            f"it holds {', '.join(sorted(keys)) or 'nothing'}")
        sources = {}
        for split, (x_key, y_key) in splits.items():
            try:
                x = as_images(archive[x_key], f"{path.name}: {x_key}")
                y = _labels_or_none(archive[y_key]) if y_key in keys else None
            except (OSError, ValueError) as error:
                raise DataError(f"{path}: cannot read {x_key} ({error})") from None
            if tuple(x.shape[1:]) != tuple(image_shape):
                raise DataError(f"{path}: {x_key} holds images of shape {tuple(x.shape[1:])}; the model takes "
                                f"{tuple(image_shape)}")
            if y is not None and len(y) != len(x):
                raise DataError(f"{path}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels")
            if len(x) == 0:
                raise DataError(f"{path}: {x_key} holds no images")
            sources[split] = ImageSource([(ArrayPart(to_uint8(x)), np.arange(len(x)))], y, scale)
    return SplitSource(sources["pool"], sources.get("test"), f"arrays of {path}")


def _labels_or_none(y):
    """Integer labels when `y` holds them (one per image, or one-hot rows); None for anything else
    (such as reference predictions kept beside the images)."""
    try:
        return as_labels(y, "y")
    except DataError:
        return None


def _folder(root, image_shape, scale):
    """A flat folder of images (unlabeled), or a class-per-folder tree (labeled, split or not)."""
    if not any(root.iterdir()):
        raise DataError(f"{root} is empty: expected images, or one subfolder of images per class")
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))
    has_classes = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if flat or not has_classes:
        if not flat:
            raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        from keffconvert.data.stream import FileSplit, StreamDataset

        dataset = StreamDataset({"pool": FileSplit(np.array([str(p) for p in flat]), np.zeros(len(flat), np.int64))},
                                ["?"], tuple(image_shape))
        pool = ImageSource([(StreamPart(dataset, "pool"), np.arange(len(flat)))], None, scale)
        return SplitSource(pool, None, f"{len(flat)} images in {root}")
    return _streamed(root, image_shape, scale)


def _streamed(spec, image_shape, scale, **keys):
    """An image-folder tree or TFRecord shards, through the same stream as training."""
    from keffconvert.data.sources import open_data

    dataset = open_data(spec, image_shape[:2], image_shape[2], **keys)
    own_test = "test_source" in dataset.description and "held out" not in dataset.description["test_source"]
    pool_splits = ("train", "val") if own_test else ("train", "val", "test")
    parts = [(StreamPart(dataset, s), np.arange(len(dataset.splits[s]))) for s in pool_splits]
    labels = np.concatenate([np.asarray(dataset.labels(s)) for s in pool_splits])
    pool = ImageSource(parts, labels, scale)
    test = None
    if own_test:
        test = ImageSource([(StreamPart(dataset, "test"), np.arange(len(dataset.splits["test"])))],
                           np.asarray(dataset.labels("test")), scale)
    return SplitSource(pool, test, dataset.description.get("kind", str(spec)))
