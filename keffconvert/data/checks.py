"""Checks on arrays a user gives: images, labels and their pairing, each problem one `DataError`."""

import numpy as np

from keffconvert.errors import DataError


def open_npz(path):
    """`path`'s arrays (np.load, no pickles); a missing or unreadable file is one DataError."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise DataError(f"{path}: no such file") from error
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from error


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
