"""The fit solves whatever statistics real networks produce: singular, indefinite by rounding,
badly scaled, or all zero (a ReLU6 network on real photos has all of these), and refuses only
non-finite ones, with a ValueError the CLI turns into a one-line data error."""

import keras
import numpy as np
import pytest

import keffconvert
from keffconvert.fit.solve import ChainFit, ChainStats, regularised_inverses
from keffconvert.report.fidelity import agreement

C, F, GROUPS = 32, 32, 4


def float32_stats(x):
    """The moments as the calibration walk accumulates them: float32 products, float64 sums."""
    rows = np.hstack([x, np.ones((len(x), 1))]).astype("float32")
    gram = (rows.T @ rows).astype("float64")
    return ChainStats.from_moments(gram, gram, gram)


def block_diagonal_target(rng):
    target = np.zeros((C + 1, F))
    for j in range(GROUPS):
        rows, cols = slice(j * C // GROUPS, (j + 1) * C // GROUPS), slice(j * F // GROUPS, (j + 1) * F // GROUPS)
        target[rows, cols] = rng.normal(size=(C // GROUPS, F // GROUPS))
    target[-1] = rng.normal(size=F)
    return target


def pathological_inputs(rng, n=4000):
    """Inputs whose every group holds a kind of channel that makes a Gram block singular."""
    x = rng.uniform(0, 6, size=(n, C))
    x[:, 0] = 0.0  # dead (ReLU6 below zero on every pixel)
    x[:, 1] = 6.0  # saturated: a copy of the intercept row times 6
    x[:, 9] = x[:, 8]  # duplicated
    x[:, 16] *= 1e4  # float16-range values (they would swamp a ridge relative to the mean scale)
    x[:, 12] *= 1e-4  # a tiny scale next to ordinary ones
    x[:, 24:32] = 0.0  # a group whose inputs are all zero
    return x


def column_errors(x, fitter, fit):
    """Each output's squared error over its own spread: output 0 of a 1e4-scale group must not
    hide the others."""
    rows = np.hstack([x, np.ones((len(x), 1))])
    z = rows @ fitter.target
    y = rows @ fitter.total_map(fit.k, fit.l)
    return np.sum((y - z) ** 2, axis=0) / np.maximum(np.sum((z - z.mean(0)) ** 2, axis=0), 1e-300)


@pytest.mark.parametrize("fit_l", [False, True])
def test_a_block_diagonal_map_is_reproduced_from_singular_badly_scaled_statistics(fit_l):
    rng = np.random.default_rng(0)
    x = pathological_inputs(rng)
    fitter = ChainFit(float32_stats(x), block_diagonal_target(rng), GROUPS, intercept=True, fit_l=fit_l)
    fit = fitter.run()
    assert np.all(np.isfinite(fit.k)) and (fit.l is None or np.all(np.isfinite(fit.l)))
    live = np.any(fitter.target[:C] != 0, axis=0) & (np.arange(F) < 24)  # group 3 reads only zeros
    # a ridge relative to the mean scale would be set by channel 16 and flatten the other groups
    assert np.max(column_errors(x, fitter, fit)[live]) < 1e-3


def test_moments_made_indefinite_by_rounding_still_solve():
    """float32 sums over millions of pixels round: a saturated channel (a multiple of the
    intercept row) then leaves its Gram block slightly indefinite, below any relative ridge."""
    rng = np.random.default_rng(6)
    x = pathological_inputs(rng)
    stats = float32_stats(x)
    null = np.zeros(C + 1)
    null[1], null[-1] = 1.0, -6.0  # x_1 - 6 = 0 on every pixel
    null /= np.linalg.norm(null)
    stats.conv = stats.conv - 1e-2 * np.trace(stats.conv) * np.outer(null, null)
    fit = ChainFit(stats, block_diagonal_target(rng), GROUPS, intercept=True, fit_l=True).run()
    assert np.all(np.isfinite(fit.k)) and np.all(np.isfinite(fit.l))


def test_an_all_zero_input_fits_the_intercept_alone():
    rng = np.random.default_rng(1)
    target = block_diagonal_target(rng)
    fitter = ChainFit(float32_stats(np.zeros((100, C))), target, GROUPS, intercept=True, fit_l=True)
    fit = fitter.run()
    assert np.all(np.isfinite(fit.k)) and np.all(np.isfinite(fit.l))
    assert np.allclose(fit.k[:-1], 0.0)
    assert np.allclose(fitter.total_map(fit.k, fit.l)[-1], target[-1], atol=1e-6)


def test_regularised_inverses_exist_for_indefinite_rounding_and_zero_rows():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(5, 2))
    block = v @ v.T  # rank 2
    block[0, 1] += 1e-9  # rounding: asymmetric, slightly indefinite
    block[4, :] = block[:, 4] = 0.0  # a dead input
    inverse = regularised_inverses(np.stack([block, np.eye(5)]), 1e-4)
    assert np.all(np.isfinite(inverse))
    assert np.allclose(inverse[0][4], 0.0) and np.allclose(inverse[1], np.eye(5) / (1 + 1e-4))
    assert np.all(np.linalg.eigvalsh((inverse[0] + inverse[0].T) / 2) >= -1e-9)


def test_non_finite_statistics_are_refused_with_a_value_error():
    stats = float32_stats(np.ones((10, C)))
    stats.conv[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        ChainFit(stats, np.ones((C + 1, F)), GROUPS, intercept=True, fit_l=False)


def relu6_network_with_dead_and_saturated_channels():
    """Expand / depthwise / project blocks with ReLU6, where batch-norm betas pin a third of the
    channels below 0 (dead) or above 6 (saturated) on every image."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    for block in ("a", "b"):
        shortcut = x
        x = keras.layers.Conv2D(96, 1, use_bias=False, name=f"block{block}_expand_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_expand_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"block{block}_expand_relu")(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"block{block}_dwconv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"block{block}_relu")(x)
        x = keras.layers.Conv2D(32, 1, use_bias=False, name=f"block{block}_project_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_project_bn")(x)
        x = keras.layers.Add(name=f"block{block}_add")([x, shortcut])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and "project" not in layer.name:
            gamma, beta, mean, var = layer.get_weights()
            channels = len(gamma)
            beta = rng.normal(0, 0.5, channels)
            beta[: channels // 6] = -1e3  # always 0 after ReLU6
            beta[channels // 6: channels // 3] = 1e3  # always 6
            layer.set_weights([gamma, beta, mean, var])
    return model


def test_a_relu6_network_with_dead_and_saturated_channels_converts_data_aware():
    model = relu6_network_with_dead_and_saturated_channels()
    images = np.random.default_rng(4).uniform(-1, 1, size=(96, 8, 8, 3)).astype("float32")
    plain, _ = keffconvert.convert(model, channels_per_group=8)
    fitted, plan = keffconvert.convert(model, channels_per_group=8, calibration=images)
    assert plan.converted  # something was converted, and fitted
    for weight in fitted.weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(weight)))
    held_out = np.random.default_rng(5).uniform(-1, 1, size=(200, 8, 8, 3)).astype("float32")
    fitted_error = agreement(model, fitted, held_out)["mean_abs_diff"]
    assert fitted_error < 0.5 * agreement(model, plain, held_out)["mean_abs_diff"]
