"""Data-aware conversion: the fit is exact where the structure allows it, and helps where it cannot be."""

import keras
import numpy as np
import pytest
from conftest import randomize, small_cnn

import keffconvert
from keffconvert.fit.coupling import choose_order
from keffconvert.report.fidelity import agreement
from keffconvert.layers import interleave_permutation


def images(n, shape=(8, 8, 16), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def block_diagonal_dense(c, f, groups, rng):
    kernel = np.zeros((c, f), "float32")
    for j in range(groups):
        kernel[j * c // groups:(j + 1) * c // groups, j * f // groups:(j + 1) * f // groups] = \
            rng.normal(size=(c // groups, f // groups))
    return kernel


def pointwise_model(kernel, bn=True, activation=None, name="m"):
    c, f = kernel.shape
    inp = keras.Input((8, 8, c))
    conv = keras.layers.Conv2D(f, 1, use_bias=not bn, name=name)
    x = conv(inp)
    if bn:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.Activation(activation, name=f"{name}_act")(x)
    model = keras.Model(inp, x)
    randomize(model)
    conv.set_weights([kernel[None, None]] + conv.get_weights()[1:])
    return model


def test_a_kernel_that_is_already_block_diagonal_reconstructs_exactly():
    kernel = block_diagonal_dense(16, 16, 2, np.random.default_rng(0))
    model = pointwise_model(kernel)
    new, plan = keffconvert.convert(model, channels_per_group=8, calibration=images(64))
    entry = plan.converted[0]
    assert entry.groups == 2 and entry.second_conv
    assert entry.reconstruction_error < 1e-6
    x = images(8, seed=1)
    np.testing.assert_allclose(new.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-3, rtol=1e-3)


def test_a_map_of_the_kEffNet_form_is_found_by_the_alternating_fit():
    """W = K (I + P L) with block-diagonal K and L: exactly what K + L P K can express."""
    rng = np.random.default_rng(1)
    c = f = 16
    groups = 4
    k = block_diagonal_dense(c, f, groups, rng)
    l_true = block_diagonal_dense(f, f, groups, rng) * 0.5
    perm = interleave_permutation(f, f // groups)
    p = np.eye(f)[:, perm]  # (x P)[:, o] = x[:, perm[o]]
    kernel = (k @ (np.eye(f) + p @ l_true)).astype("float32")
    model = pointwise_model(kernel)
    new, plan = keffconvert.convert(model, channels_per_group=4, calibration=images(64))
    entry = plan.converted[0]
    assert entry.slices_error > 0.1, "the slices alone cannot express it"
    assert entry.reconstruction_error < 0.02 * entry.slices_error


def test_the_fitted_model_computes_k_plus_l_of_interleaved_k():
    """y = K x + L P K x, with the fitted weights read back from the built layers."""
    model = pointwise_model(np.random.default_rng(2).normal(size=(16, 16)).astype("float32"), bn=False)
    new, _ = keffconvert.convert(model, channels_per_group=4, calibration=images(64))
    k = new.get_layer("m_k")
    l = new.get_layer("m_l")
    x = images(4, seed=3)
    k_out = keras.ops.convert_to_numpy(k(x))
    step = new.get_layer("m_interleave").step_size
    mixed = k_out[..., interleave_permutation(16, step)]
    expected = k_out + keras.ops.convert_to_numpy(l(mixed))
    np.testing.assert_allclose(new.predict(x, verbose=0), expected, atol=1e-5)


def test_fit_beats_slices_on_held_out_inputs():
    model = randomize(small_cnn())
    x_cal, x_held = np.random.default_rng(4).normal(size=(2, 128, 16, 16, 3)).astype("float32")
    plain, _ = keffconvert.convert(model, channels_per_group=8)
    fitted, plan = keffconvert.convert(model, channels_per_group=8, calibration=x_cal)
    before, after = agreement(model, plain, x_held), agreement(model, fitted, x_held)
    assert after["mean_abs_diff"] < 0.5 * before["mean_abs_diff"]
    assert after["correlation"] > before["correlation"]
    for entry in plan.converted:
        assert entry.reconstruction_error <= entry.slices_error + 1e-9, entry.name
    assert plan.calibration["samples"] == 128


def test_batch_norms_in_training_mode_keep_the_fit():
    """The new batch norms hold the fitted outputs' own statistics, so normalising a batch by
    its own statistics (training mode) gives about what inference mode gives."""
    model = pointwise_model(np.random.default_rng(5).normal(size=(16, 16)).astype("float32"))
    new, _ = keffconvert.convert(model, channels_per_group=4, calibration=images(256))
    x = images(128, seed=6)
    inference = keras.ops.convert_to_numpy(new(x, training=False))
    training = keras.ops.convert_to_numpy(new(x, training=True))
    assert np.abs(training - inference).mean() < 0.05 * np.abs(inference).mean()


def test_choose_order_balances_the_groups_and_follows_the_evidence():
    explained = np.zeros((8, 2))
    explained[[0, 2, 5, 7], 0] = 1.0  # filters best explained by group 0
    explained[[1, 3, 4, 6], 1] = 1.0
    perm = choose_order(explained, 2)
    assert sorted(perm) == list(range(8))
    assert set(perm[0::2]) == {0, 2, 5, 7} and set(perm[1::2]) == {1, 3, 4, 6}


def mbconv_like(kernel_expand):
    """expand (C < F) -> BN -> swish -> depthwise -> BN -> swish -> project: a coupling region."""
    c, f = kernel_expand.shape
    inp = keras.Input((8, 8, c))
    expand = keras.layers.Conv2D(f, 1, use_bias=False, name="expand")
    x = expand(inp)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("swish", name="expand_act")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.Activation("swish", name="dw_act")(x)
    x = keras.layers.Conv2D(c, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    model = keras.Model(inp, x)
    randomize(model)
    expand.set_weights([kernel_expand[None, None]])
    return model


def test_regrouping_puts_each_filter_with_the_inputs_it_reads():
    """Each expand filter reads one half of the inputs, in a scrambled pattern: the plain groups
    split them badly; regrouping the expanded channels (and the depthwise conv and batch norm
    after them) reproduces the expansion exactly, and the model still computes one function."""
    rng = np.random.default_rng(7)
    kernel = np.zeros((16, 32), "float32")
    halves = rng.permutation(np.repeat([0, 1], 16))
    for f, half in enumerate(halves):
        kernel[half * 8:(half + 1) * 8, f] = rng.normal(size=8)
    model = mbconv_like(kernel)
    x_cal, x_held = images(128, seed=8), images(32, seed=9)
    _, plan = keffconvert.convert(model, channels_per_group=8, calibration=x_cal)
    errors = {entry.name: entry for entry in plan.converted}
    assert errors["expand"].reconstruction_error < 1e-6
    assert errors["expand"].slices_error > 0.3
    # With the project conv kept (its input rows reordered), the whole model is reproduced.
    new, plan = keffconvert.convert(model, channels_per_group=8, calibration=x_cal, exclude=["project"])
    assert [e.name for e in plan.converted] == ["expand"]
    x = x_held
    np.testing.assert_allclose(new.predict(x, verbose=0), model.predict(x, verbose=0), atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_nested_transfer_model_is_fitted_inside_its_base():
    base = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(32, 32, 3))
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(5, activation="softmax")], name="transfer")
    randomize(model)
    x = np.random.default_rng(10).uniform(0, 255, size=(48, 32, 32, 3)).astype("float32")
    new, plan = keffconvert.convert(model, calibration=x[:32])
    fitted = [e for e in plan.converted if e.reconstruction_error is not None]
    assert len(fitted) == len(plan.converted) > 0
    assert all(e.name.startswith("efficientnetb0/") for e in fitted)
    assert np.mean([e.reconstruction_error for e in fitted]) < np.mean([e.slices_error for e in fitted])
