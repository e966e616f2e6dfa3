"""How closely a converted model reproduces the original before any training."""

import numpy as np


def agreement(original, converted, x, batch_size=32):
    """Top-1 agreement, output correlation and error of `converted` against `original` on `x`.

    Top-1 agreement is the share of inputs on which both models pick the same class; it is the
    measure that matters for a classifier and the one the README quotes.
    """
    y_ref = np.asarray(original.predict(x, batch_size=batch_size, verbose=0), dtype="float64")
    y_new = np.asarray(converted.predict(x, batch_size=batch_size, verbose=0), dtype="float64")
    ref_flat, new_flat = y_ref.reshape(len(x), -1), y_new.reshape(len(x), -1)
    result = {
        "samples": int(len(x)),
        "mean_abs_diff": float(np.mean(np.abs(ref_flat - new_flat))),
        "max_abs_diff": float(np.max(np.abs(ref_flat - new_flat))),
        "correlation": float(np.corrcoef(ref_flat.ravel(), new_flat.ravel())[0, 1]),
    }
    if ref_flat.shape[1] > 1:
        result["top1_agreement"] = float(np.mean(ref_flat.argmax(1) == new_flat.argmax(1)))
    return result
