"""`convert`: the public entry point that plans, rewrites and transfers weights in one call."""

from keffconvert.analysis import analyze
from keffconvert.rewrite import Rewriter
from keffconvert.weights import copy_kept, transfer_chain

__all__ = ["convert"]


def convert(model, channels_per_group=16, *, include=None, exclude=None, dry_run=False,
            transfer_weights=True, calibration=None, calibration_rounds=3, progress=None, variant="2021",
            per_layer=None, target_params=None, target_reduction=None, target_method="lagrangian",
            target_choices=None):
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
        variant: "2021" (METHOD.md, the default) or "2022" (the Entropy 2022 follow-up without
            divisibility constraints, `keffconvert.variant2022`: cpg input channels per group
            whatever C and F are); the data-aware fit handles both.
        per_layer: {layer name, `outer/inner` path or glob: cpg or None}: these convs take their
            own channels per group (None: left as they are); exact names win over globs, then the
            first matching glob. The plan gives each conv's cpg.
        target_params / target_reduction: a budget instead of one cpg: at most this many
            trainable parameters, or this percentage of them removed. Which convs convert, and
            at which cpg of `target_choices` (default 4, 8, 16, 32, 64), is chosen at the least
            sensitivity (`keffconvert.targeting`; from the fit to `calibration` when given);
            each conv's options and choice are in the plan, the comparison in `plan.target`.
        target_method: "lagrangian" (default) or "greedy" (AIMET's per-layer selection).

    Returns:
        `(new_model, plan)`. The input model is not modified.

    Example:
        >>> base = keras.applications.EfficientNetB0(weights=None, classes=10)
        >>> small, plan = keffconvert.convert(base, channels_per_group=16)
        >>> plan.trainable_params_after
        639702
    """
    from keffconvert.variant2022 import check_variant

    variant = check_variant(variant)
    choice = None
    if target_params is not None or target_reduction is not None:
        choice = _choose_target(model, variant, per_layer, include, exclude, calibration, target_params,
                                target_reduction, target_method, target_choices)
        per_layer = choice.per_layer
    analysis = analyze(model, channels_per_group, include=include, exclude=exclude, per_layer=per_layer,
                       variant=variant)
    if choice is not None:
        from keffconvert.targeting import annotate

        annotate(analysis.plan, choice)
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


def _choose_target(model, variant, per_layer, include, exclude, images, target_params, target_reduction,
                   method, choices):
    from keffconvert.errors import UsageConflict
    from keffconvert.targeting import CHOICES, choose

    if variant != "2021":
        raise UsageConflict("a parameter target chooses among the 2021 method's groups; it does not take --variant 2022 yet")
    if per_layer:
        raise UsageConflict("give either per_layer or a parameter target, not both (the target chooses every conv's cpg)")
    return choose(model, target_params=target_params, target_reduction=target_reduction,
                  choices=choices or CHOICES, method=method, calibration=images, include=include, exclude=exclude)
