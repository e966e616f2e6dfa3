"""`convert`: the public entry point that plans, rewrites and transfers weights in one call."""

from keffconvert.analysis import analyze
from keffconvert.rewrite import Rewriter
from keffconvert.weights import copy_kept, transfer_chain

__all__ = ["convert"]


def convert(model, channels_per_group=16, *, include=None, exclude=None, dry_run=False,
            transfer_weights=True, calibration=None, calibration_rounds=3, progress=None):
    """Turn every eligible pointwise conv of `model` into the kEffNet sub-architecture.

    Args:
        model: a Functional or Sequential `keras.Model`; nested models are converted too.
        channels_per_group: the paper's cpg; a conv gets the largest common divisor of its
            input channels C and filters F that is <= C // cpg as its number of groups.
        include: glob patterns of layer names (or `outer/inner` paths); only these convert.
        exclude: glob patterns of layer names to leave alone, e.g. `["*se_*"]`.
        dry_run: return `(None, plan)` without building anything.
        transfer_weights: start the new model from `model`'s weights (block-diagonal slices for
            the new grouped convs); `False` leaves every layer freshly initialised.
        calibration: images (as the model takes them) to fit every replacement on, so the
            converted model reproduces the original's outputs (`keffconvert.calibrate`); each
            layer's reconstruction error goes into the plan. None: the block-diagonal slices.
        calibration_rounds: K/L alternations of the fit for linear chains with an L.
        progress: called with (layer name, relative error) after each fitted layer.

    Returns:
        `(new_model, plan)`. The input model is not modified.

    Example:
        >>> base = keras.applications.EfficientNetB0(weights=None, classes=10)
        >>> small, plan = keffconvert.convert(base, channels_per_group=16)
        >>> plan.trainable_params_after
        639702
    """
    analysis = analyze(model, channels_per_group, include=include, exclude=exclude)
    if dry_run:
        return None, analysis.plan
    if calibration is not None and not transfer_weights:
        raise ValueError("calibration fits the converted model to the original's weights; "
                         "it needs transfer_weights=True")
    rewriter = Rewriter(analysis)
    new_model = rewriter.rewrite(model)
    if transfer_weights:
        copy_kept(rewriter.cloned)
        for chain, replacement in rewriter.replacements:
            transfer_chain(chain, replacement)
    if calibration is not None:
        _fit(analysis, rewriter.replacements, rewriter.cloned, calibration, calibration_rounds, progress)
    return new_model, analysis.plan


def _fit(analysis, replacements, cloned, images, rounds, progress):
    from keffconvert.calibrate import calibrate

    result = calibrate(analysis, {id(chain.conv): r for chain, r in replacements},
                       {id(original): clone for clone, original in cloned}, images, rounds=rounds, progress=progress)
    for entry in analysis.plan.converted:
        errors = result["layers"].get(entry.name)
        if errors is not None:
            entry.reconstruction_error = errors["relative_error"]
            entry.slices_error = errors["slices_error"]
    analysis.plan.calibration = {"samples": result["samples"], "time_s": result["time_s"]}
