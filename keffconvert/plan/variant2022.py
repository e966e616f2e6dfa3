"""The 2022 variant: grouped pointwise convolutions without divisibility constraints.

Source: J. P. Schwarz Schuler, S. Romani, M. Abdel-Nasser, H. Rashwan, D. Puig, "An Enhanced
Scheme for Reducing the Complexity of Pointwise Convolutions in CNNs for Image Classification
Based on Interleaved Grouped Filters without Divisibility Constraints", Entropy 24(9) 1264, 2022.
Reference code: K-CAI `cai.layers.kConv2DType10` on `kGroupConv2D`, selected by
`kType=D6v3_16ch()` (cpg 16) in `cai.efficientnet.kEfficientNetB0..B7`, which route every
`expand`, `se_reduce`, `se_expand`, `project_conv` and `top_conv` through it. Its rules, as
K-CAI's source states them (cpg = `min_channels_per_group`):

1. "does it make sense to optimize this layer?": only when `C > 2*cpg`, or the conv expands
   (`F > C`) and `C > cpg`; otherwise the conv stays as it is. So, unlike METHOD.md's rule 1,
   no common divisor is needed: B6's widths (56, 72, 200, 344) are reduced too.
2. K = `kGroupConv2D(x, F, cpg)`: `groups = ceil(C / cpg)`, at most F; the input is padded to
   `groups*cpg` channels "by copying the first" ones (or, when the cap left fewer groups, each
   group takes `ceil(C / groups)` channels); `F mod groups` filters go to a second path with one
   filter per group, concatenated after the first (`layers.padded_groups`). Each path is
   `conv2d_bn`: conv (bias iff M had one), BatchNormalization (centre and scale: `kPointwiseConv2D`
   passes `has_batch_scale=True`) iff M had one, then the activation.
3. "should add a new convolution to mix group information?" iff K has more than one group and
   `C >= F`: the interleave `InterleaveChannels(F // cpg)` when that step is > 1 (K-CAI's strided
   slices: the step need not divide F), then L = `kGroupConv2D(interleaved, F, cpg)` with its own
   BN and activation (a plain dense conv when F <= cpg), and the output is `L_out + K_out`.
   An expansion has no interleave and no L.

So a 2022 chain computes, per pixel, with x the input (C channels) and A the activation:
`k = A(BN_K(x @ D_K))`, output `k` (expansion or one group), or `A(BN_L(P(k) @ D_L)) + k`, where
D_K (C x F) and D_L (F x F) are the dense forms of the padded grouped kernels
(`layers.padded_dense_kernel`) and P the interleave's permutation (`layers.interleave_permutation`).
keffconvert builds each kGroupConv2D as one `PaddedGroupedPointwiseConv2D` layer with one BN over
its F outputs (the same per-channel map as K-CAI's two BNs, with as many weights).
"""

from dataclasses import dataclass

from keffconvert.layers.padded import padded_groups

VARIANTS = ("2021", "2022")


def check_variant(variant):
    variant = str(variant)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}. Received: variant={variant!r}")
    return variant


@dataclass(frozen=True)
class Decision:
    """What rule 1-3 decide for one conv with C inputs and F filters."""

    convert: bool
    reason: str = ""
    groups: int = 1  # K's groups
    local: int = 0  # K's input channels per group (after padding)
    extra: int = 0  # K's filters on the one-filter-per-group path
    second_conv: bool = False
    step: int = 0  # the interleave step, 0 when there is none
    second_groups: int = 0  # L's groups
    second_extra: int = 0


def decide(in_channels, filters, cpg):
    """Rules 1-3 for a conv with C=in_channels, F=filters at `cpg` channels per group."""
    expansion = filters > in_channels
    if not (in_channels > 2 * cpg or (expansion and in_channels > cpg)):
        limit = f"C={in_channels} <= cpg={cpg}" if expansion else f"C={in_channels} <= 2*cpg={2 * cpg}"
        return Decision(False, reason=f"{limit}: K-CAI leaves it as it is")
    groups, local, extra = padded_groups(in_channels, filters, cpg)
    if groups <= 1:
        return Decision(False, reason=f"F={filters}: one group, nothing to reduce")
    second = in_channels >= filters
    if not second:
        return Decision(True, groups=groups, local=local, extra=extra)
    step = filters // cpg
    l_groups, _, l_extra = padded_groups(filters, filters, cpg)
    return Decision(True, groups=groups, local=local, extra=extra, second_conv=True,
                    step=step if step > 1 else 0, second_groups=l_groups, second_extra=l_extra)


def describe_decision(decision, in_channels):
    """A short note for the plan: padding, the one-filter path and L's grouping."""
    parts = []
    padded = decision.groups * decision.local
    if padded > in_channels:
        parts.append(f"padded {in_channels}->{padded}")
    if decision.extra:
        parts.append(f"{decision.extra} one-filter groups")
    if decision.second_conv:
        parts.append(f"L: {decision.second_groups} groups" if decision.second_groups > 1 else "L: dense")
    return ", ".join(parts)
