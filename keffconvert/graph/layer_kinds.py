"""Which layers keffconvert may rewrite or fold: the one place each such rule is written.

The conversion (analysis) and the inference export both ask these questions; a layer that only
looks like a Conv2D or a batch norm (a subclass whose `call` differs, a batch norm with
renormalisation, an activation that mixes channels) is never treated as one.
"""

import keras

# Activations that act on each value alone: applied per branch they commute with the channel
# interleave and with splitting a sum into K and L paths. softmax, log_softmax and glu mix
# channels and are not here.
ELEMENTWISE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "swish", "silu", "hard_swish", "hard_silu", "gelu",
    "tanh", "elu", "selu", "softplus", "softsign", "exponential", "leaky_relu", "mish", "log_sigmoid",
    "celu", "squareplus", "sparse_plus", "soft_shrink", "hard_shrink", "tanh_shrink", "hard_tanh",
})

# Activation layers (exact classes) that are element-wise whatever their settings.
ELEMENTWISE_ACTIVATION_LAYERS = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU)


def is_elementwise(fn):
    """Whether an activation function (as Keras stores it on a layer) acts on each value alone."""
    return getattr(fn, "__name__", None) in ELEMENTWISE_ACTIVATIONS


def is_elementwise_activation_layer(layer):
    """An `Activation` with an element-wise function, or a ReLU/LeakyReLU/ELU layer (exact class)."""
    if type(layer) is keras.layers.Activation:
        return is_elementwise(layer.activation)
    return type(layer) in ELEMENTWISE_ACTIVATION_LAYERS


def is_plain_conv2d(layer):
    """A `keras.layers.Conv2D` itself, not a subclass that may compute something else."""
    return type(layer) is keras.layers.Conv2D


def is_plain_batch_norm(layer, rank):
    """A `BatchNormalization` (exact class, no renormalisation) over the channels of a rank-`rank` tensor."""
    return (type(layer) is keras.layers.BatchNormalization and not layer.renorm
            and layer.axis in (-1, rank - 1))
