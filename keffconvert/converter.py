"""`convert`: the public entry point that plans, rewrites and transfers weights in one call."""

from keffconvert.options import Calibration, Target
from keffconvert.plan.analysis import analyze
from keffconvert.rewrite.rewriter import Rewriter
from keffconvert.rewrite.weights import copy_kept, transfer_chain

__all__ = ["convert"]


def convert(model, channels_per_group=16, *, include=None, exclude=None, per_layer=None, variant="2021",
            transfer_weights=True, calibration=None, target=None, dry_run=False):
    """Turn every eligible pointwise conv of `model` into the kEffNet sub-architecture.

    Args:
        model: a Functional or Sequential `keras.Model`; nested models are converted too.
        channels_per_group: the paper's cpg; a conv gets the largest common divisor of its
            input channels C and filters F that is <= C // cpg as its number of groups.
        include: glob patterns of layer names (or `outer/inner` paths); only these convert.
        exclude: glob patterns of layer names to leave alone, e.g. `["*se_*"]`.
        per_layer: {layer name, `outer/inner` path or glob: cpg or None}: these convs take their
            own channels per group (None: left as they are); exact names win over globs, then the
            first matching glob. The plan gives each conv's cpg.
        variant: "2021" (METHOD.md, the default) or "2022" (the Entropy 2022 follow-up without
            divisibility constraints, `keffconvert.plan.variant2022`: cpg input channels per
            group whatever C and F are).
        transfer_weights: start the new model from `model`'s weights (block-diagonal slices for
            the new grouped convs); `False` leaves every layer freshly initialised.
        calibration: images as the model takes them, or a `keffconvert.Calibration`: every
            replacement is fitted so the converted model reproduces the original's outputs on
            them (`keffconvert.fit`); each layer's reconstruction error goes into the plan.
            None: the block-diagonal slices.
        target: a `keffconvert.Target` (a parameter budget) instead of one cpg: which convs
            convert, and at which cpg, is chosen at the least sensitivity (`keffconvert.target`;
            from the fit to `calibration` when given); the plan records each conv's options and
            choice, and the comparison with the other method and the uniform cpg.
        dry_run: return `(None, plan)` without building anything.

    Returns:
        `(new_model, plan)`. The input model is not modified.

    Examples:
        >>> base = keras.applications.EfficientNetB0(weights=None, classes=10)
        >>> small, plan = keffconvert.convert(base, channels_per_group=16)
        >>> plan.trainable_params_after
        639702

        Fit to the original on images it takes (so the converted model starts where it was):
        >>> small, plan = keffconvert.convert(base, calibration=images)

        Choose each conv's cpg so that 80% of the trainable parameters go:
        >>> small, plan = keffconvert.convert(base, target=keffconvert.Target(reduction=80))
    """
    from keffconvert.plan.variant2022 import check_variant

    variant = check_variant(variant)
    calibration = Calibration.of(calibration)
    if target is not None and not isinstance(target, Target):
        raise TypeError(f"target must be a keffconvert.Target. Received: target={target!r}")
    if calibration is not None and not transfer_weights and not dry_run:
        raise ValueError("calibration fits the converted model to the original's weights; "
                         "it needs transfer_weights=True")
    choice = None
    if target is not None:
        choice = _choose_target(model, target, variant, per_layer, include, exclude, calibration)
        per_layer = choice.per_layer
    analysis = analyze(model, channels_per_group, include=include, exclude=exclude, per_layer=per_layer,
                       variant=variant)
    if choice is not None:
        from keffconvert.target.choose import annotate

        annotate(analysis.plan, choice)
    if dry_run:
        return None, analysis.plan
    rewriter = Rewriter(analysis)
    new_model = rewriter.rewrite(model)
    if transfer_weights:
        copy_kept(rewriter.cloned)
        for chain, replacement in rewriter.replacements:
            transfer_chain(chain, replacement)
    if calibration is not None:
        _fit(analysis, rewriter.replacements, rewriter.cloned, calibration)
    return new_model, analysis.plan


def _fit(analysis, replacements, cloned, calibration):
    from keffconvert.fit.calibrate import calibrate

    result = calibrate(analysis, {id(chain.conv): r for chain, r in replacements},
                       {id(original): clone for clone, original in cloned}, calibration)
    for entry in analysis.plan.converted:
        errors = result["layers"].get(entry.name)
        if errors is not None:
            entry.reconstruction_error = errors["relative_error"]
            entry.slices_error = errors["slices_error"]
    analysis.plan.calibration = {key: result[key] for key in ("samples", "time_s", "passes") if key in result}


def _choose_target(model, target, variant, per_layer, include, exclude, calibration):
    from keffconvert.errors import UsageConflict
    from keffconvert.target.choose import choose

    if variant != "2021":
        raise UsageConflict("a parameter target chooses among the 2021 method's groups; it does not take --variant 2022 yet")
    if per_layer:
        raise UsageConflict("give either per_layer or a parameter target, not both (the target chooses every conv's cpg)")
    return choose(model, target, calibration=calibration, include=include, exclude=exclude)
