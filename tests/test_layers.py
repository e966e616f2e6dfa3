"""The two kEffNet layers: K-CAI semantics, Conv2D(groups) equivalence, serialization."""

import keras
import numpy as np
import pytest

from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels


def reference_interleave(x, step):
    """METHOD.md's definition, verbatim."""
    return np.concatenate([x[..., s::step] for s in range(step)], axis=-1)


@pytest.mark.parametrize("channels,step", [(8, 2), (12, 3), (32, 4), (6, 6)])
def test_interleave_matches_kcai_definition(channels, step):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, channels)).astype("float32")
    out = keras.ops.convert_to_numpy(InterleaveChannels(step)(x))
    np.testing.assert_array_equal(out, reference_interleave(x, step))


def test_interleave_is_a_permutation_not_identity():
    x = np.arange(8, dtype="float32").reshape(1, 1, 1, 8)
    out = keras.ops.convert_to_numpy(InterleaveChannels(4)(x)).ravel()
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("groups,use_bias", [(2, True), (4, False), (8, True)])
def test_grouped_pointwise_equals_conv2d_groups(groups, use_bias):
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 32)).astype("float32")
    conv = keras.layers.Conv2D(16, 1, groups=groups, use_bias=use_bias)
    conv.build(x.shape)
    conv.set_weights([np.random.default_rng(2).normal(size=w.shape).astype("float32") for w in conv.get_weights()])
    grouped = GroupedPointwiseConv2D(16, groups, use_bias=use_bias)
    grouped.build(x.shape)
    grouped.set_weights(conv.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grouped(x)), keras.ops.convert_to_numpy(conv(x)), atol=1e-5)
    assert grouped.count_params() == 32 * 16 // groups + (16 if use_bias else 0)


def test_grouped_pointwise_gradients_match_conv2d_groups():
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(3).normal(size=(2, 4, 4, 16)).astype("float32"))
    conv = keras.layers.Conv2D(8, 1, groups=4)
    conv.build(x.shape)
    grouped = GroupedPointwiseConv2D(8, 4)
    grouped.build(x.shape)
    grouped.set_weights(conv.get_weights())
    grads = []
    for layer in (conv, grouped):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        grads.append(tape.gradient(loss, [x, *layer.trainable_weights]))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_grouped_pointwise_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        GroupedPointwiseConv2D(10, 4)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_layers_round_trip_through_saved_files(tmp_path, suffix):
    inp = keras.Input((None, None, 16))
    k = GroupedPointwiseConv2D(8, 4, activation="swish", name="k")(inp)
    out = InterleaveChannels(2, name="mix")(k)
    model = keras.Model(inp, out)
    x = np.random.default_rng(4).normal(size=(2, 5, 7, 16)).astype("float32")
    path = tmp_path / f"m{suffix}"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.get_layer("k"), GroupedPointwiseConv2D)
    assert loaded.get_layer("mix").step_size == 2
