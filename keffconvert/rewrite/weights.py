"""Start the converted model from the original's weights.

Untouched layers get their own weights back. In each replacement, K takes the block-diagonal
slices of M's kernel with M's bias and B's statistics, so the K path computes exactly M's
within-group connections. Where the replacement's output is the interleaved K (an expansion,
C < F), K's filters are taken in the order that the interleave puts back into M's channel order,
so downstream layers see M's channels where they expect them. L starts quiet (zero kernel, its BN or bias at the point where the
activation is closest to zero while it still passes gradient), so the replacement's output is K's and training grows L from there.
Where L has neither a bias nor a batch norm and its activation is flat at 0 (relu), a zero kernel
would keep it at 0 for ever; it gets a random kernel just large enough to reach the activation's
sloped part instead, so part of it is active.
The cross-group connections M had are what no grouped structure can hold; their share is what
`fidelity` measures.
"""

import numpy as np
from keras import ops

from keffconvert.layers.padded import padded_input_index


def block_diagonal(kernel, groups):
    """M's (1, 1, C, F) kernel -> K's (1, 1, C/g, F): group j keeps rows j*C/g.., columns j*F/g.."""
    _, _, c_in, filters = kernel.shape
    cg, fg = c_in // groups, filters // groups
    blocks = kernel.reshape(groups, cg, groups, fg)[np.arange(groups), :, np.arange(groups), :]  # (g, cg, fg)
    return blocks.transpose(1, 0, 2).reshape(1, 1, cg, filters)


def quiet_point(activation, min_slope=0.01):
    """A pre-activation value where the activation is near 0 yet still passes gradient.

    L starts at this point so that its branch adds (almost) nothing at first but learns: at
    exactly 0 a relu has slope 0 and L would never leave it, so relu gets 1e-3 instead.
    """
    candidates = np.array([0.0, 1e-3, 1e-2, 0.1, -1.0, -2.0, -4.0, -6.0, -8.0, -10.0, 1.0, 2.0], dtype="float32")
    h = np.float32(1e-4)

    def act(z):
        return ops.convert_to_numpy(activation(ops.convert_to_tensor(z))).astype("float64")

    values = act(candidates)
    slopes = np.minimum((act(candidates + h) - values) / h, (values - act(candidates - h)) / h)
    usable = np.where(slopes >= min_slope)[0]
    if usable.size == 0:
        return 0.0
    return float(candidates[usable[np.argmin(np.abs(values[usable]))]])


def copy_kept(pairs):
    """Give every untouched clone its original's weights."""
    for clone, original in pairs:
        if original.weights:
            clone.set_weights(original.get_weights())


def output_order(entry):
    """Which of M's output channels each of K's filters takes.

    When the interleave is the replacement's output, K's filter q (group q // step, position
    q % step) lands at channel (q % step) * g + q // step, so it must compute M's channel there.
    """
    filters, groups = entry.filters, entry.groups
    q = np.arange(filters)
    if entry.second_conv or not entry.interleave_step:
        return q
    step = entry.interleave_step
    return (q % step) * groups + q // step


def transfer_chain(chain, replacement):
    """K <- block-diagonal M (+ bias, + B), in output order; L <- quiet. In the 2022 variant K
    takes M's weights of the inputs each filter reads (`padded_slices`)."""
    conv, bn = chain.conv, chain.bn
    groups = chain.entry.groups
    cpg = chain.new_layer("k").channels_per_group  # > 0: the 2022 variant
    order = np.arange(chain.entry.filters) if cpg else output_order(chain.entry)  # 2022: no interleave on the output
    m_weights = [w[..., order] for w in conv.get_weights()]
    if cpg:
        k_weights = [padded_slices(m_weights[0], cpg)] + m_weights[1:]
    else:
        k_weights = [block_diagonal(m_weights[0], groups)] + m_weights[1:]
    replacement.k.set_weights(k_weights)
    if bn is not None:
        replacement.k_bn.set_weights([w[order] for w in full_bn_weights(bn)])
    if replacement.l is None:
        return
    activation = replacement.l_act if replacement.l_act is not None else conv.activation
    offset = quiet_point(activation)
    l_weights = [np.zeros_like(w) for w in replacement.l.get_weights()]
    if bn is None and conv.use_bias:
        l_weights[1][:] = offset
    elif bn is None and offset != 0.0:  # nothing can shift L's pre-activation off the flat point 0
        l_weights[0] = random_kernel(l_weights[0].shape, abs(offset), seed=chain.entry.filters)
    replacement.l.set_weights(l_weights)
    if bn is not None:
        filters = chain.entry.filters
        gamma, beta = np.ones(filters, "float32"), np.full(filters, offset, "float32")
        replacement.l_bn.set_weights([gamma, beta, np.zeros(filters, "float32"), np.ones(filters, "float32")])


def random_kernel(shape, reach, seed):
    """A normal kernel whose outputs, for inputs of unit scale, spread about twice `reach` (the
    distance from 0 to where the activation has a slope): about half of L's units start active,
    and its output stays as small as that allows (2e-3 for a relu)."""
    fan_in = shape[-2]
    std = 2.0 * reach / np.sqrt(fan_in)
    return np.random.default_rng(seed).normal(0.0, std, shape).astype("float32")


def full_bn_weights(bn):
    """B's weights in B' order (gamma, beta, mean, variance), filling a missing gamma or beta."""
    weights = list(bn.get_weights())
    filters = weights[-1].shape[0]
    gamma = weights.pop(0) if bn.scale else np.ones(filters, "float32")
    beta = weights.pop(0) if bn.center else np.zeros(filters, "float32")
    return [gamma, beta] + weights


def grouped_to_dense(kernel, groups):
    """A grouped (1, 1, C/g, F) kernel as the dense (1, 1, C, F) kernel of the same convolution:
    the inverse of `block_diagonal` (group j's weights at rows j*C/g.., columns j*F/g.., zeros elsewhere)."""
    _, _, cg, filters = kernel.shape
    fg = filters // groups
    dense = np.zeros((groups, cg, groups, fg), kernel.dtype)
    dense[np.arange(groups), :, np.arange(groups), :] = kernel.reshape(cg, groups, fg).transpose(1, 0, 2)
    return dense.reshape(1, 1, cg * groups, filters)


def bn_affine(bn):
    """(scale, shift), float64, with bn(x) == x*scale + shift at inference."""
    gamma, beta, mean, variance = (w.astype("float64") for w in full_bn_weights(bn))
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return scale, beta - mean * scale


def padded_slices(kernel, channels_per_group):
    """M's (1, 1, C, F) kernel -> a PaddedGroupedPointwiseConv2D kernel (1, 1, local, F): each of
    K's weights takes M's weight of the same input channel and filter (the 2021 block-diagonal
    slices' analogue), so before training K computes exactly M's connections that it keeps."""
    _, _, c_in, filters = kernel.shape
    index = padded_input_index(c_in, filters, channels_per_group)
    return kernel[0, 0][index, np.arange(filters)[None, :]][None, None]
