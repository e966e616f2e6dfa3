"""Start the converted model from the original's weights.

Untouched layers get their own weights back. In each replacement, K takes the block-diagonal
slices of M's kernel with M's bias and B's statistics, so the K path computes exactly M's
within-group connections; L starts silent (zero kernel, its BN or bias at the point where the
activation is closest to zero), so the replacement's output is K's and training grows L from there.
The cross-group connections M had are what no grouped structure can hold; their share is what
`fidelity` measures.
"""

import numpy as np
from keras import ops


def block_diagonal(kernel, groups):
    """M's (1, 1, C, F) kernel -> K's (1, 1, C/g, F): group j keeps rows j*C/g.., columns j*F/g.."""
    _, _, c_in, filters = kernel.shape
    cg, fg = c_in // groups, filters // groups
    blocks = kernel.reshape(groups, cg, groups, fg)[np.arange(groups), :, np.arange(groups), :]  # (g, cg, fg)
    return blocks.transpose(1, 0, 2).reshape(1, 1, cg, filters)


def quiet_point(activation):
    """The pre-activation value in [-10, 0] whose activation is closest to 0 (0 for relu, swish...)."""
    candidates = np.array([0.0, -1.0, -2.0, -4.0, -6.0, -8.0, -10.0], dtype="float32")
    values = np.abs(ops.convert_to_numpy(activation(ops.convert_to_tensor(candidates))))
    return float(candidates[int(np.argmin(values))])


def copy_kept(pairs):
    """Give every untouched clone its original's weights."""
    for clone, original in pairs:
        if original.weights:
            clone.set_weights(original.get_weights())


def transfer_chain(chain, replacement):
    """K <- block-diagonal M (+ bias, + B); L <- silent."""
    conv, bn = chain.conv, chain.bn
    groups = chain.entry.groups
    m_weights = conv.get_weights()
    k_weights = [block_diagonal(m_weights[0], groups)] + m_weights[1:]
    replacement.k.set_weights(k_weights)
    if bn is not None:
        replacement.k_bn.set_weights(_full_bn_weights(bn))
    if replacement.l is None:
        return
    activation = replacement.l_act if replacement.l_act is not None else conv.activation
    offset = quiet_point(activation)
    l_weights = [np.zeros_like(w) for w in replacement.l.get_weights()]
    if bn is None and conv.use_bias:
        l_weights[1][:] = offset
    replacement.l.set_weights(l_weights)
    if bn is not None:
        filters = chain.entry.filters
        gamma, beta = np.ones(filters, "float32"), np.full(filters, offset, "float32")
        replacement.l_bn.set_weights([gamma, beta, np.zeros(filters, "float32"), np.ones(filters, "float32")])


def _full_bn_weights(bn):
    """B's weights in B' order (gamma, beta, mean, variance), filling a missing gamma or beta."""
    weights = list(bn.get_weights())
    filters = weights[-1].shape[0]
    gamma = weights.pop(0) if bn.scale else np.ones(filters, "float32")
    beta = weights.pop(0) if bn.center else np.zeros(filters, "float32")
    return [gamma, beta] + weights
