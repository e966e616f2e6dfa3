"""Facts read off a built Keras model through its public API, each computed in this one place:
its leaf layers, its parameter counts, the shape of its input and what its output is.

The plan, the budget check, the loader and training all count and walk models with these, so a
parameter count printed by `keffconvert`, `keffconvert check` and a training report is one
number computed one way.
"""

import math

import keras

from keffconvert.graph.keras_compat import producing_layer

__all__ = ["count_params", "count_weights", "ends_in_softmax", "input_shape", "leaf_layers", "output_layer"]


def leaf_layers(layer):
    """The layers that do `layer`'s computation, in order: a nested model is replaced by its own
    layers, recursively; a layer that is not a model is its own only leaf."""
    if not isinstance(layer, keras.Model):
        return [layer]
    return [leaf for sub in layer.layers for leaf in leaf_layers(sub)]


def count_weights(weights):
    """How many numbers `weights` (variables or arrays) hold: the sum of their shapes' products."""
    return int(sum(math.prod(int(d) for d in w.shape) for w in weights))


def count_params(model):
    """(trainable, total) parameters of `model`; total includes the non-trainable ones (batch-norm
    moving statistics, frozen layers)."""
    return count_weights(model.trainable_weights), count_weights(model.weights)


def input_shape(model):
    """The shape of `model`'s first input without the batch axis, as a tuple (None where a size is
    left open); None when the model has no symbolic inputs (subclassed, or a Sequential without
    an input shape)."""
    try:
        return tuple(model.inputs[0].shape[1:])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def output_layer(model):
    """The (innermost) layer producing `model`'s first output."""
    layer = producing_layer(model.outputs[0])
    while isinstance(layer, keras.Model):
        layer = producing_layer(layer.outputs[0])
    return layer


def ends_in_softmax(model):
    """True when the model outputs probabilities (a softmax), so the loss is not from logits."""
    layer = output_layer(model)
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", "") == "softmax"
