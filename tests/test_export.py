"""Inference export: the folded Keras model, TFLite float32 and int8, SavedModel and the CLI
all predict what the source model predicts."""

import re

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keffconvert
from keffconvert.cli import cli
from keffconvert.export import FoldReport, inference_model
from keffconvert.export.tflite import predict, to_tflite
from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels

ATOL = 1e-4


def moderate(model, seed=0):
    """Weights of a trained network's scale (outputs neither tiny nor saturated), BN included."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            moderate(layer, seed + 1)
            continue
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            new = [rng.uniform(0.6, 1.4, w.shape) if w.ndim and name in ("gamma", "moving_variance")
                   else rng.normal(0, 0.1, w.shape) for w, name in zip(weights, [v.name for v in layer.weights])]
        elif weights:
            fan_in = int(np.prod(weights[0].shape[:-1])) or 1
            new = [rng.normal(0, 1 / np.sqrt(fan_in), weights[0].shape)] + [rng.normal(0, 0.1, w.shape) for w in weights[1:]]
        else:
            continue
        layer.set_weights([w.astype("float32") for w in new])
    return model


def mbconv_cnn(classes=4, name="mbconv"):
    """A 32x32 EfficientNet-like CNN: expansion, depthwise, squeeze-excite, projection + residual."""
    layers = keras.layers
    inp = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.Activation("swish", name="stem_act")(x)
    skip = x
    x = layers.Conv2D(64, 1, use_bias=False, name="expand")(x)  # C < F: K + interleave
    x = layers.BatchNormalization(momentum=0.9, name="expand_bn")(x)
    x = layers.Activation("swish", name="expand_act")(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(momentum=0.9, name="dw_bn")(x)
    x = layers.Activation("swish", name="dw_act")(x)
    se = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    se = layers.Conv2D(16, 1, activation="swish", name="se_reduce")(se)  # C >= F with an activation
    se = layers.Conv2D(64, 1, activation="sigmoid", name="se_expand")(se)
    x = layers.Multiply(name="se_mul")([x, se])
    x = layers.Conv2D(32, 1, use_bias=False, name="project")(x)  # C >= F, linear: a residual merge
    x = layers.BatchNormalization(momentum=0.9, name="project_bn")(x)
    x = layers.Add(name="block_add")([x, skip])
    x = layers.Conv2D(64, 1, use_bias=False, name="top")(x)
    x = layers.BatchNormalization(momentum=0.9, name="top_bn")(x)
    x = layers.Activation("swish", name="top_act")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name=name)


@pytest.fixture(scope="module")
def converted():
    source = moderate(mbconv_cnn())
    model, plan = keffconvert.convert(source, 8)
    assert plan.converted
    return moderate(model, seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")


def assert_same_predictions(a, b, x, atol=ATOL):
    ya, yb = a.predict(x, verbose=0), b.predict(x, verbose=0)
    assert ya.std() > 1e-3, "outputs must not be degenerate for the comparison to mean anything"
    np.testing.assert_allclose(yb, ya, atol=atol)


def fold_and_compare(model, seed, samples=2):
    """Fold `model` for inference, assert it predicts the same on random inputs; the folded model and report."""
    report = FoldReport()
    folded = inference_model(model, report=report)
    x = np.random.default_rng(seed).normal(size=(samples, *model.inputs[0].shape[1:])).astype("float32")
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=ATOL)
    return folded, report


def count_layers(model, kind):
    return sum(isinstance(layer, kind) for layer in model.layers)


# -- folding ------------------------------------------------------------------------------------


def test_folded_keras_model_predicts_the_same(converted, images):
    report = FoldReport()
    folded = inference_model(converted, report=report)
    assert_same_predictions(converted, folded, images)
    assert count_layers(folded, keras.layers.BatchNormalization) == 0
    assert report.batch_norms and report.interleaves and report.merges
    assert count_layers(folded, InterleaveChannels) == len(report.kept_interleaves)


def test_without_dense_kernels_interleaves_stay_and_nothing_merges(converted, images):
    report = FoldReport()
    folded = inference_model(converted, max_dense_weights=0, report=report)
    assert_same_predictions(converted, folded, images)
    assert not report.merges and report.kept_interleaves
    assert count_layers(folded, InterleaveChannels) == count_layers(converted, InterleaveChannels)
    assert folded.count_params() < converted.count_params()  # only BN statistics and scales went


def test_tflite_target_uses_grouped_conv2d(converted, images):
    folded = inference_model(converted, target="tflite", max_dense_weights=0)
    assert count_layers(folded, GroupedPointwiseConv2D) == 0
    assert any(isinstance(l, keras.layers.Conv2D) and l.groups > 1 for l in folded.layers)
    assert_same_predictions(converted, folded, images)


def test_efficientnet_b0_folds_exactly(b0_small, images):
    source = moderate(keras.models.clone_model(b0_small))  # a copy: the session's model stays as built
    model, _ = keffconvert.convert(source, 16)
    report = FoldReport()
    folded = inference_model(model, report=report)
    assert_same_predictions(model, folded, images[:4])
    assert count_layers(folded, keras.layers.BatchNormalization) == 0
    assert len(report.batch_norms) > 30 and len(report.merges) > 5
    assert len(folded.layers) < len(model.layers)


def _bn_after(layer_factory, x_shape, **bn):
    inp = keras.Input(x_shape)
    y = keras.layers.BatchNormalization(**bn)(layer_factory()(inp))
    return moderate(keras.Model(inp, y))


@pytest.mark.parametrize("factory,bn", [
    (lambda: keras.layers.Conv2D(6, 3, padding="same"), {}),
    (lambda: keras.layers.Conv2D(6, 1, use_bias=False), {"scale": False}),
    (lambda: keras.layers.Conv2D(6, 1, groups=2, use_bias=False), {"center": False}),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), {}),
    (lambda: GroupedPointwiseConv2D(6, 2, use_bias=False), {}),
])
def test_batch_norm_folds_into_each_conv_kind(factory, bn):
    model = _bn_after(factory, (5, 5, 4), **bn)
    _, report = fold_and_compare(model, seed=1, samples=3)
    assert len(report.batch_norms) == 1


def test_batch_norm_stays_when_the_conv_output_has_two_consumers():
    inp = keras.Input((4, 4, 4))
    c = keras.layers.Conv2D(4, 1, name="c")(inp)
    out = keras.layers.Add()([keras.layers.BatchNormalization(momentum=0.9, name="bn")(c), c])
    _, report = fold_and_compare(moderate(keras.Model(inp, out)), seed=2)
    assert not report.batch_norms


def test_interleave_folds_into_dense_layers_and_back_into_its_conv():
    inp = keras.Input((4, 4, 8))
    k = GroupedPointwiseConv2D(12, 2, use_bias=False, name="k")(inp)  # expansion K
    k = keras.layers.BatchNormalization(momentum=0.9, name="k_bn")(k)
    k = keras.layers.Activation("relu", name="k_act")(k)
    k = InterleaveChannels(6, name="back")(k)  # folds back into K (through BN and relu)
    d = keras.layers.Conv2D(8, 3, padding="same", name="dense_conv")(InterleaveChannels(3, name="fwd")(k))
    pooled = keras.layers.GlobalAveragePooling2D()(d)
    out = keras.layers.Dense(3, name="head")(InterleaveChannels(2, name="to_dense")(pooled))
    folded, report = fold_and_compare(moderate(keras.Model(inp, out)), seed=3)
    assert count_layers(folded, InterleaveChannels) == 0
    assert len(report.interleaves) == 3


def test_nested_and_shared_layers(converted, images):
    """A converted model nested in a Sequential folds inside; a layer called twice is left alone."""
    wrapper = keras.Sequential([keras.Input((32, 32, 3)), converted, keras.layers.Dense(2, name="outer")])
    wrapper.get_layer("outer").set_weights([np.arange(8, dtype="float32").reshape(4, 2), np.zeros(2, "float32")])
    assert_same_predictions(wrapper, inference_model(wrapper), images)

    inp = keras.Input((4, 4, 4))
    conv, bn = keras.layers.Conv2D(4, 1, name="shared"), keras.layers.BatchNormalization(momentum=0.9, name="bn")
    out = bn(conv(conv(inp)))
    _, report = fold_and_compare(moderate(keras.Model(inp, out)), seed=4)
    assert not report.batch_norms


def test_folded_keras_model_saves_and_loads(converted, images, tmp_path):
    folded = inference_model(converted)
    folded.save(tmp_path / "f.keras")
    loaded = keras.models.load_model(tmp_path / "f.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), folded.predict(images, verbose=0), atol=1e-6)


# -- TFLite -------------------------------------------------------------------------------------


def test_tflite_float32_matches_keras(converted, images):
    content = to_tflite(converted)
    got = predict(content, images)
    np.testing.assert_allclose(got, converted.predict(images, verbose=0), atol=ATOL)


def test_tflite_of_the_unfolded_training_model_matches_keras(converted, images):
    """The converted model itself, every `auto` kernel in it, goes through TFLiteConverter."""
    content = to_tflite(converted, fold=False)
    np.testing.assert_allclose(predict(content, images[:4]), converted.predict(images[:4], verbose=0), atol=ATOL)


@pytest.fixture(scope="module")
def trained_digits():
    """The converted MBConv CNN trained from scratch (as the paper trains kEffNets) for a few
    epochs on digits at 32x32: a 'trained-ish' model whose predictions have real margins, so
    that int8's agreement with float32 means something (random weights give near-ties)."""
    from keffconvert.data.digits import digits_images, load_digits_arrays

    keras.utils.set_random_seed(0)
    _, labels = load_digits_arrays()
    x = digits_images(32, 32)
    x_train, y_train, x_test = x[:1000], labels[:1000], x[1200:1500]
    model, _ = keffconvert.convert(mbconv_cnn(classes=10, name="digits_cnn"), 8)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=6, batch_size=32, verbose=0)
    return model, x_train, x_test


@pytest.fixture(scope="module")
def trained_float_size(trained_digits):
    """The float32 TFLite file's size of the trained model, converted once for both int8 modes."""
    return len(to_tflite(trained_digits[0]))


@pytest.mark.parametrize("per_channel", [True, False])
def test_tflite_int8_agrees_with_float_model(trained_digits, trained_float_size, per_channel):
    model, x_train, x_test = trained_digits
    content = to_tflite(model, int8=True, calibration=x_train[:64], per_channel=per_channel)
    float_size = trained_float_size
    got, want = predict(content, x_test), model.predict(x_test, verbose=0)
    agreement = float(np.mean(got.argmax(1) == want.argmax(1)))
    print(f"int8 per_channel={per_channel}: top-1 agreement {agreement:.3f} on {len(x_test)} held-out digits, "
          f"file {len(content):,} bytes vs float32 {float_size:,}")
    assert agreement >= 0.8
    assert len(content) < (0.7 if per_channel else 0.5) * float_size  # tiny model: metadata weighs a lot


# -- CLI ----------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli, ["export", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def model_file(converted, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "keff.keras"
    converted.save(path)
    return path


def test_cli_writes_each_format_and_checks_it(model_file, tmp_path):
    for fmt, out in [("keras", tmp_path / "m.keras"), ("tflite", tmp_path / "m.tflite"),
                     ("saved_model", tmp_path / "m_saved")]:
        result = run(model_file, "--format", fmt, "-o", out)
        assert result.exit_code == 0, result.output
        assert out.exists() and f"wrote {out}" in result.output
        line = [l for l in result.output.splitlines() if l.startswith("check on")][0]
        assert float(line.split("max |difference| ")[1].split(",")[0]) < ATOL, line
    assert (tmp_path / "m_saved" / "saved_model.pb").exists()
    assert not list(tmp_path.glob(".m*")), "no temporary file is left behind"


INT8_CHECK = re.compile(r"^check on (\d+) calibration images: max \|difference\| (\S+), "
                        r"top-1 agreement (\d+\.\d)%", re.M)


def int8_check(output):
    """(images, max |difference|, top-1 agreement as a share) from the export's check line."""
    match = INT8_CHECK.search(output)
    assert match, output
    return int(match[1]), float(match[2]), float(match[3]) / 100


def test_cli_int8_with_digits_calibration_and_default_name(model_file, tmp_path):
    # On these 16 digits the float model's top two softmax outputs are 0.045 to 0.059 apart, and
    # int8 moves the outputs by about 0.003 (2.4e-3 per channel, 2.9e-3 per tensor, measured), so
    # every top-1 must survive quantisation; a 0.02 bound leaves room and still catches a broken one.
    result = run(model_file, "--int8", "--calibration", "digits", "--calibration-samples", "16")
    assert result.exit_code == 0, result.output
    out = model_file.with_name("keff_int8.tflite")
    assert out.exists()
    samples, max_diff, agreement = int8_check(result.output)
    assert samples == 16 and max_diff < 0.02 and agreement >= 0.9375, result.output  # at most 1 of 16 flips
    small = tmp_path / "per_tensor.tflite"
    result = run(model_file, "--int8", "--per-tensor", "--calibration", "digits", "--calibration-samples", "16",
                 "-o", small)
    assert result.exit_code == 0, result.output
    samples, max_diff, agreement = int8_check(result.output)
    assert samples == 16 and max_diff < 0.02 and agreement >= 0.9375, result.output
    assert small.stat().st_size < out.stat().st_size


def test_cli_mistakes_are_one_line_each(model_file, tmp_path):
    result = run(model_file, "--int8")
    assert result.exit_code == 2 and "--calibration" in result.output
    result = run(model_file, "--format", "keras", "--int8", "--calibration", "digits")
    assert result.exit_code == 2 and "tflite only" in result.output
    result = run(model_file, "--per-tensor")
    assert result.exit_code == 2 and "--int8 only" in result.output
    out = tmp_path / "exists.tflite"
    out.write_bytes(b"keep me")
    result = run(model_file, "-o", out)
    assert result.exit_code == 5 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    result = run(tmp_path / "missing.keras")
    assert result.exit_code == 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 8, 8, 3), "float32"))
    result = run(model_file, "--int8", "--calibration", bad, "-o", tmp_path / "q.tflite")
    assert result.exit_code == 6 and "shape" in result.output
