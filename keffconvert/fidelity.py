"""How closely a converted model reproduces the original before any training."""

import numpy as np


def agreement(original, converted, x, batch_size=32):
    """Top-1 agreement, output correlation and error of `converted` against `original` on `x`.

    Top-1 agreement is the share of inputs on which both models pick the same class; it is the
    measure that matters for a classifier and the one the README quotes.
    """
    return compare_predictions(original.predict(x, batch_size=batch_size, verbose=0),
                               converted.predict(x, batch_size=batch_size, verbose=0))


def compare_predictions(reference, candidate):
    """The same measures for two arrays of predictions."""
    ref_flat = np.asarray(reference, "float64").reshape(len(reference), -1)
    new_flat = np.asarray(candidate, "float64").reshape(len(candidate), -1)
    result = {
        "samples": int(len(ref_flat)),
        "mean_abs_diff": float(np.mean(np.abs(ref_flat - new_flat))),
        "max_abs_diff": float(np.max(np.abs(ref_flat - new_flat))),
        "correlation": _correlation(ref_flat.ravel(), new_flat.ravel()),
    }
    if ref_flat.shape[1] > 1:
        result["top1_agreement"] = float(np.mean(ref_flat.argmax(1) == new_flat.argmax(1)))
    return result


def _correlation(a, b):
    """Pearson correlation; None when either side is constant (it is undefined there)."""
    if np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def probe_images(source, model, limit=256, **source_options):
    """Images to compare on: an .npz's `x` (or `x_test`), 'digits' resized to the model input, or
    the first `limit` test images of an image folder or TFRecord shards, read through the training
    stream (`keffconvert.data_stream`) and scaled as the model takes them ('raw' 0..255 for a model
    that rescales its own input, else 0..1)."""
    from keffconvert.errors import DataError

    shape = tuple(model.inputs[0].shape[1:])
    if source != "digits" and not str(source).lower().endswith(".npz"):
        from keffconvert.data import is_streamed

        if is_streamed(source):
            defaults = {"image_key": "image/encoded", "label_key": "image/class/label"}
            keys = {k: v for k, v in source_options.items() if v is not None and v != defaults.get(k)}
            return _streamed_probe(source, model, limit, keys)
    if source == "digits":
        from keffconvert.digits import digits_images

        if None in shape or len(shape) != 3:
            raise DataError(f"'digits' needs a fixed image input size; the model takes {shape}")
        return digits_images(shape[0], shape[1], channels=shape[2], limit=limit)
    try:
        with np.load(source) as data:
            key = "x" if "x" in data else "x_test"
            x = data[key][:limit].astype("float32")
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"cannot read images from {source}: {error}") from error
    if tuple(x.shape[1:]) != shape and None not in shape:
        raise DataError(f"{source} holds images of shape {x.shape[1:]}, the model takes {shape}")
    return x


def _streamed_probe(source, model, limit, source_options):
    from keffconvert.data import open_data
    from keffconvert.model_inputs import model_image_shape, scale_pixels
    from keffconvert.train import guess_input_scale

    height, width, channels = model_image_shape(model)
    dataset = open_data(source, (height, width), channels, **source_options)
    return scale_pixels(dataset.sample(("test",), limit), guess_input_scale(model))
