"""Images as a model takes them, from any data source: calibration sets and probe sets.

The data-aware conversion needs two disjoint sets: calibration images to fit on and held-out
images to measure agreement on, so the reported agreement is never measured on images the fit
has seen. Data with its own test split gives both from its two parts (calibration from the
training images); data without one (a flat folder, an `.npz` with only `x`, digits) is one pool,
split by a seeded draw. Neither needs labels (`keffconvert.data.image_sources`).
"""

from dataclasses import dataclass

import numpy as np

from keffconvert.data.image_sources import ImageSource, open_images
from keffconvert.data.pixels import guess_input_scale, model_image_shape
from keffconvert.errors import DataError


@dataclass
class CalibrationSets:
    """Calibration images and held-out images (None when the data is too small to spare any)."""

    calibration: ImageSource
    held_out: ImageSource | None
    description: str


def calibration_sets(spec, model, *, samples=512, held_out=512, seed=0, scale="auto", **source_options):
    """`samples` calibration images and up to `held_out` disjoint images of `spec` for `model`.

    `spec`: 'digits', an `.npz` (`x`, or `x_train`/`x_test`, labels optional), an image folder
    (flat, or one subfolder per class, optionally split in train/test), or TFRecord shards
    (`source_options`: `image_key`, `label_key`). `scale` 'auto' feeds 0..255 to a model that
    rescales its own input (Keras EfficientNet), else 0..1.
    """
    shape = model_image_shape(model)
    scale = guess_input_scale(model) if scale == "auto" else scale
    data = open_images(spec, shape, scale, **source_options)
    rng = np.random.default_rng(seed)
    pool = data.pool
    if data.test is not None:
        calibration = pool.take(rng.permutation(len(pool))[:samples])
        test = data.test.take(np.sort(rng.permutation(len(data.test))[:held_out]))
        where = f"from the training images of {spec}, {len(test)} held-out test images"
    else:
        count = len(pool)
        hold = min(held_out, count - samples) if count > samples else count // 5
        order = rng.permutation(count)
        calibration = pool.take(order[hold:hold + samples])
        test = pool.take(order[:hold]) if hold else None
        where = (f"of {spec} ({data.kind}), " + (f"{hold} other images held out" if hold
                                                  else "none held out (too few images)"))
    description = f"{len(calibration)} calibration images {where}, pixels '{scale}'"
    return CalibrationSets(calibration, test, description)


def probe_source(spec, model, limit=256, scale="auto", **source_options):
    """Up to `limit` images of `spec` to compare models on: its test images where it has a test
    split, else the first of its pool (labels kept where the data has them)."""
    shape = model_image_shape(model)
    scale = guess_input_scale(model) if scale == "auto" else scale
    data = open_images(spec, shape, scale, **source_options)
    source = data.test if data.test is not None else data.pool
    if len(source) == 0:
        raise DataError(f"{spec}: no images to compare on")
    return source.take(np.arange(min(limit, len(source))))
