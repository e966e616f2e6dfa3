"""TFRecord shards as training data (TensorFlow only): find them, read their labels once, split.

Accepted: a folder of shards named by split as tensorflow-datasets writes them
(`NAME-train.tfrecord-00000-of-00004`, `NAME-test.tfrecord-...`, optionally
`NAME-validation.tfrecord-...`; a folder whose shards carry no split name is all training data),
a glob for the training shards (`'data/*-train.tfrecord-*'`), or one `.tfrecord` file. Each
record is a `tf.train.Example` with the encoded image under `image/encoded` and the integer class
under `image/class/label` (TensorFlow's own image datasets' keys; `image_key`, `label_key`).

Splits: the shards' own validation and test splits where they exist, else stratified, seeded
hold-outs computed from the labels, which are read once when the data is opened (one pass over
the records, parsing only; it also checks that every shard is a TFRecord file and every record
has both keys, so a bad shard stops the command before anything is written). A record is named
by its shard and its position in it.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from keffconvert.errors import DataError

SHARD_NAME = re.compile(r"^(?P<name>.+)-(?P<split>train|training|validation|valid|val|test|testing)"
                        r"\.tfrecord(?:-\d+-of-\d+)?$")
SPLIT_OF = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
            "test": "test", "testing": "test"}
GLOB_CHARS = set("*?[")


def is_tfrecord_spec(spec):
    """True when `spec` names TFRecord data: a glob, a .tfrecord file, or a folder holding shards."""
    spec = str(spec)
    if GLOB_CHARS & set(spec):
        return True
    path = Path(spec)
    if path.is_file():
        return ".tfrecord" in path.name
    return path.is_dir() and any(".tfrecord" in p.name for p in path.iterdir() if p.is_file())


def find_shards(spec):
    """{split: sorted shard paths} for a folder, a glob (training shards) or one file."""
    spec = str(spec)
    if GLOB_CHARS & set(spec):
        found = sorted(p for p in glob.glob(spec) if Path(p).is_file())
        if not found:
            raise DataError(f"no files match {spec}")
        return {"train": found}
    path = Path(spec)
    if path.is_file():
        return {"train": [spec]}
    shards = sorted(p for p in path.iterdir() if p.is_file() and ".tfrecord" in p.name)
    named = {}
    for shard in shards:
        match = SHARD_NAME.match(shard.name)
        if match:
            named.setdefault(SPLIT_OF[match["split"]], []).append(str(shard))
    if not named:
        return {"train": [str(s) for s in shards]}
    if "train" not in named:
        raise DataError(f"{path} holds TFRecord shards but none for training (NAME-train.tfrecord-...)")
    return named


def read_labels(shards, image_key, label_key):
    """(records per shard, labels of all records in shard order); DataError naming a bad shard."""
    features = {image_key: tf.io.FixedLenFeature([], tf.string), label_key: tf.io.FixedLenFeature([], tf.int64)}
    counts, labels = [], []
    for shard in shards:
        ds = tf.data.TFRecordDataset(shard).batch(1024)
        ds = ds.map(lambda records: tf.io.parse_example(records, features)[label_key],
                    num_parallel_calls=tf.data.AUTOTUNE)
        found = []
        try:
            for batch in ds:
                found.append(batch.numpy())
        except tf.errors.DataLossError:
            raise DataError(f"{shard}: not a TFRecord file (or a corrupt one)") from None
        except tf.errors.InvalidArgumentError as error:
            message = getattr(error, "message", str(error))
            for key, option in ((image_key, "--image-key"), (label_key, "--label-key")):
                if key in message:
                    raise DataError(f"{shard}: a record has no '{key}' feature of the expected type "
                                    f"(choose the key with {option})") from None
            raise DataError(f"{shard}: records are not tf.train.Example images ({message.splitlines()[0]})") from None
        found = np.concatenate(found) if found else np.zeros(0, np.int64)
        counts.append(len(found))
        labels.append(found)
    return counts, (np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))


def open_tfrecords(spec, image_shape, *, val_split, test_split, seed, image_key="image/encoded",
                   label_key="image/class/label"):
    """The `StreamDataset` of TFRecord data `spec` at `image_shape` (height, width, channels)."""
    from keffconvert.data.checks import check_labels
    from keffconvert.data.stream import RecordSplit, StreamDataset

    found = find_shards(spec)
    read = {split: (shards, *read_labels(shards, image_key, label_key)) for split, shards in found.items()}
    for split, (shards, counts, labels) in read.items():
        if len(labels) == 0:
            raise DataError(f"the {split} shards of {spec} hold no records")

    def whole(split):
        shards, counts, labels = read[split]
        return RecordSplit(shards, counts, np.arange(len(labels)), labels, image_key, label_key)

    def part(split, indices):
        base = splits[split]
        return RecordSplit(base.shards, base.counts, base.keep[indices], base.labels[indices], image_key, label_key)

    splits = {split: whole(split) for split in read}
    description = {"source": str(spec), "kind": f"TFRecord shards ({sum(len(s) for s in found.values())} files, "
                                                f"keys {image_key}, {label_key})"}
    if "test" not in splits:
        kept, held = _hold_out(splits["train"].labels, test_split, seed, "test")
        splits["test"], splits["train"] = part("train", held), part("train", kept)
        description["test_source"] = (f"no test shards: {test_split:.0%} of the training records held out, "
                                      f"stratified, seed {seed}; never used for model selection")
    else:
        description["test_source"] = "the test shards; never used for model selection"
    if "val" not in splits:
        kept, held = _hold_out(splits["train"].labels, val_split, seed, "validation")
        splits["val"], splits["train"] = part("train", held), part("train", kept)
        description["val_source"] = f"{val_split:.0%} of the training records, stratified, seed {seed}"
    else:
        description["val_source"] = "the validation shards"
    k = check_labels(splits["train"].labels, [(f"labels of the {s} shards", splits[s].labels) for s in ("val", "test")])
    names = [str(i) for i in range(k)]
    description.update(image_size=list(image_shape), classes=k, class_names=names,
                       **{s: len(splits[s]) for s in ("train", "val", "test")}, streamed=True)
    return StreamDataset({s: splits[s] for s in ("train", "val", "test")}, names, tuple(image_shape), description)


def _hold_out(labels, fraction, seed, what):
    from keffconvert.data.splits import stratified_split

    kept, held = stratified_split(labels, fraction, seed)
    if len(held) == 0:
        raise DataError(f"too few records ({len(labels)}) to hold out a {what} split of {fraction:.0%}")
    return kept, held


def write_shard(path, images, labels, image_key="image/encoded", label_key="image/class/label"):
    """Write uint8 images (N, H, W, 3) as PNG records with labels: test and benchmark data."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label in zip(images, labels):
            encoded = tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()
            example = tf.train.Example(features=tf.train.Features(feature={
                image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            writer.write(example.SerializeToString())
    return path
