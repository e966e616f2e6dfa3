"""Every kernel of the two kEffNet layers computes the plain definition, values and gradients.

The plain definition: a grouped 1x1 convolution is `keras.layers.Conv2D(groups=g)` with the same
(1, 1, C/g, F) kernel; the interleave is METHOD.md's
`concatenate([x[..., s::step] for s in range(step)], axis=-1)`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keffconvert.layers import (
    GROUPED_IMPLEMENTATIONS,
    INTERLEAVE_IMPLEMENTATIONS,
    GroupedPointwiseConv2D,
    InterleaveChannels,
    block_diagonal_kernel,
    choose_implementation,
    grouped_pointwise,
    interleave,
    interleave_permutation,
)

# (C, F, g): every branch of `choose_implementation` (broadcast, blockdiag, matmul) and the
# EfficientNet kinds: projection (C > F), expansion (C < F), square L, F/g == 1 (SE reduce).
SHAPES = [(32, 16, 2), (96, 24, 6), (144, 24, 8), (40, 240, 2), (80, 480, 5), (240, 40, 10), (480, 80, 20),
          (192, 192, 32), (96, 4, 4), (48, 1152, 3), (1152, 192, 64), (320, 1280, 20), (672, 192, 32)]


def reference_conv(x, kernel, bias, groups):
    conv = keras.layers.Conv2D(kernel.shape[-1], 1, groups=groups, use_bias=bias is not None)
    conv.build(x.shape)
    conv.set_weights([kernel] + ([bias] if bias is not None else []))
    return conv


def reference_interleave(x, step):
    return tf.concat([x[..., s::step] for s in range(step)], axis=-1)


def values_and_grads(fn, x, weights):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        weight = tf.reshape(tf.cast(tf.range(tf.size(y)) % 7, y.dtype), tf.shape(y))
        loss = tf.reduce_sum(tf.sin(y) * weight)  # a non-uniform upstream gradient
    grads = tape.gradient(loss, [x, *weights])
    return y.numpy(), [g.numpy() for g in grads]


def test_choose_implementation_rule():
    assert choose_implementation(96, 4, 4) == "broadcast"  # F/g == 1
    assert choose_implementation(40, 240, 2) == "blockdiag"  # g <= 2
    assert choose_implementation(144, 24, 8) == "blockdiag"  # few, narrow groups
    assert choose_implementation(80, 480, 5) == "blockdiag"  # C*F/(C+F) = 69: memory-bound
    assert choose_implementation(1152, 192, 64) == "matmul"  # C*F/(C+F) = 165
    assert choose_implementation(320, 1280, 20) == "matmul"


@pytest.mark.parametrize("implementation", GROUPED_IMPLEMENTATIONS)
@pytest.mark.parametrize("c,f,g", SHAPES)
def test_grouped_kernels_match_conv2d_groups(implementation, c, f, g):
    rng = np.random.default_rng(c + f + g)
    x = tf.constant(rng.normal(size=(2, 3, 2, c)).astype("float32"))
    kernel = rng.normal(size=(1, 1, c // g, f)).astype("float32") / np.sqrt(c // g)
    bias = rng.normal(size=(f,)).astype("float32")
    conv = reference_conv(x, kernel, bias, g)
    layer = GroupedPointwiseConv2D(f, g)
    layer.implementation = implementation
    layer.build(x.shape)
    layer.set_weights([kernel, bias])
    y_ref, g_ref = values_and_grads(conv, x, conv.trainable_weights)
    y, grads = values_and_grads(layer, x, layer.trainable_weights)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, g_ref):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", [i for i in GROUPED_IMPLEMENTATIONS if i != "conv"])
def test_grouped_kernels_take_any_rank(implementation):
    """Rows of any leading shape (rank 2 and 3 here); `conv` is the 4-D-only reference."""
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(1, 1, 4, 12)).astype("float32")
    for shape in [(5, 16), (2, 3, 16)]:
        x = rng.normal(size=shape).astype("float32")
        got = keras.ops.convert_to_numpy(grouped_pointwise(x, kernel, 4, implementation))
        dense = keras.ops.convert_to_numpy(block_diagonal_kernel(kernel, 4))
        np.testing.assert_allclose(got, x @ dense, atol=1e-5)


def test_conv_implementation_refuses_other_ranks():
    with pytest.raises(ValueError, match="4-D"):
        grouped_pointwise(np.zeros((2, 8), "float32"), np.zeros((1, 1, 2, 4), "float32"), 4, "conv")


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="Unknown implementation"):
        grouped_pointwise(np.zeros((2, 8), "float32"), np.zeros((1, 1, 2, 4), "float32"), 4, "magic")
    with pytest.raises(ValueError, match="Unknown implementation"):
        interleave(np.zeros((2, 8), "float32"), 2, "magic")


def test_block_diagonal_kernel_layout():
    kernel = np.arange(1 * 1 * 2 * 6, dtype="float32").reshape(1, 1, 2, 6)  # C=4, F=6, g=2
    dense = keras.ops.convert_to_numpy(block_diagonal_kernel(kernel, 2))
    expected = np.zeros((4, 6), "float32")
    expected[0:2, 0:3] = kernel[0, 0, :, 0:3]
    expected[2:4, 3:6] = kernel[0, 0, :, 3:6]
    np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize("implementation", INTERLEAVE_IMPLEMENTATIONS)
@pytest.mark.parametrize("channels,step", [(8, 2), (24, 3), (240, 120), (192, 3), (16, 16)])
def test_interleave_kernels_match_definition(implementation, channels, step):
    x = tf.constant(np.random.default_rng(channels).normal(size=(2, 3, 5, channels)).astype("float32"))
    layer = InterleaveChannels(step)
    layer.implementation = implementation
    y_ref, (g_ref,) = values_and_grads(lambda t: reference_interleave(t, step), x, [])
    y, (grad,) = values_and_grads(layer, x, [])
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(grad, g_ref, atol=1e-6)


def test_interleave_permutation_is_the_layer():
    x = np.arange(12, dtype="float32").reshape(1, 12)
    perm = interleave_permutation(12, 3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(interleave(x, 3))[0], x[0, perm])


def test_unknown_spatial_size_uses_dynamic_shapes():
    """Inputs with None height/width (fully convolutional models) still work, at any size."""
    inp = keras.Input((None, None, 16))
    out = InterleaveChannels(4)(GroupedPointwiseConv2D(8, 2, name="k")(inp))
    model = keras.Model(inp, out)
    kernel = model.get_layer("k").get_weights()[0]
    dense = keras.ops.convert_to_numpy(block_diagonal_kernel(kernel, 2))
    for size in [(3, 5), (7, 2)]:
        x = np.random.default_rng(1).normal(size=(2, *size, 16)).astype("float32")
        y = model.predict(x, verbose=0)
        np.testing.assert_allclose(y, reference_interleave(tf.constant(x @ dense), 4).numpy(), atol=1e-5)


def test_implementation_is_not_saved(tmp_path):
    """A runtime choice only: configs (and so saved files) are the same whatever it is."""
    layer = GroupedPointwiseConv2D(8, 2)
    before = layer.get_config()
    layer.implementation = "matmul"
    assert layer.get_config() == before
    assert "implementation" not in before
    shuffle = InterleaveChannels(2)
    shuffle.implementation = "take"
    assert "implementation" not in shuffle.get_config()


def test_training_step_agrees_across_implementations():
    """One optimiser step of a small model gives the same weights with every kernel."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 6, 32)).astype("float32")
    y = rng.normal(size=(4, 6, 6, 16)).astype("float32")
    results = {}
    for implementation in GROUPED_IMPLEMENTATIONS:
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 32))
        k = GroupedPointwiseConv2D(16, 4, name="k")
        k.implementation = implementation
        out = InterleaveChannels(4)(k(inp))
        model = keras.Model(inp, out)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.train_on_batch(x, y)
        results[implementation] = model.get_layer("k").get_weights()[0]
    for implementation, kernel in results.items():
        np.testing.assert_allclose(kernel, results["einsum"], atol=1e-5, err_msg=implementation)
