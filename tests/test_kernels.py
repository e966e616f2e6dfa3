"""Every kernel of the two kEffNet layers computes the plain definition, values and gradients.

The plain definition: a grouped 1x1 convolution is `keras.layers.Conv2D(groups=g)` with the same
(1, 1, C/g, F) kernel; the interleave is METHOD.md's
`concatenate([x[..., s::step] for s in range(step)], axis=-1)`.

The kernels are checked against a NumPy computation of that definition (`numpy_grouped` and its
hand-written gradients), not against Keras: the `conv` kernel and `Conv2D(groups)` both run
`ops.conv`, so comparing them would test `ops.conv` against itself. One test ties the NumPy
reference to `Conv2D(groups)`, so that the reference is the Keras layer's meaning.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels
from keffconvert.layers.kernels import (GROUPED_IMPLEMENTATIONS, INTERLEAVE_IMPLEMENTATIONS, block_diagonal_kernel,
                                        choose_implementation, grouped_pointwise, interleave, interleave_permutation)

# (C, F, g): every branch of `choose_implementation` (broadcast, blockdiag, matmul) and the
# EfficientNet kinds: projection (C > F), expansion (C < F), square L, F/g == 1 (SE reduce).
SHAPES = [(32, 16, 2), (96, 24, 6), (144, 24, 8), (40, 240, 2), (80, 480, 5), (240, 40, 10), (480, 80, 20),
          (192, 192, 32), (96, 4, 4), (48, 1152, 3), (1152, 192, 64), (320, 1280, 20), (672, 192, 32)]


def reference_conv(x, kernel, bias, groups):
    conv = keras.layers.Conv2D(kernel.shape[-1], 1, groups=groups, use_bias=bias is not None)
    conv.build(x.shape)
    conv.set_weights([kernel] + ([bias] if bias is not None else []))
    return conv


def _numpy_groups(kernel, groups):
    """(1, 1, C/g, F) -> (g, C/g, F/g): group j maps input channels j*C/g.. to outputs j*F/g.."""
    c_per_group, filters = kernel.shape[-2:]
    return np.asarray(kernel, "float64").reshape(c_per_group, groups, filters // groups).transpose(1, 0, 2)


def numpy_grouped(x, kernel, groups, bias=None):
    """The grouped 1x1 convolution in float64 NumPy: split the channels into g groups, one
    matrix product per group, concatenate; `x` of any leading shape (..., C)."""
    x = np.asarray(x, "float64")
    k = _numpy_groups(kernel, groups)
    rows = x.reshape(-1, groups, x.shape[-1] // groups)
    y = np.einsum("ngc,gcf->ngf", rows, k).reshape(*x.shape[:-1], kernel.shape[-1])
    return y if bias is None else y + np.asarray(bias, "float64")


def numpy_grouped_grads(x, kernel, groups, dy):
    """Gradients of sum(dy * numpy_grouped(x, kernel, groups, bias)) for x, kernel and bias."""
    x, dy = np.asarray(x, "float64"), np.asarray(dy, "float64")
    k = _numpy_groups(kernel, groups)
    rows = x.reshape(-1, groups, x.shape[-1] // groups)
    drows = dy.reshape(-1, groups, dy.shape[-1] // groups)
    dx = np.einsum("ngf,gcf->ngc", drows, k).reshape(x.shape)
    dk = np.einsum("ngc,ngf->gcf", rows, drows).transpose(1, 0, 2).reshape(kernel.shape)
    return dx, dk, dy.reshape(-1, dy.shape[-1]).sum(0)


def numpy_interleave(x, step):
    return np.concatenate([x[..., s::step] for s in range(step)], axis=-1)


def upstream(y):
    """d loss / d y for the loss `values_and_grads` uses: sum(sin(y) * (index % 7))."""
    return np.cos(y) * (np.arange(y.size) % 7).reshape(y.shape)


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
def test_grouped_kernels_match_the_numpy_definition(implementation, c, f, g):
    rng = np.random.default_rng(c + f + g)
    x = tf.constant(rng.normal(size=(2, 3, 2, c)).astype("float32"))
    kernel = rng.normal(size=(1, 1, c // g, f)).astype("float32") / np.sqrt(c // g)
    bias = rng.normal(size=(f,)).astype("float32")
    layer = GroupedPointwiseConv2D(f, g)
    layer.implementation = implementation
    layer.build(x.shape)
    layer.set_weights([kernel, bias])
    y_ref = numpy_grouped(x.numpy(), kernel, g, bias)
    g_ref = numpy_grouped_grads(x.numpy(), kernel, g, upstream(y_ref))
    y, grads = values_and_grads(layer, x, layer.trainable_weights)
    assert [w.name for w in layer.trainable_weights] == ["kernel", "bias"]
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for got, want, name in zip(grads, g_ref, ["x", "kernel", "bias"], strict=True):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("c,f,g", [(32, 16, 2), (40, 240, 2), (1152, 192, 64), (96, 4, 4)])
def test_numpy_definition_is_conv2d_groups(c, f, g):
    """The NumPy reference computes what `keras.layers.Conv2D(groups=g)` computes."""
    rng = np.random.default_rng(c * f)
    x = tf.constant(rng.normal(size=(2, 3, 2, c)).astype("float32"))
    kernel = rng.normal(size=(1, 1, c // g, f)).astype("float32") / np.sqrt(c // g)
    bias = rng.normal(size=(f,)).astype("float32")
    conv = reference_conv(x, kernel, bias, g)
    y, grads = values_and_grads(conv, x, conv.trainable_weights)
    y_ref = numpy_grouped(x.numpy(), kernel, g, bias)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, numpy_grouped_grads(x.numpy(), kernel, g, upstream(y_ref)), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_numpy_definition_on_a_hand_worked_case():
    """C=4, F=4, g=2: outputs 0-1 see only inputs 0-1, outputs 2-3 only inputs 2-3."""
    kernel = np.array([[1, 2, 10, 20], [3, 4, 30, 40]], "float64").reshape(1, 1, 2, 4)
    x = np.array([[1, 1, 0, 0], [0, 0, 1, 2]], "float64")
    np.testing.assert_array_equal(numpy_grouped(x, kernel, 2), [[4, 6, 0, 0], [0, 0, 70, 100]])


@pytest.mark.parametrize("implementation", [i for i in GROUPED_IMPLEMENTATIONS if i != "conv"])
def test_grouped_kernels_take_any_rank(implementation):
    """Rows of any leading shape (rank 2 and 3 here); `conv` is the 4-D-only reference."""
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(1, 1, 4, 12)).astype("float32")
    for shape in [(5, 16), (2, 3, 16)]:
        x = rng.normal(size=shape).astype("float32")
        got = keras.ops.convert_to_numpy(grouped_pointwise(x, kernel, 4, implementation))
        np.testing.assert_allclose(got, numpy_grouped(x, kernel, 4), atol=1e-5)


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
    for size in [(3, 5), (7, 2)]:
        x = np.random.default_rng(1).normal(size=(2, *size, 16)).astype("float32")
        y = model.predict(x, verbose=0)
        np.testing.assert_allclose(y, numpy_interleave(numpy_grouped(x, kernel, 2), 4), atol=1e-5)


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
    """One optimiser step of a small model gives, with every kernel, the weights NumPy computes."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 6, 32)).astype("float32")
    y = rng.normal(size=(4, 6, 6, 16)).astype("float32")
    results, initial = {}, {}
    for implementation in GROUPED_IMPLEMENTATIONS:
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 32))
        k = GroupedPointwiseConv2D(16, 4, name="k")
        k.implementation = implementation
        out = InterleaveChannels(4)(k(inp))
        model = keras.Model(inp, out)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        initial[implementation] = [w.copy() for w in model.get_layer("k").get_weights()]
        model.train_on_batch(x, y)
        results[implementation] = model.get_layer("k").get_weights()[0]
    kernel, bias = initial["einsum"]
    for weights in initial.values():  # the same starting point for every kernel
        np.testing.assert_array_equal(weights[0], kernel)
    # SGD on mean squared error, by hand: d loss / d out = 2 (out - y) / size, back through the
    # interleave (a permutation of channels) to the grouped conv's output, then to its kernel.
    out = numpy_interleave(numpy_grouped(x, kernel, 4, bias), 4)
    d_out = 2 * (out - y) / out.size
    perm = numpy_interleave(np.arange(16), 4)  # out[..., i] = conv[..., perm[i]]
    d_conv = np.empty_like(d_out)
    d_conv[..., perm] = d_out
    _, d_kernel, _ = numpy_grouped_grads(x, kernel, 4, d_conv)
    expected = kernel - 0.1 * d_kernel
    assert np.abs(expected - kernel).max() > 1e-3, "the step must move the kernel for the test to mean anything"
    for implementation, got in results.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=implementation)
