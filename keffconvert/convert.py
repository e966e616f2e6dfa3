"""`convert`: the public entry point that plans, rewrites and transfers weights in one call."""

from keffconvert.analysis import analyze
from keffconvert.rewrite import Rewriter
from keffconvert.weights import copy_kept, transfer_chain


def convert(model, channels_per_group=16, *, include=None, exclude=None, dry_run=False,
            transfer_weights=True):
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
    rewriter = Rewriter(analysis)
    new_model = rewriter.rewrite(model)
    if transfer_weights:
        copy_kept(rewriter.cloned)
        for chain, replacement in rewriter.replacements:
            transfer_chain(chain, replacement)
    return new_model, analysis.plan
