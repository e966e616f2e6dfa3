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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keffconvert.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


@dataclass
class Dataset:
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
    def num_classes(self):
        return len(self.class_names)

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
        from keffconvert.data_tf import make_dataset

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


# ---------------------------------------------------------------------------------------------
# Splitting


def stratified_split(labels, fraction, seed):
    """(kept indices, held-out indices): `fraction` of each class held out, by a seeded shuffle.

    Each class keeps at least one image. Indices come back sorted, so the split depends only on
    the labels, `fraction` and `seed`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held.append(members[:count])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held


def hold_out(x, y, fraction, seed, what):
    """Split (x, y) into (x, y) kept and (x, y) held out; refuse when nothing can be held out."""
    kept, held = stratified_split(y, fraction, seed)
    if len(held) == 0:
        raise DataError(f"too few images ({len(y)}) to hold out a {what} split of {fraction:.0%}")
    return x[kept], y[kept], x[held], y[held]


# ---------------------------------------------------------------------------------------------
# Checks


def as_labels(y, name):
    """Integer labels from a label array (N,), (N, 1) or one-hot (N, K); DataError otherwise."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise DataError(f"{name} has shape {y.shape}: expected integer labels or one-hot rows")
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise DataError(f"{name} has shape {y.shape}: expected one integer label per image")
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{name} holds non-integer labels (dtype {y.dtype})")
    return y.astype(np.int64)


def as_images(x, name):
    """Images as (N, H, W, C) with C in {1, 3, 4}, finite; 2-D single images become one channel."""
    x = np.asarray(x)
    if x.dtype.kind not in "iuf" and x.dtype != bool:
        raise DataError(f"{name} is not numeric (dtype {x.dtype})")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{name} has shape {x.shape}: expected images (N, H, W) or (N, H, W, C) with C 1, 3 or 4")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise DataError(f"{name} holds NaN or infinite values")
    return x


def check_pair(x, y, name):
    if len(x) != len(y):
        raise DataError(f"x_{name} has {len(x)} images but y_{name} has {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"the {name} split is empty")


def check_labels(y_train, others, num_classes=None):
    """Classes are 0..K-1 with K from the training labels (or given); every label in range."""
    if len(np.unique(y_train)) < 2:
        raise DataError(f"the training data holds only one class ({int(y_train[0])}); need at least two")
    k = int(y_train.max()) + 1 if num_classes is None else int(num_classes)
    for name, y in [("y_train", y_train), *others]:
        if len(y) and (y.min() < 0 or y.max() >= k):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(f"{name} holds label {bad}, out of range 0..{k - 1}")
    return k


def to_uint8(x):
    """[0, 1] floats, or [0, 255] numbers, as uint8 0..255."""
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
    if x.size and x.min() < 0:
        raise DataError(f"images hold negative values (min {x.min():g}); expected [0, 1] or [0, 255]")
    if x.size and x.max() <= 1.0:
        x = x * 255.0
    if x.size and x.max() > 255.0 + 1e-3:
        raise DataError(f"images hold values up to {x.max():g}; expected [0, 1] or [0, 255]")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Sources


def is_streamed(spec):
    """True for the sources read from disk as they are used: image folders and TFRecord shards."""
    spec = os.fspath(spec)
    if spec == "digits" or spec.lower().endswith(".npz"):
        return False
    if Path(spec).is_dir():
        return True
    from keffconvert.tfrecords import is_tfrecord_spec

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
    from keffconvert.tfrecords import is_tfrecord_spec

    if is_tfrecord_spec(spec):
        from keffconvert.tfrecords import open_tfrecords

        return open_tfrecords(spec, shape, val_split=val_split, test_split=test_split, seed=seed,
                              image_key=image_key, label_key=label_key)
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
    from keffconvert.data_tf import fit_images

    x_train, x_val, x_test = (fit_images(x, height, width, channels) for x in (x_train, x_val, x_test))
    description.update(
        image_size=[height, width, channels],
        classes=len(names),
        class_names=list(names),
        train=int(len(y_train)), val=int(len(y_val)), test=int(len(y_test)),
    )
    return Dataset(x_train, y_train, x_val, y_val, x_test, y_test, list(names), description)


def _digits(test_split, seed):
    from keffconvert.digits import load_digits_arrays

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
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise DataError(f"{path}: no such file") from error
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from error
    with archive:
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


def _find_split_folder(root, split):
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def list_image_folder(root):
    """(class names, [(path, class index)]) for `root/<class>/<image>`; DataError when unusable."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} holds no class subfolders (expected {root}/<class>/<image>)")
    files = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, index) for p in found]
    if len(classes) < 2:
        raise DataError(f"{root} holds only one class ({classes[0]}); need at least two")
    return classes, files


def open_folder(root, image_shape, *, val_split, test_split, seed):
    """The `StreamDataset` of an image folder: file lists per split, nothing decoded yet."""
    from keffconvert.data_stream import FileSplit, StreamDataset

    names, parts, description = folder_files(root, test_split, seed)
    if "val" not in parts:
        paths, labels = parts["train"]
        kept, held = stratified_split(labels, val_split, seed)
        if len(held) == 0:
            raise DataError(f"too few images ({len(labels)}) to hold out a validation split of {val_split:.0%}")
        parts["train"], parts["val"] = (paths[kept], labels[kept]), (paths[held], labels[held])
        description["val_source"] = f"{val_split:.0%} of the training images, stratified, seed {seed}"
    else:
        description["val_source"] = "the data's own validation split"
    description.update(image_size=list(image_shape), classes=len(names), class_names=list(names),
                       **{s: int(len(parts[s][1])) for s in ("train", "val", "test")}, streamed=True)
    splits = {s: FileSplit(*parts[s]) for s in ("train", "val", "test")}
    return StreamDataset(splits, list(names), tuple(image_shape), description)


def folder_files(root, test_split, seed):
    """(class names, {split: (paths, labels)}, description) of an image folder, split as documented
    at the top: the folder's own train/test (and val) folders, or a stratified, seeded hold-out."""
    train_root = _find_split_folder(root, "train")
    test_root = _find_split_folder(root, "test")
    if (train_root is None) != (test_root is None):
        raise DataError(f"{root} has a {'train' if train_root else 'test'} folder but no "
                        f"{'test' if train_root else 'train'} folder")

    def arrays(files):
        return np.array([str(p) for p, _ in files]), np.array([c for _, c in files], dtype=np.int64)

    if train_root is None:
        if not any(root.iterdir()):
            raise DataError(f"{root} is empty (expected {root}/<class>/<image>)")
        names, files = list_image_folder(root)
        paths, labels = arrays(files)
        kept, held = stratified_split(labels, test_split, seed)
        if len(held) == 0:
            raise DataError(f"too few images ({len(labels)}) to hold out a test split of {test_split:.0%}")
        description = {
            "source": str(root),
            "kind": f"image folder, {len(names)} classes, {len(files)} images",
            "test_source": f"the folder has no test split: {test_split:.0%} of its images held out, "
                           f"stratified, seed {seed}; never used for model selection",
        }
        return names, {"train": (paths[kept], labels[kept]), "test": (paths[held], labels[held])}, description

    names, train_files = list_image_folder(train_root)
    parts = {"train": arrays(train_files)}
    val_root = _find_split_folder(root, "val")
    for split, folder in (("val", val_root), ("test", test_root)):
        if folder is None:
            continue
        split_names, split_files = list_image_folder(folder)
        unknown = sorted(set(split_names) - set(names))
        if unknown:
            raise DataError(f"{folder} has classes not in {train_root}: {', '.join(unknown[:5])}")
        parts[split] = arrays([(p, names.index(split_names[c])) for p, c in split_files])
    description = {
        "source": str(root),
        "kind": f"image folder with train/test splits, {len(names)} classes",
        "test_source": f"{test_root}; never used for model selection",
    }
    return names, parts, description
