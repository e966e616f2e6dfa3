"""How closely a converted model reproduces the original before any training."""

import numpy as np


def agreement(original, converted, x, batch_size=32):
    """Top-1 agreement, output correlation and error of `converted` against `original` on `x`.

    Top-1 agreement is the share of inputs on which both models pick the same class; it is the
    measure that matters for a classifier and the one the README quotes. `x` is an array of
    images, or a batch source (`keffconvert.data.image_sources.ImageSource`) read batch by batch;
    where the source has labels, each model's top-1 accuracy on them is added
    (`original_top1`, `converted_top1`), the labels first checked against the models' outputs.
    """
    if not hasattr(x, "batches"):
        return compare_predictions(original.predict(x, batch_size=batch_size, verbose=0),
                                   converted.predict(x, batch_size=batch_size, verbose=0))
    reference, candidate = [], []
    for batch in x.batches(batch_size):
        reference.append(np.asarray(original.predict_on_batch(batch)))
        candidate.append(np.asarray(converted.predict_on_batch(batch)))
    reference, candidate = np.concatenate(reference), np.concatenate(candidate)
    result = compare_predictions(reference, candidate)
    labels = getattr(x, "labels", None)
    if labels is not None and reference.ndim == 2 and reference.shape[1] > 1:
        check_labels_fit(labels, reference.shape[1])
        result["original_top1"] = float(np.mean(reference.argmax(1) == labels))
        result["converted_top1"] = float(np.mean(candidate.argmax(1) == labels))
    return result


def check_labels_fit(labels, classes):
    """Labels must name one of the model's `classes` outputs (0..classes-1): a `DataError` otherwise."""
    from keffconvert.errors import DataError

    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"the data's labels go to {bad}, but the model has {classes} outputs (classes 0..{classes - 1})")


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
