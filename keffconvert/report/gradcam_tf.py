"""Grad-CAM (Selvaraju et al., 2017) for Keras models on the TensorFlow backend.

Where a model looks for the class it predicts: the feature maps A_k of its last convolutional
layer, weighted by the spatial mean of d score / d A_k, summed, kept where positive, upsampled
to the image. The score is the class's logit (before any softmax, as the paper does; a softmax
output saturates and its gradient vanishes).

TensorFlow only, because the gradient is taken with `tf.GradientTape`. The feature maps are
caught where they are made: the target layer's `call` is wrapped for the duration of one
forward pass so its output is watched by the tape. That works wherever the layer sits, also
inside a nested model (`Sequential([base, pooling, dropout, dense])`), where building a second
functional model from the inner layer's tensor is not possible.
"""

from __future__ import annotations

from contextlib import contextmanager, ExitStack
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from keffconvert.errors import UnsupportedModelError
from keffconvert.graph.model_info import leaf_layers

__all__ = ["GradCam", "grad_cam", "last_conv_layer"]


@dataclass
class GradCam:
    """Heatmaps (N, H, W) in [0, 1] at the image size, each scaled by its own maximum; the class
    each was taken for, the model's predicted class and its confidence; the layer used."""

    maps: np.ndarray
    classes: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    layer: str
    feature_size: tuple


# Layers whose output is not a feature map of their own: padding adds zeros around the previous one.
NOT_FEATURES = (keras.layers.InputLayer, keras.layers.ZeroPadding2D, keras.layers.Cropping2D)


def _spatial_output(layer):
    """(H, W) of `layer`'s 4-D output, or None when it is not a feature map with H * W > 1."""
    if isinstance(layer, NOT_FEATURES):
        return None
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called more than once
        return None
    if len(shape) != 4:
        return None
    height, width = shape[1], shape[2]
    if height is not None and width is not None and height * width <= 1:
        return None  # squeeze-and-excitation style 1x1 maps
    return height, width


def last_conv_layer(model):
    """The last layer (nested models searched) whose output is a spatial feature map: usually the
    output of the last convolution block, after its batch norm and activation, which global
    pooling reads. A map of one position (EfficientNet's last blocks at 32x32 input) would give a
    uniform heatmap, so the last map with more than one position is taken (B0 at 32x32:
    `block6a_expand_activation`, 2x2); padding layers are skipped. For a kEffNet conversion this
    is the same layer as in its original (batch norms and activations keep their names) or the
    `_interleave` or `_sum` that ends the replacement of that layer's chain (a channel permutation
    or a sum of the same maps), so the two heatmaps compare like with like."""
    found = [layer for layer in leaf_layers(model) if _spatial_output(layer) is not None]
    if not found:
        raise UnsupportedModelError(f"{model.name} has no layer with a spatial (H, W, C) output; Grad-CAM needs one")
    return found[-1]


def _find_layer(model, name):
    for layer in leaf_layers(model):
        if layer.name == name:
            return layer
    raise UnsupportedModelError(f"{model.name} has no layer named {name!r}")


@contextmanager
def _watching(layer, tape, caught):
    """While active, every output of `layer` is watched by `tape` and appended to `caught`."""
    original = layer.call

    def call(*args, **kwargs):
        output = original(*args, **kwargs)
        tape.watch(output)
        caught.append(output)
        return output

    object.__setattr__(layer, "call", call)  # plain instance attribute: no Keras tracking
    try:
        yield
    finally:
        object.__delattr__(layer, "call")


def _output_layer(model):
    from keffconvert.graph.model_info import output_layer

    return output_layer(model)


@contextmanager
def _as_logits(model):
    """While active, `model` outputs logits where it ends in a softmax (an activation argument set
    to linear, or a Softmax / Activation('softmax') layer passing its input through)."""
    layer = _output_layer(model)
    activation = getattr(layer, "activation", None)
    is_softmax_fn = activation is not None and getattr(activation, "__name__", "") == "softmax"
    if isinstance(layer, keras.layers.Softmax) or (isinstance(layer, keras.layers.Activation) and is_softmax_fn):
        object.__setattr__(layer, "call", lambda inputs, *args, **kwargs: inputs)
        try:
            yield
        finally:
            object.__delattr__(layer, "call")
    elif is_softmax_fn:
        layer.activation = keras.activations.linear
        try:
            yield
        finally:
            layer.activation = activation
    else:
        yield


def grad_cam(model, images, classes=None, *, layer=None, batch_size=32):
    """Grad-CAM heatmaps of `model` on `images` (as the model takes them, N x H x W x C).

    `classes`: the class to explain per image (default: the model's own prediction). `layer`: a
    layer name (default `last_conv_layer`).
    """
    images = np.asarray(images, dtype="float32")
    target = _find_layer(model, layer) if layer else last_conv_layer(model)
    # A direct call, not predict(): heatmaps are drawn for a few images, and predict would trace a function.
    probabilities = np.concatenate([np.asarray(model(images[s:s + batch_size], training=False), dtype="float64")
                                    for s in range(0, len(images), batch_size)])
    predicted = probabilities.argmax(axis=-1)
    confidence = probabilities[np.arange(len(images)), predicted]
    if not np.allclose(probabilities.sum(axis=-1), 1.0, atol=1e-3) or probabilities.min() < 0:
        confidence = tf.nn.softmax(probabilities, axis=-1).numpy()[np.arange(len(images)), predicted]
    classes = predicted if classes is None else np.asarray(classes, dtype=np.int64)
    raw = []
    for start in range(0, len(images), batch_size):
        x = tf.constant(images[start:start + batch_size])
        wanted = tf.constant(classes[start:start + batch_size], dtype=tf.int32)
        caught = []
        with tf.GradientTape() as tape, ExitStack() as stack:
            stack.enter_context(_watching(target, tape, caught))
            stack.enter_context(_as_logits(model))
            outputs = tf.cast(model(x, training=False), tf.float32)
            score = tf.reduce_sum(tf.gather(outputs, wanted, axis=1, batch_dims=1))
        if not caught:
            raise UnsupportedModelError(f"layer {target.name} did not run in {model.name}'s forward pass")
        features = caught[-1]
        gradients = tape.gradient(score, features)
        if gradients is None:
            raise UnsupportedModelError(f"{model.name}'s output does not depend on layer {target.name}")
        features, gradients = tf.cast(features, tf.float32), tf.cast(gradients, tf.float32)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        raw.append(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy())
    raw = np.concatenate(raw)
    feature_size = tuple(int(d) for d in raw.shape[1:])
    maps = tf.image.resize(raw[..., None], images.shape[1:3], method="bilinear").numpy()[..., 0]
    peak = maps.reshape(len(maps), -1).max(axis=1)
    maps = np.divide(maps, peak[:, None, None], out=np.zeros_like(maps), where=peak[:, None, None] > 0)
    return GradCam(maps.astype("float32"), classes, predicted, confidence.astype("float32"), target.name, feature_size)
