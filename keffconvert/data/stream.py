"""Streaming input (TensorFlow only): image folders and TFRecord shards as tf.data pipelines.

`keffconvert.data` finds the files and computes the splits (numpy, from the file list and the
labels, never from pixels); this module reads them. Every stage uses the same code: training
(`StreamDataset.pipeline`), and calibration, fidelity and int8 export, which take a seeded
sample of N images from the same stream (`StreamDataset.sample`).

A training pipeline: the split's file list (or shard list) shuffled each epoch, files read and
decoded in parallel, resized (bilinear) and rounded to uint8 exactly as the in-memory sources
are, optionally cached, repeated for `steps_per_epoch`, batched, augmented, scaled and
prefetched. Nothing is held but the file list and a few batches, so memory does not grow with
the number of images (a `cache` in memory does, by choice).

Undecodable images stop the run with the file's name (exit code 6; finished epochs are kept and
the same command resumes once the file is fixed or removed): an image is checked against the
PNG, JPEG, GIF and BMP signatures before decoding, so a file that is not an image is named at
once; one whose body is broken is found by a scan of the split after the error.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from keffconvert.data.arrays import LabelledSplits
from keffconvert.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
BAD_IMAGE = "keffconvert-undecodable-image"
SHUFFLE_AFTER_CACHE = 1024  # decoded images held for shuffling when the decoded stream is cached
RECORD_SHUFFLE = 1024  # encoded records held for shuffling TFRecord shards
SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")


# ---------------------------------------------------------------------------------------------
# Decoding


def looks_like_image(data):
    """True when the bytes start with a PNG, JPEG, GIF or BMP signature (what decode_image reads)."""
    head = tf.strings.substr(data, 0, 4)
    checks = [tf.strings.substr(head, 0, len(s)) == s for s in SIGNATURES]
    return tf.reduce_any(tf.stack(checks))


def decode(data, where, height, width, channels):
    """Encoded bytes -> uint8 (height, width, channels), as `data_tf.fit_images` would give.

    Fails with `BAD_IMAGE` and `where` in the message when the bytes are not an image.
    """
    check = tf.debugging.Assert(looks_like_image(data), [BAD_IMAGE, where, BAD_IMAGE])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bilinear")
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    if channels == 1:
        image = tf.cast(tf.round(tf.reduce_mean(tf.cast(image, tf.float32), axis=-1, keepdims=True)), tf.uint8)
    elif channels != 3:
        raise DataError(f"images are decoded to RGB; the model takes {channels} channels")
    return tf.ensure_shape(image, (height, width, channels))


def resize_and_augment(image, height, width, shift, zoom, flip):
    """Decoded image -> float32 (height, width, 3), resized, shifted, zoomed and flipped at random
    in one bilinear resampling (Keras' layers resample once for the resize and once per layer).

    The ranges are those of `data_tf.augmenter`'s layers: shift up to `shift` of each side, zoom
    by a factor in [1 - zoom, 1 + zoom] about the centre, edges filled with the nearest pixel.
    """
    source = tf.cast(tf.shape(image)[:2], tf.float32)
    sy, sx = source[0] / height, source[1] / width  # input pixels per output pixel
    z = tf.random.uniform((), 1.0 - zoom, 1.0 + zoom)
    ty = tf.random.uniform((), -shift, shift) * height
    tx = tf.random.uniform((), -shift, shift) * width
    mirror = tf.cast(tf.random.uniform(()) < 0.5, tf.float32) if flip else tf.constant(0.0)
    cy, cx = (source[0] - 1) / 2, (source[1] - 1) / 2
    # output pixel (u, v) -> input point, half-pixel centres as tf.image.resize: ((u + .5) * s - .5)
    ax = z * sx * (1 - 2 * mirror)
    bx = cx + z * (0.5 * sx - 0.5 - cx) - tx * sx + mirror * z * sx * (width - 1)
    by = cy + z * (0.5 * sy - 0.5 - cy) - ty * sy
    transform = tf.stack([ax, 0.0, bx, 0.0, z * sy, by, 0.0, 0.0])[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform, output_shape=[height, width],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0]
    return tf.ensure_shape(out, (height, width, 3))


# ---------------------------------------------------------------------------------------------
# What a split reads


@dataclass
class FileSplit:
    """One split of an image folder: file paths and their labels, in a fixed order."""

    paths: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    reads_files = True  # records() gives paths: the file is read in the same parallel map as decoding

    def records(self, positions=None, shuffle_seed=None):
        """(file name, label, file name) for the files at `positions` (all by default)."""
        paths, labels = self.paths, self.labels
        if positions is not None:
            paths, labels = paths[positions], labels[positions]
        ds = tf.data.Dataset.from_tensor_slices((paths.astype(str), labels.astype(np.int64)))
        if shuffle_seed is not None:
            ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
        return ds.map(lambda p, y: (p, y, p))


@dataclass
class RecordSplit:
    """One split of TFRecord shards: the shards it reads and which of their records it keeps.

    Records are numbered across `shards` in order (shard by shard); `keep` holds the numbers of
    this split's records, sorted, and `labels` their labels.
    """

    shards: list
    counts: list
    keep: np.ndarray
    labels: np.ndarray
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    reads_files = False  # records() gives the encoded image bytes

    def __len__(self):
        return len(self.labels)

    def records(self, positions=None, shuffle_seed=None):
        keep = self.keep if positions is None else self.keep[np.asarray(positions)]
        mask = np.zeros(sum(self.counts), dtype=bool)
        mask[keep] = True
        wanted = [i for i, (start, count) in enumerate(zip(self.starts, self.counts)) if mask[start:start + count].any()]
        mask = tf.constant(mask)
        shards = tf.data.Dataset.from_tensor_slices(
            (np.array([self.shards[i] for i in wanted], dtype=str), np.array([self.starts[i] for i in wanted], np.int64)))
        if shuffle_seed is not None:
            shards = shards.shuffle(len(wanted), seed=shuffle_seed, reshuffle_each_iteration=True)

        def read(shard, start):
            numbered = tf.data.TFRecordDataset(shard).enumerate()
            return numbered.map(lambda i, record: (start + i, i, record, shard))

        if shuffle_seed is None:  # sample() and scans: shard by shard, in order
            ds = shards.flat_map(read)
        else:
            ds = shards.interleave(read, cycle_length=max(1, min(len(wanted), 8)), num_parallel_calls=AUTOTUNE)
        ds = ds.filter(lambda number, index, record, shard: tf.gather(mask, number))
        if shuffle_seed is not None:
            ds = ds.shuffle(RECORD_SHUFFLE, seed=shuffle_seed, reshuffle_each_iteration=True)
        features = {self.image_key: tf.io.FixedLenFeature([], tf.string),
                    self.label_key: tf.io.FixedLenFeature([], tf.int64)}

        def parse(number, index, record, shard):
            parsed = tf.io.parse_single_example(record, features)
            where = tf.strings.join([shard, " record ", tf.strings.as_string(index)])
            return parsed[self.image_key], parsed[self.label_key], where

        return ds.map(parse, num_parallel_calls=AUTOTUNE)

    @property
    def starts(self):
        return [int(s) for s in np.concatenate([[0], np.cumsum(self.counts)[:-1]])] if self.counts else []


# ---------------------------------------------------------------------------------------------
# The data set


@dataclass
class StreamDataset(LabelledSplits):
    """Train/val/test splits read from files on demand; the interface of `data.Dataset` that
    training, calibration and fidelity use (`sizes`, `pipeline`, `sample`, `labels`)."""

    splits: dict
    class_names: list
    image_shape: tuple
    description: dict = field(default_factory=dict)

    @property
    def sizes(self):
        return {name: len(split) for name, split in self.splits.items()}

    def labels(self, split):
        return self.splits[split].labels

    def images(self, split, positions=None, shuffle_seed=None):
        """(uint8 image, label) of one split, unbatched, in the split's order (or the seeded
        shuffle's)."""
        height, width, channels = self.image_shape
        source = self.splits[split]
        read = tf.io.read_file if source.reads_files else (lambda data: data)
        return source.records(positions, shuffle_seed).map(
            lambda data, label, where: (decode(read(data), where, height, width, channels), label),
            num_parallel_calls=AUTOTUNE)

    def pipeline(self, split, batch_size, *, scale="raw", training=False, augment=None, seed=0, repeat=False,
                 cache=None):
        """A batched, prefetched tf.data pipeline of (scaled float32 images, int64 labels).

        `training` shuffles the file list every epoch (seeded) and applies `augment` (a Keras
        layer) to the 0..255 pixels; `repeat` makes it endless (for `steps_per_epoch`); `cache`
        ('memory' or a file prefix) keeps the decoded images after the first pass.
        """
        from keffconvert.data.images_tf import scale_pixels

        ranges = getattr(augment, "ranges", None)
        if training and ranges and not cache and self.image_shape[2] == 3:
            ds = self.augmented(split, ranges, seed)
            ds = (ds.repeat() if repeat else ds).batch(batch_size)
            ds = ds.map(lambda a, b: (scale_pixels(a, scale), b), num_parallel_calls=AUTOTUNE)
            return ds.with_options(_shard_by_data()).prefetch(AUTOTUNE)
        if cache:
            ds = self.images(split).cache("" if cache == "memory" else str(cache))
            if training:
                ds = ds.shuffle(SHUFFLE_AFTER_CACHE, seed=seed, reshuffle_each_iteration=True)
        else:
            ds = self.images(split, shuffle_seed=seed if training else None)
        if repeat:
            ds = ds.repeat()
        ds = ds.batch(batch_size)
        if training and augment is not None:
            ds = ds.map(lambda a, b: (scale_pixels(augment(tf.cast(a, tf.float32), training=True), scale), b),
                        num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda a, b: (scale_pixels(a, scale), b), num_parallel_calls=AUTOTUNE)
        return ds.with_options(_shard_by_data()).prefetch(AUTOTUNE)

    def augmented(self, split, ranges, seed):
        """(float32 image, label), shuffled, each image resized and augmented in one resampling in
        the parallel decode step (`resize_and_augment`), where the decoding threads share it.
        Images come as they are ready (`deterministic=False`), so one slow file holds up nothing;
        the order within a few batches then varies from run to run (the augmentation does anyway)."""
        height, width, _ = self.image_shape
        source = self.splits[split]
        read = tf.io.read_file if source.reads_files else (lambda data: data)

        def load(data, label, where):
            encoded = read(data)
            check = tf.debugging.Assert(looks_like_image(encoded), [BAD_IMAGE, where, BAD_IMAGE])
            with tf.control_dependencies([check]):
                image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            return resize_and_augment(image, height, width, ranges["shift"], ranges["zoom"], ranges["flip"]), label

        return source.records(None, seed).map(load, num_parallel_calls=AUTOTUNE, deterministic=False)

    def sample(self, splits=("train",), count=None, seed=None):
        """uint8 images (N, H, W, C): `count` of `splits` (joined in order) drawn with `seed`, in
        their order in the split, or the first `count` without a seed (all with neither)."""
        sizes = [len(self.splits[s]) for s in splits]
        total = sum(sizes)
        if seed is None:
            picked = np.arange(min(total, count if count is not None else total))
        else:
            picked = np.sort(np.random.default_rng(seed).permutation(total)[:count])
        height, width, channels = self.image_shape
        out = np.empty((len(picked), height, width, channels), np.uint8)
        done, start = 0, 0
        with data_errors(self):
            for split, size in zip(splits, sizes):
                positions = picked[(picked >= start) & (picked < start + size)] - start
                start += size
                if len(positions) == 0:
                    continue
                for batch, _ in self.images(split, positions).batch(256):
                    out[done:done + len(batch)] = batch.numpy()
                    done += len(batch)
        return out[:done]

    def to_arrays(self):
        """The in-memory `data.Dataset` of the same splits (decodes everything: small data only)."""
        from keffconvert.data.arrays import Dataset

        arrays = {}
        for split in ("train", "val", "test"):
            arrays[f"x_{split}"] = self.sample((split,))
            arrays[f"y_{split}"] = np.asarray(self.labels(split), np.int64)
        return Dataset(**arrays, class_names=list(self.class_names), description=dict(self.description))

    def find_undecodable(self):
        """The name of the first file (or record) that does not decode, or None."""
        height, width, channels = self.image_shape
        for split in ("train", "val", "test"):
            source = self.splits[split]
            read = tf.io.read_file if source.reads_files else (lambda data: data)
            every = source.records()
            expected = [w.numpy().decode() for w in every.map(lambda d, y, w: w)]
            ds = every.map(lambda d, y, w: (decode(read(d), w, height, width, channels)[0, 0, 0], w))
            ds = ds.ignore_errors() if hasattr(ds, "ignore_errors") else ds.apply(tf.data.experimental.ignore_errors())
            seen = {w.numpy().decode() for _, w in ds}
            for where in expected:
                if where not in seen:
                    return where
        return None


def _shard_by_data():
    """Options: under a multi-worker strategy each worker takes every Nth batch (not every Nth file)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


# ---------------------------------------------------------------------------------------------
# Errors while streaming


@contextmanager
def data_errors(dataset):
    """Turn a decoding failure inside a tf.data pipeline into one DataError naming the file."""
    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.NotFoundError) as error:
        message = getattr(error, "message", str(error))
        marked = re.search(re.escape(BAD_IMAGE) + r"\]?\s*\[?(.*?)\]?\s*\[?" + re.escape(BAD_IMAGE), message, re.S)
        if marked:
            raise DataError(f"cannot decode image {marked.group(1).strip()}: not a PNG, JPEG, GIF or BMP file") from None
        if isinstance(error, tf.errors.NotFoundError):
            raise DataError(f"a data file went missing while reading: {_first_line(message)}") from None
        bad = dataset.find_undecodable() if isinstance(dataset, StreamDataset) else None
        if bad is not None:
            raise DataError(f"cannot decode image {bad}: {_first_line(message)}") from None
        raise


def _first_line(message):
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = lines[0] if lines else message
    text = re.sub(r"^Graph execution error:\s*", "", text)
    return text[:200]
