"""The 2022 variant (`--variant 2022`): K-CAI's kConv2DType10 / kGroupConv2D, checked against
references written here from K-CAI's source, never against keffconvert's own counting code."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import count, randomize

from keffconvert.cli import cli
from keffconvert.converter import convert
from keffconvert.export import FoldReport, inference_model
from keffconvert.layers import InterleaveChannels, PaddedGroupedPointwiseConv2D

CPG = 16


# -- K-CAI's rules, transcribed from cai/layers.py (kGroupConv2D, kConv2DType10, conv2d_bn) -------------


def kcai_group_conv(c, f, cpg):
    """kGroupConv2D: (padded channel count, [(groups, channels per group, filters) per path])."""
    groups = c // cpg
    if c % cpg > 0:
        groups = groups + 1
    if groups > f:
        groups = f
    local = cpg
    if groups > 1:
        padded = c
        if groups * cpg > c:
            padded = groups * cpg
        if groups * cpg < c:
            local = c // groups
            if c % groups > 0:
                local = local + 1
            if local * groups > c:
                padded = groups * local
        extra = f % groups
        if extra == 0:
            return padded, [(groups, local, f)], groups
        return padded, [(groups, local, f - extra), (extra, local, extra)], groups
    return c, [(1, c, f)], groups


def kcai_group_conv_trainable(c, f, cpg, bias, bn):
    """conv2d_bn per path: conv (+ bias), BatchNormalization(scale=True): gamma and beta trainable."""
    _, paths, groups = kcai_group_conv(c, f, cpg)
    n = sum(local * filters + (filters if bias else 0) + (2 * filters if bn else 0) for _, local, filters in paths)
    return n, groups


def kcai_type10_trainable(c, f, cpg, bias, bn):
    expansion = f > c
    if c > 2 * cpg or (expansion and c > cpg):
        n, groups = kcai_group_conv_trainable(c, f, cpg, bias, bn)
        if groups > 1 and c >= f:
            n += kcai_group_conv_trainable(f, f, cpg, bias, bn)[0]
        return n
    return c * f + (f if bias else 0) + (2 * f if bn else 0)  # conv2d_bn unmodified


def kcai_group_conv_numpy(x, kernels, biases, cpg):
    """kGroupConv2D's forward pass, literally: FitChannelCountTo (copies of x, then its first
    channels), path 1 a grouped conv, path 2 CopyChannels(0, local*extra) then one filter per
    group, Concatenate. `kernels`/`biases`: one (local, filters) / (filters,) per path."""
    c = x.shape[-1]
    padded, paths, _ = kcai_group_conv(c, sum(k.shape[1] for k in kernels), cpg)
    copies = [x] * (padded // c) + ([x[..., : padded % c]] if padded % c else [])
    xp = np.concatenate(copies, axis=-1)
    outputs = []
    for (groups, local, filters), kernel, bias in zip(paths, kernels, biases):
        per = filters // groups
        out = [xp[..., g * local:(g + 1) * local] @ kernel[:, g * per:(g + 1) * per] for g in range(groups)]
        outputs.append(np.concatenate(out, axis=-1) + bias)
    return np.concatenate(outputs, axis=-1)


def recount_kcai(model, cpg):
    """K-CAI's kEfficientNet trainable parameters, from the Keras EfficientNet's own layers:
    every 1x1 conv goes through kConv2DType10 with its bias and with the BN it had (kblock:
    expand/project/top with BN, no bias; se_reduce/se_expand with bias, no BN)."""
    before_bn = {id(layer.input._keras_history.operation) for layer in model.layers
                 if isinstance(layer, keras.layers.BatchNormalization)}
    total = count(model.trainable_weights)
    for layer in model.layers:
        if type(layer) is not keras.layers.Conv2D or tuple(layer.kernel_size) != (1, 1):
            continue
        c, f = layer.input.shape[-1], layer.filters
        bn = id(layer) in before_bn
        total -= count(layer.trainable_weights) + (2 * f if bn else 0)
        total += kcai_type10_trainable(c, f, cpg, layer.use_bias, bn)
    return total


# -- the layer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c, f", [(1020, 250), (40, 16), (96, 4), (56, 336), (20, 40), (33, 7), (4, 4)])
def test_padded_grouped_conv_is_kcai_group_conv(c, f):
    rng = np.random.default_rng(c * 1000 + f)
    layer = PaddedGroupedPointwiseConv2D(f, CPG)
    x = rng.normal(size=(2, 3, 3, c)).astype("float32")
    layer.build(x.shape)
    _, paths, _ = kcai_group_conv(c, f, CPG)
    kernels = [rng.normal(size=(local, filters)).astype("float32") for _, local, filters in paths]
    biases = [rng.normal(size=filters).astype("float32") for _, _, filters in paths]
    layer.set_weights([np.concatenate(kernels, axis=1)[None, None], np.concatenate(biases)])
    expected = kcai_group_conv_numpy(x, kernels, biases, CPG)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-4)
    assert count(layer.trainable_weights) == sum(local * n + n for _, local, n in paths)


def test_interleave_with_a_step_that_does_not_divide_is_kcai_slices():
    x = np.random.default_rng(0).normal(size=(2, 56)).astype("float32")
    expected = np.concatenate([x[:, s::3] for s in range(3)], axis=-1)  # InterleaveChannels.call in K-CAI
    np.testing.assert_array_equal(np.asarray(InterleaveChannels(3)(x)), expected)


# -- EfficientNet-B0..B7 against kEfficientNetB0..B7(kType=D6v3_16ch()) ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("index", range(8))
def test_efficientnet_counts_equal_kcai(index):
    # The architecture only: no weight values are made (counts don't depend on them or on input size).
    with keras.StatelessScope():
        model = getattr(keras.applications, f"EfficientNetB{index}")(weights=None, classes=10,
                                                                     input_shape=(32, 32, 3))
    _, plan = convert(model, CPG, variant="2022", dry_run=True)
    assert plan.variant == "2022"
    assert plan.trainable_params_after == recount_kcai(model, CPG)
    _, plan_2021 = convert(model, CPG, dry_run=True)
    assert plan.trainable_params_after < plan_2021.trainable_params_after
    keras.backend.clear_session()


# -- a small model with every case: padding, one-filter groups, uneven interleave, dense L ----------------


def varied_cnn():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(40, 3, padding="same", name="stem")(inp)
    x = keras.layers.Conv2D(56, 1, use_bias=False, name="expand")(x)  # expansion: 3 groups, padded 48, 2 extra
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("swish", name="expand_act")(x)
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    se = keras.layers.Conv2D(8, 1, activation="swish", name="se_reduce")(se)  # L on 8 channels: dense
    se = keras.layers.Conv2D(56, 1, activation="sigmoid", name="se_expand")(se)  # C <= cpg: kept
    x = keras.layers.Multiply(name="excite")([x, se])
    x = keras.layers.Conv2D(72, 1, activation="relu", name="mix")(x)
    x = keras.layers.Conv2D(56, 1, use_bias=False, name="project")(x)  # interleave step 3 on 56: uneven
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(5, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="varied")


@pytest.fixture(scope="module")
def varied():
    model = randomize(varied_cnn(), seed=3)
    converted, plan = convert(model, CPG, variant="2022")
    return model, converted, plan


def test_plan_counts_what_is_built_and_what_kcai_counts(varied):
    model, converted, plan = varied
    assert plan.trainable_params_after == count(converted.trainable_weights) == recount_kcai(model, CPG)
    entries = {e.name: e for e in plan.layers}
    assert not entries["se_expand"].converted and not entries["stem"].converted
    assert entries["project"].interleave_step == 56 // CPG and entries["project"].second_conv
    assert not entries["expand"].second_conv and entries["expand"].interleave_step is None
    assert isinstance(converted.get_layer("project_interleave"), InterleaveChannels)


def test_k_starts_from_the_original_weights_it_keeps(varied):
    """K's dense form is M's kernel on the connections K-CAI's grouping keeps, 0 elsewhere."""
    model, converted, _ = varied
    for name in ("expand", "mix", "project"):
        m = model.get_layer(name).get_weights()[0][0, 0]
        c, f = m.shape
        _, paths, _ = kcai_group_conv(c, f, CPG)
        kept = np.zeros((c, f), bool)
        col = 0
        for groups, local, filters in paths:
            per = filters // groups
            for g in range(groups):
                rows = np.arange(g * local, (g + 1) * local) % c
                kept[np.ix_(rows, np.arange(col + g * per, col + (g + 1) * per))] = True
            col += filters
        probe = PaddedGroupedPointwiseConv2D(f, CPG, use_bias=False)  # K's kernel alone: no bias, no relu
        probe.build((None, c))
        probe.set_weights([converted.get_layer(f"{name}_k").get_weights()[0]])
        dense = np.asarray(probe(np.eye(c, dtype="float32")))  # row i: what input channel i reaches
        np.testing.assert_allclose(dense, np.where(kept, m, 0.0), atol=1e-6)


def test_save_load_predict_and_export_agree(varied, tmp_path):
    _, converted, _ = varied
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    expected = np.asarray(converted(x, training=False))  # eager calls: no tf.function to trace
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"m{suffix}"
        converted.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, rtol=1e-5, atol=1e-6)
    report = FoldReport()
    folded = inference_model(converted, report=report)
    np.testing.assert_allclose(np.asarray(folded(x, training=False)), expected, atol=1e-4)
    assert report.batch_norms or report.merges


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        convert(varied_cnn(), CPG, variant="2023", dry_run=True)


def _padded_pattern(c, f, cpg):
    """K-CAI's connections, from kcai_group_conv: filter f of path p, group j reads padded channels
    j*local .. (j+1)*local - 1 (padded channel q is input channel q mod c); 0/1 of shape (c, f)."""
    _, paths, _ = kcai_group_conv(c, f, cpg)
    mask = np.zeros((c, f))
    column = 0
    for groups, local, filters in paths:
        for q in range(filters):
            j = q // (filters // groups)
            mask[np.arange(j * local, (j + 1) * local) % c, column] = 1
            column += 1
    return mask


def _calibration_images(n=48, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, 8, 8, 3)).astype("float32")


def test_calibration_fits_a_kernel_already_in_the_padded_pattern_exactly():
    """A conv whose kernel is zero outside the 2022 connections loses nothing: the fit reproduces it."""
    model = randomize(varied_cnn(), seed=5)
    for name in ("expand", "se_reduce", "mix", "project"):
        layer = model.get_layer(name)
        weights = layer.get_weights()
        c, f = weights[0].shape[2:]
        weights[0] = weights[0] * _padded_pattern(c, f, CPG)[None, None].astype("float32")
        layer.set_weights(weights)
    x = _calibration_images()
    converted, plan = convert(model, CPG, variant="2022", calibration=x)
    entries = {e.name: e for e in plan.converted}
    for name in ("expand", "se_reduce", "mix", "project"):
        assert entries[name].reconstruction_error < 1e-4, (name, entries[name].reconstruction_error)
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), atol=2e-3)


def test_calibration_beats_the_padded_slices():
    model = randomize(varied_cnn(), seed=3)
    x, held_out = _calibration_images(), _calibration_images(32, seed=1)
    slices, _ = convert(model, CPG, variant="2022")
    fitted, plan = convert(model, CPG, variant="2022", calibration=x)
    for entry in plan.converted:
        assert entry.reconstruction_error <= entry.slices_error + 1e-9, entry.name
    assert plan.converted and any(e.reconstruction_error < 0.5 * e.slices_error for e in plan.converted)
    target = model.predict(held_out, verbose=0)
    gap = [np.mean((m.predict(held_out, verbose=0) - target) ** 2) for m in (fitted, slices)]
    assert gap[0] < gap[1], gap
    assert count(fitted.trainable_weights) == plan.trainable_params_after == recount_kcai(model, CPG)
    # y = K x + L P K x as built reproduces the fit's own error on the calibration images
    project = next(e for e in plan.converted if e.name == "project")
    assert project.second_conv
    z = keras.Model(model.inputs, model.get_layer("project_bn").output).predict(x, verbose=0)
    y = keras.Model(fitted.inputs, fitted.get_layer("project_sum").output).predict(x, verbose=0)
    measured = np.sum((y - z) ** 2) / np.sum((z - z.mean(axis=(0, 1, 2))) ** 2)
    assert measured == pytest.approx(project.reconstruction_error, rel=0.05, abs=1e-4)


def test_cli_variant_option(tmp_path):
    path = tmp_path / "model.keras"
    varied_cnn().save(path)
    report = tmp_path / "plan.json"
    result = CliRunner().invoke(cli, [str(path), "--variant", "2022", "--dry-run", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "variant 2022" in result.output
    plan = json.loads(report.read_text())["plan"]
    assert plan["variant"] == "2022"
    assert plan["trainable_params_after"] == recount_kcai(keras.models.load_model(path), CPG)

