"""scikit-learn's digits (1,797 real 8x8 handwritten digits), as RGB images of any size.

The embedded default data set: it ships with scikit-learn, so the main job and the tests run
offline with real images.
"""

import numpy as np


def load_digits_arrays():
    """(images in [0, 255] of shape (n, 8, 8), labels) in scikit-learn's fixed order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images * (255.0 / 16.0)).astype("float32"), data.target.astype("int64")


def resize_images(images, height, width, channels=3):
    """Bilinear resize of (n, h, w) or (n, h, w, c) images to (n, height, width, channels)."""
    from keras import ops

    x = np.asarray(images, dtype="float32")
    if x.ndim == 3:
        x = x[..., None]
    x = ops.convert_to_numpy(ops.image.resize(x, (height, width), interpolation="bilinear"))
    if x.shape[-1] == 1 and channels != 1:
        x = np.repeat(x, channels, axis=-1)
    return np.clip(x, 0, 255).astype("float32")


def digits_images(height, width, channels=3, limit=None):
    images, _ = load_digits_arrays()
    return resize_images(images[:limit], height, width, channels)
