"""Training data: find it, check it, split it. Pure numpy; decoding and tf.data live in `data_tf`,
`data_stream` and `tfrecords`.

Four sources, all giving uint8 images in [0, 255] at the model's input size. `digits` and `.npz`
are small and held in memory (`Dataset`); image folders and TFRecord shards are streamed from disk
(`data_stream.StreamDataset`, opened by `open_data`), with the splits computed from the file list:

* `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, upscaled, RGB (no user files);
* an `.npz` with `x_train`, `y_train`, `x_test`, `y_test` (optionally `x_val`, `y_val`,
  `class_names`); images (N, H, W[, C]) in [0, 1] or [0, 255], labels integers (or one-hot);
* an image folder with one subfolder per class, either directly (`DIR/cat/*.jpg`) or split
  (`DIR/train/cat/*.jpg` and `DIR/test/cat/*.jpg`, optionally `DIR/val/...`);
* TFRecord shards (`keffconvert.tfrecords`): a folder of `NAME-train.tfrecord-*` (and `-test`,
  `-validation`) shards, a glob for the training shards, or one `.tfrecord` file.

Both kinds offer what training, calibration and fidelity use: `sizes`, `labels(split)`,
`pipeline(split, batch_size, ...)` (tf.data) and `sample(splits, count, seed)` (uint8 arrays).

Splits: the validation split (default 10%) is held out from the training images, stratified and
seeded; the test split is the source's own, or (digits, a folder without `test/`) a stratified,
seeded hold-out (default 20%) that is never used for model selection. Every problem a user can
cause becomes one `DataError` line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keffconvert.data.arrays import Dataset
from keffconvert.data.checks import as_images, as_labels, check_labels, check_pair, open_npz, to_uint8
from keffconvert.data.splits import hold_out
from keffconvert.errors import DataError

NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def is_streamed(spec):
    """True for the sources read from disk as they are used: image folders and TFRecord shards."""
    spec = os.fspath(spec)
    if spec == "digits" or spec.lower().endswith(".npz"):
        return False
    if Path(spec).is_dir():
        return True
    from keffconvert.data.tfrecords import is_tfrecord_spec

    return is_tfrecord_spec(spec)


def open_data(spec, image_size, channels=3, *, val_split=0.1, test_split=0.2, seed=0,
              image_key="image/encoded", label_key="image/class/label"):
    """The data for `spec`, streamed (image folder, TFRecords) or in memory (digits, .npz).

    Only file lists and labels are read here; images are decoded as a pipeline or `sample` asks.
    """
    spec = os.fspath(spec)
    if not is_streamed(spec):
        return load_dataset(spec, image_size, channels, val_split=val_split, test_split=test_split, seed=seed)
    if not 0 < val_split < 1:
        raise DataError(f"validation split {val_split} must be between 0 and 1")
    if not 0 < test_split < 1:
        raise DataError(f"test split {test_split} must be between 0 and 1")
    shape = (int(image_size[0]), int(image_size[1]), int(channels))
    from keffconvert.data.tfrecords import is_tfrecord_spec

    if is_tfrecord_spec(spec):
        from keffconvert.data.tfrecords import open_tfrecords

        return open_tfrecords(spec, shape, val_split=val_split, test_split=test_split, seed=seed,
                              image_key=image_key, label_key=label_key)
    from keffconvert.data.folders import open_folder

    return open_folder(Path(spec), shape, val_split=val_split, test_split=test_split, seed=seed)


def load_dataset(spec, image_size, channels=3, *, val_split=0.1, test_split=0.2, seed=0):
    """The in-memory `Dataset` for `spec` ('digits', an .npz, an image folder or TFRecords) at
    `image_size` (h, w). Folders and TFRecords are decoded whole through their stream: for small
    data; training streams them (`open_data`)."""
    if not 0 < val_split < 1:
        raise DataError(f"validation split {val_split} must be between 0 and 1")
    if not 0 < test_split < 1:
        raise DataError(f"test split {test_split} must be between 0 and 1")
    height, width = int(image_size[0]), int(image_size[1])
    spec = os.fspath(spec)
    if spec == "digits":
        parts = _digits(test_split, seed)
    elif spec.lower().endswith(".npz"):
        parts = _npz(Path(spec), test_split, seed)
    elif is_streamed(spec):
        return open_data(spec, (height, width), channels, val_split=val_split, test_split=test_split,
                         seed=seed).to_arrays()
    elif Path(spec).exists():
        raise DataError(f"{spec}: not a folder of images nor an .npz file")
    else:
        raise DataError(f"{spec}: no such data (give 'digits', an .npz file, an image folder or TFRecord shards)")

    x_train, y_train, x_val, y_val, x_test, y_test, names, description = parts
    if x_val is None:
        x_train, y_train, x_val, y_val = hold_out(x_train, y_train, val_split, seed, "validation")
        description["val_source"] = f"{val_split:.0%} of the training images, stratified, seed {seed}"
    else:
        description["val_source"] = "the data's own validation split"
    from keffconvert.data.images_tf import fit_images

    x_train, x_val, x_test = (fit_images(x, height, width, channels) for x in (x_train, x_val, x_test))
    description.update(
        image_size=[height, width, channels],
        classes=len(names),
        class_names=list(names),
        train=int(len(y_train)), val=int(len(y_val)), test=int(len(y_test)),
    )
    return Dataset(x_train, y_train, x_val, y_val, x_test, y_test, list(names), description)


def _digits(test_split, seed):
    from keffconvert.data.digits import load_digits_arrays

    x, y = load_digits_arrays()
    x = to_uint8(as_images(x, "digits"))
    x_train, y_train, x_test, y_test = hold_out(x, y, test_split, seed, "test")
    description = {
        "source": "digits",
        "kind": "scikit-learn digits: 1,797 real 8x8 handwritten digits, upscaled (bilinear), RGB",
        "test_source": f"{test_split:.0%} of the 1,797 images held out, stratified, seed {seed}; "
                       "never used for model selection",
    }
    return x_train, y_train, None, None, x_test, y_test, [str(d) for d in range(10)], description


def _npz(path, test_split, seed):
    with open_npz(path) as archive:
        missing = [key for key in NPZ_REQUIRED if key not in archive.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)} (needs {', '.join(NPZ_REQUIRED)})")
        try:
            arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot read its arrays ({error})") from error
    has_val = "x_val" in arrays or "y_val" in arrays
    if has_val and not ("x_val" in arrays and "y_val" in arrays):
        raise DataError(f"{path} has only one of x_val and y_val")
    splits = ("train", "val", "test") if has_val else ("train", "test")
    x, y = {}, {}
    for split in splits:
        x[split] = as_images(arrays[f"x_{split}"], f"x_{split}")
        y[split] = as_labels(arrays[f"y_{split}"], f"y_{split}")
        check_pair(x[split], y[split], split)
    for split in splits[1:]:
        if x[split].shape[1:] != x["train"].shape[1:]:
            raise DataError(f"x_{split} images have shape {x[split].shape[1:]}, "
                            f"x_train images {x['train'].shape[1:]}")
    names = None
    if "class_names" in arrays:
        names = [str(n) for n in np.asarray(arrays["class_names"]).ravel()]
    k = check_labels(y["train"], [(f"y_{s}", y[s]) for s in splits[1:]], None if names is None else len(names))
    names = names or [str(i) for i in range(k)]
    description = {
        "source": str(path),
        "kind": f"npz arrays, images {tuple(int(d) for d in x['train'].shape[1:])}",
        "test_source": "the file's x_test/y_test; never used for model selection",
    }
    x = {split: to_uint8(images) for split, images in x.items()}
    return (x["train"], y["train"], x.get("val"), y.get("val"), x["test"], y["test"], names, description)
