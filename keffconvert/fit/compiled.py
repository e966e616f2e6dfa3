"""Run a function of Keras layer calls as one compiled graph on the active backend.

The calibration walk calls the same layers on every batch. Called one by one in eager mode, each
layer is a handful of separate kernels (a batch norm is several element-wise passes over the
tensor); compiled, the backend fuses them (a convolution with its batch norm and activation), as
`Model.predict` does. On TensorFlow that is `tf.function`, on JAX `jax.jit` (the layers' weights
are read as constants when the function is traced, so a function is traced again after the
weights it reads change: the walk builds a new one for every segment); other backends run eagerly.
"""

import keras


def compiled(function):
    """`function` (arrays in, arrays out) compiled by the active backend where it can be."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, reduce_retracing=True, autograph=False)
    if backend == "jax":
        import jax

        return jax.jit(function)
    return function
