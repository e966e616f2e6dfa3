"""Models in a dtype policy: fresh or weight-copying rebuilds, and the mixed-precision choice."""

from contextlib import contextmanager

import keras

from keffconvert.graph.model_info import leaf_layers, output_layer

FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # layers whose precision --mixed-precision sets


def rebuild(model, *, dtype="float32", copy_weights=False):
    """A fresh copy of `model` built from its layers' configs (so freshly initialised).

    `dtype` (float32, mixed_float16, mixed_bfloat16) becomes the policy of every floating-point
    layer, whatever policy the model was saved with, except the output layer, which is float32 so
    the softmax and the loss are computed in full precision. `copy_weights` copies every weight
    over (fine-tuning); otherwise nothing is transferred except the state of `Normalization`
    layers, which is input preprocessing rather than something training learns.
    """
    keep = {output_layer(model).name}

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config and getattr(layer, "compute_dtype", None) in FLOAT_DTYPES:
            config["dtype"] = "float32" if layer.name in keep else dtype
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    if copy_weights:
        new.set_weights(model.get_weights())
    else:
        fresh = {layer.name: layer for layer in leaf_layers(new)}
        for layer in leaf_layers(model):
            if isinstance(layer, keras.layers.Normalization) and layer.name in fresh and layer.weights:
                fresh[layer.name].set_weights(layer.get_weights())
    return new


@contextmanager
def dtype_policy(name):
    """Set Keras' global dtype policy for the block (Keras wraps the optimizer for loss scaling)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def precision_policy(setting, gpu):
    """The Keras dtype policy for `--mixed-precision` `setting` ('auto', 'on', 'off').

    On a GPU, mixed_float16 (what the paper trained in): Keras wraps the optimizer in a
    `LossScaleOptimizer` so small float16 gradients do not underflow. On a CPU ('on' only; 'auto'
    stays float32 there), mixed_bfloat16: TensorFlow's CPU kernels run every layer keffconvert
    trains in both, but bfloat16 has float32's exponent range, so it needs no loss scaling, and it
    is the half format CPUs accelerate (AVX512-BF16, AMX). Either way `rebuild` keeps the output
    layer in float32, and the losses (the distillation term too) are computed in float32.
    """
    if setting == "off" or (setting == "auto" and not gpu):
        return "float32"
    return "mixed_float16" if gpu else "mixed_bfloat16"
