"""Check an export before it is written: run it and its source model on the same images and say
whether they agree (`verify_export`), in one line (`describe_check`).

A float export differs from its source by float rounding only (about 1e-6 relative), so it must
stay within `DEFAULT_TOLERANCE`; an int8 export differs by design and is judged by its top-1
agreement instead, when asked.
"""

from pathlib import Path

import numpy as np

DEFAULT_TOLERANCE = 1e-3


def verify_export(source, exported, images=None, *, int8=False, tolerance=DEFAULT_TOLERANCE, min_agreement=None,
                  samples=32):
    """Run `exported` and its `source` Keras model on check images and say whether they agree.

    `exported`: a Keras model, TFLite flatbuffer bytes, a callable x -> outputs, or a path to a
    SavedModel folder, a .tflite file or a .keras/.h5 file.
    `images`: the check images (the first `samples` are used); None: 8 random images in 0..255, when
    the source has one input of fixed shape. Float exports must keep max |difference| within
    `tolerance` x max(1, largest |output| of the source) (`int8=True`: not applied, quantisation
    differs by design); `min_agreement` (a share, 0..1) is the least top-1 agreement, for any export.
    Non-finite outputs always fail.

    Returns None when there is nothing to check on, else `fidelity.compare_predictions`' dict plus
    `images` (what they were), `allowed_max_abs_diff` (None for int8), `problems` (one string per
    failed test) and `passed`.

    Example:
        >>> result = verify_export(model, to_tflite(model), images)
        >>> result["passed"], describe_check(result)
    """
    from keffconvert.report import fidelity

    shape = tuple(source.inputs[0].shape[1:]) if len(source.inputs) == 1 else None
    if images is None:
        if shape is None or None in shape:
            return None
        images = np.random.default_rng(0).uniform(0, 255, (8,) + shape).astype("float32")
        what = "random images"
    else:
        images = images[:samples]
        what = "calibration images"
    want = np.asarray(source.predict(images, verbose=0))
    got = np.asarray(_predictor(exported)(images))
    if got.shape != want.shape:
        problems = [f"outputs of shape {got.shape}, MODEL gives {want.shape}"]
        return {"samples": len(images), "images": what, "allowed_max_abs_diff": None, "problems": problems,
                "passed": False}
    result = fidelity.compare_predictions(want, got)
    result["images"] = what
    problems = []
    if not np.all(np.isfinite(got)):
        problems.append("non-finite outputs (NaN or inf)")
    allowed = None
    if not int8:
        allowed = float(tolerance * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0))
        if not result["max_abs_diff"] <= allowed:  # NaN fails too
            problems.append(f"max |difference| {result['max_abs_diff']:.2e} > {allowed:.2e} allowed")
    if min_agreement is not None and "top1_agreement" in result and not result["top1_agreement"] >= min_agreement:
        problems.append(f"top-1 agreement {result['top1_agreement']:.1%} < {min_agreement:.1%}")
    result.update(allowed_max_abs_diff=allowed, problems=problems, passed=not problems)
    return result


def describe_check(result, int8=False):
    """One line for the result of `verify_export`."""
    if result is None:
        return "check skipped: the model input has no fixed shape; pass --calibration DATA to check"
    if "max_abs_diff" not in result:
        return f"check on {result['samples']} {result['images']}: {'; '.join(result['problems'])}"
    allowed = result["allowed_max_abs_diff"]
    limit = f", allowed {allowed:.2e}" if allowed is not None else ""
    top1 = f", top-1 agreement {result['top1_agreement']:.1%}" if "top1_agreement" in result else ""
    verdict = "" if result["passed"] else " -- DISAGREES"
    note = " (int8: differences are expected)" if int8 and result["passed"] else ""
    return (f"check on {result['samples']} {result['images']}: max |difference| {result['max_abs_diff']:.2e}"
            f"{limit}{top1}{note}{verdict}")


def _predictor(exported):
    """x -> outputs for a Keras model, TFLite flatbuffer bytes, a callable, or a path to a SavedModel
    folder, a .tflite file or a .keras/.h5 file."""
    from keffconvert.export import tflite as export_tflite

    if isinstance(exported, (str, Path)):
        path = Path(exported)
        if path.is_dir():
            return lambda x: export_tflite.predict_saved_model(path, x)
        if path.suffix == ".tflite":
            exported = path.read_bytes()
        else:
            import keras

            exported = keras.models.load_model(path, compile=False)
    if isinstance(exported, (bytes, bytearray)):
        return lambda x: export_tflite.predict(exported, x)
    if hasattr(exported, "predict"):
        return lambda x: exported.predict(x, verbose=0)
    if callable(exported):
        return exported
    raise TypeError(f"cannot run a {type(exported).__name__}: expected a Keras model, TFLite bytes, a callable "
                    "or a path to a SavedModel folder, .tflite or .keras file")
