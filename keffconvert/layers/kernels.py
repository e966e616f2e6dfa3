"""How the grouped 1x1 convolution and the interleave are computed (the kernels), and why.

Every way of computing a grouped 1x1 convolution gives the same numbers (tests/test_kernels.py);
they differ only in speed:

=============  ===============================================================================
name           what it runs
=============  ===============================================================================
``einsum``     ``einsum('ngc,gcf->ngf')`` over the groups
``matmul``     transpose to (g, N, C/g), batched matmul, transpose back
``blockdiag``  one dense (C, F) matmul with the block-diagonal kernel (g times the multiply-adds)
``broadcast``  multiply and sum over C/g
``conv``       ``ops.conv`` with the (1, 1, C/g, F) kernel, i.e. Conv2D(groups): slow on the CPU,
               its gradient most of all (METHOD.md)
``auto``       per layer, the rule below
=============  ===============================================================================

`python benchmarks/bench_kernels.py` times each of them on every grouped layer of a converted
EfficientNet-B0 (and each interleave on every InterleaveChannels layer), alternating them in one
process, for training at 32x32 and inference at 224x224; `--per-shape` times each layer shape
on its own. The script prints the full table (`--out` writes it as JSON) and docs/results.md, "Speed",
quotes the headline ratios; no figure is copied here, where it would go stale. What they show on
the TensorFlow CPU backend, and why:

At these sizes the layers are memory-bound: the dense matmul's g-fold extra multiply-adds cost
less than the transposes ``matmul`` needs, until the dense kernel is large enough for the
matmul to be compute-bound. ``broadcast`` is a multiply and a sum, the cheapest when each group
has one output (the SE reduce convolutions). So ``auto`` picks, from the static channel counts
only (`choose_implementation`):

* F/g == 1                                  -> ``broadcast``
* C*F / (C+F) <= 100 (memory-bound matmul)  -> ``blockdiag``
* otherwise (the 7x7, 1152-channel layers)  -> ``matmul``

(In a whole-model training step, `benchmarks/bench_speed.py`, ``auto`` and ``blockdiag`` tie;
at 224x224 ``auto`` is the faster, ``matmul`` winning the 7x7 layers with 1152 channels. The
rule comes from the per-shape figures. On other backends the same rule runs; it was measured on
TensorFlow only.)

For the interleave, ``transpose`` (reshape, transpose, reshape) beats ``take`` (a gather with
the permutation) and, by far, K-CAI's strided slices plus concatenate, so it is the default.
The reshapes use static shapes `(-1, H, W, C)` whenever H and W are known: no shape-computing
ops in the graph, which TFLite needs to keep the layer inside its XNNPACK delegate.

Folding the interleave into the next layer's weights is exact when that layer mixes all
channels (a dense Conv2D or Dense: reorder its kernel's input rows) or is per-channel
(BatchNormalization, an element-wise activation, DepthwiseConv2D: reorder its per-channel
weights and move the interleave past it). It is NOT exact into the next grouped convolution L
as a grouped convolution: L's group j reads interleaved channels j*F/g .. (j+1)*F/g - 1, and
interleaved channel s*g + i is K's channel i*F/g + s, from K's group i = (s*g + i) mod g; so
L's group j reads from min(F/g, g) different groups of K, more than one whenever F/g > 1 and
g > 1 -- always, when an interleave is there at all. The permutation maps L's groups to groups only when F/g == 1 or g == 1. So the
training graph keeps the interleave as its own layer, and the inference export
(`keffconvert.export`) folds it into L or K by making them dense where their dense kernel is
small.

Saved files do not record the implementation: it is a runtime choice (`layer.implementation`,
default ``"auto"``), so files written before or after load and run the same.
"""

import numpy as np
from keras import ops

GROUPED_IMPLEMENTATIONS = ("auto", "einsum", "matmul", "blockdiag", "broadcast", "conv")


# `blockdiag` while C*F / (C+F) -- the dense matmul's multiply-adds per value read or written,
# its arithmetic intensity -- is at most this: below it the dense matmul is memory-bound and its
# g-fold extra multiply-adds are free, above it `matmul`'s transposes cost less than they do.
DENSE_INTENSITY_LIMIT = 100


INTERLEAVE_IMPLEMENTATIONS = ("transpose", "take", "slices")


def choose_implementation(in_channels, filters, groups):
    """The kernel ``auto`` runs for a grouped 1x1 conv with these channel counts (see above)."""
    if filters // groups == 1:
        return "broadcast"
    if in_channels * filters <= DENSE_INTENSITY_LIMIT * (in_channels + filters):
        return "blockdiag"
    return "matmul"


def grouped_kernel(kernel, groups):
    """Conv2D(groups) kernel (1, 1, C/g, F) -> (g, C/g, F/g): group j's weights."""
    c_per_group, filters = kernel.shape[-2], kernel.shape[-1]
    k = ops.reshape(kernel, (c_per_group, groups, filters // groups))
    return ops.transpose(k, (1, 0, 2))


def block_diagonal_kernel(kernel, groups):
    """Conv2D(groups) kernel (1, 1, C/g, F) -> the equivalent dense (C, F) matrix.

    Row j*C/g + c, column j*F/g + f holds group j's weight (c, f); every other entry is 0. Built
    as tile-and-mask (not an einsum with an identity: TFLite's converter mis-lowers that one).
    """
    c_per_group, filters = kernel.shape[-2], kernel.shape[-1]
    k = ops.tile(ops.reshape(kernel, (c_per_group, filters)), (groups, 1))
    return k * ops.cast(_block_mask(c_per_group * groups, filters, groups), k.dtype)


def _block_mask(channels, filters, groups):
    rows = np.arange(channels)[:, None] // (channels // groups)
    cols = np.arange(filters)[None, :] // (filters // groups)
    return (rows == cols).astype("float32")


def grouped_pointwise(inputs, kernel, groups, implementation="auto"):
    """A grouped 1x1 convolution of `inputs` (..., C) with a (1, 1, C/g, F) kernel, no bias."""
    channels, filters = inputs.shape[-1], kernel.shape[-1]
    if implementation == "auto":
        implementation = choose_implementation(channels, filters, groups)
    kernel = ops.cast(kernel, inputs.dtype)
    if implementation == "conv":
        if len(inputs.shape) != 4:
            raise ValueError(f"implementation='conv' needs 4-D inputs. Received: shape={inputs.shape}")
        return ops.conv(inputs, kernel, strides=1, padding="valid")
    if implementation not in _GROUPED:
        raise ValueError(f"Unknown implementation {implementation!r}; expected one of {GROUPED_IMPLEMENTATIONS}")
    y = _GROUPED[implementation](ops.reshape(inputs, (-1, channels)), kernel, groups)
    return _restore_leading(y, inputs, filters)


def _restore_leading(y, inputs, channels):
    """Reshape rows back to `inputs`' leading dimensions with `channels` channels.

    With static spatial dimensions the target is `(-1, H, W, channels)`: no shape ops in the
    graph, which TFLite (XNNPACK) needs to keep the reshape and transpose in its delegate and
    which saves three tiny ops per layer on TensorFlow.
    """
    inner = tuple(inputs.shape[1:-1])
    if all(isinstance(d, int) for d in inner):
        return ops.reshape(y, (-1,) + inner + (channels,))
    return ops.reshape(y, tuple(ops.shape(inputs)[:-1]) + (channels,))


def _einsum(x, kernel, groups):
    rows = ops.reshape(x, (-1, groups, x.shape[-1] // groups))
    return ops.einsum("ngc,gcf->ngf", rows, grouped_kernel(kernel, groups))


def _matmul(x, kernel, groups):
    rows = ops.transpose(ops.reshape(x, (-1, groups, x.shape[-1] // groups)), (1, 0, 2))  # (g, N, C/g)
    y = ops.matmul(rows, grouped_kernel(kernel, groups))  # (g, N, F/g)
    return ops.transpose(y, (1, 0, 2))


def _blockdiag(x, kernel, groups):
    return ops.matmul(x, block_diagonal_kernel(kernel, groups))


def _broadcast(x, kernel, groups):
    rows = ops.reshape(x, (-1, groups, x.shape[-1] // groups, 1))
    return ops.sum(rows * grouped_kernel(kernel, groups), axis=2)  # (N, g, F/g)


_GROUPED = {"einsum": _einsum, "matmul": _matmul, "blockdiag": _blockdiag, "broadcast": _broadcast}


def interleave_permutation(channels, step):
    """Output channel o of `interleave(x, step)` is input channel `perm[o]`.

    When `step` does not divide the channels (the 2022 variant's step F // cpg), K-CAI's strided
    slices still define it: the slices just differ in length by one.
    """
    if channels % step:
        return np.concatenate([np.arange(s, channels, step) for s in range(step)])
    return np.arange(channels).reshape(channels // step, step).T.reshape(-1)


def interleave(inputs, step, implementation="transpose"):
    """K-CAI's channel shuffle: concatenate([x[..., s::step] for s in range(step)], axis=-1)."""
    channels = inputs.shape[-1]
    if channels % step:  # uneven slices (the 2022 variant): only the gather computes them
        return ops.take(inputs, interleave_permutation(channels, step), axis=-1)
    if implementation == "transpose":
        x = ops.reshape(inputs, (-1, channels // step, step))
        x = ops.transpose(x, (0, 2, 1))
        return _restore_leading(x, inputs, channels)
    if implementation == "take":
        return ops.take(inputs, interleave_permutation(channels, step), axis=-1)
    if implementation == "slices":
        return ops.concatenate([inputs[..., s::step] for s in range(step)], axis=-1)
    raise ValueError(f"Unknown implementation {implementation!r}; expected one of {INTERLEAVE_IMPLEMENTATIONS}")
