"""keffconvert.loading: legacy tf.keras 2.x .h5 files, Keras 3 files, built-in names, bad inputs."""

import hashlib
import json
import shutil
import re
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from keffconvert.errors import InputError, UnsupportedModelError
from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels
from keffconvert.loading import BUILTIN_MODELS, is_model_path, load_model, translate_legacy_config

LEGACY_DIR = Path(__file__).resolve().parent / "fixtures" / "legacy"
LEGACY_FILES = sorted(LEGACY_DIR.glob("*.h5"))
TINY_LEGACY = LEGACY_DIR / "tiny_effnet_tf2151.h5"


def _fingerprint(path):
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_error(excinfo, path_text):
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert path_text in message
    return message


def _small_model(extra_layer=None):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    if extra_layer is not None:
        x = extra_layer(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="dense")(x)
    return keras.Model(inputs, outputs, name="small")


def _inputs(shape=(8, 8, 3), n=2, seed=0):
    return np.random.RandomState(seed).rand(n, *shape).astype("float32")


def _write_legacy_h5(path, model_config, layer_weights):
    """An .h5 laid out as tf.keras 2.x writes it: config attr plus model_weights by layer."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config)
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [name.encode() for name in layer_weights]
        for layer_name, weights in layer_weights.items():
            layer_group = group.create_group(layer_name)
            layer_group.attrs["weight_names"] = [f"{layer_name}/{w}:0".encode() for w, _ in weights]
            for weight_name, value in weights:
                layer_group.create_dataset(f"{layer_name}/{weight_name}:0", data=value)


def _legacy_layer(class_name, name, inbound, **config):
    return {
        "class_name": class_name,
        "config": {"name": name, "trainable": True, "dtype": "float32", **config},
        "name": name,
        "inbound_nodes": [[[inbound, 0, 0, {}]]] if inbound else [],
    }


def _kcai_legacy_config(extra_layers=()):
    """A K-CAI-style tf.keras 2.x config: grouped 1x1 conv, then InterleaveChannels(step_size)."""
    layers = [
        {"class_name": "InputLayer", "name": "input_1", "inbound_nodes": [],
         "config": {"batch_input_shape": [None, 4, 4, 4], "dtype": "float32", "sparse": False,
                    "ragged": False, "name": "input_1"}},
        _legacy_layer("Conv2D", "conv", "input_1", filters=4, kernel_size=[1, 1], strides=[1, 1],
                      padding="valid", data_format="channels_last", dilation_rate=[1, 1],
                      groups=2, activation="linear", use_bias=False),
        _legacy_layer("InterleaveChannels", "interleave", "conv", step_size=2),
        _legacy_layer("GlobalAveragePooling2D", "pool", "interleave",
                      data_format="channels_last", keepdims=False),
    ]
    last = "pool"
    for layer in extra_layers:
        layer["inbound_nodes"] = [[[last, 0, 0, {}]]]
        layers.append(layer)
        last = layer["name"]
    layers.append(_legacy_layer("Dense", "dense", last, units=3, activation="linear",
                                use_bias=True))
    return {"class_name": "Functional", "config": {
        "name": "kcai", "trainable": True, "layers": layers,
        "input_layers": [["input_1", 0, 0]], "output_layers": [["dense", 0, 0]]}}


def _kcai_weights(seed=1):
    rng = np.random.RandomState(seed)
    return {
        "conv": [("kernel", rng.randn(1, 1, 2, 4).astype("float32"))],
        "dense": [("kernel", rng.randn(4, 3).astype("float32")),
                  ("bias", rng.randn(3).astype("float32"))],
    }


def _kcai_reference(weights, x):
    """The same network built directly from keffconvert's layers."""
    inputs = keras.Input((4, 4, 4))
    y = GroupedPointwiseConv2D(4, groups=2, use_bias=False, name="conv")(inputs)
    y = InterleaveChannels(2)(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    y = keras.layers.Dense(3, name="dense")(y)
    model = keras.Model(inputs, y)
    model.get_layer("conv").set_weights([w for _, w in weights["conv"]])
    model.get_layer("dense").set_weights([w for _, w in weights["dense"]])
    return model.predict(x, verbose=0)


# --- legacy tf.keras 2.x fixtures ------------------------------------------------------------


@pytest.mark.parametrize("path", LEGACY_FILES, ids=lambda p: p.name)
def test_legacy_fixture_predicts_reference(path):
    before = _fingerprint(path)
    reference = np.load(path.with_suffix(".npz"))
    model = load_model(str(path))
    y = model.predict(reference["x"], verbose=0)
    np.testing.assert_allclose(y, reference["y"], atol=1e-5, rtol=0)
    assert _fingerprint(path) == before


def test_legacy_fixtures_exist():
    """The committed fixtures, in the repository (a lone clone has them), each with its reference."""
    names = {p.name for p in LEGACY_FILES}
    assert {"tiny_effnet_tf2121.h5", "tiny_effnet_tf2151.h5", "b0_transfer_tf2151.h5"} <= names, \
        f"legacy fixtures missing in {LEGACY_DIR}"
    assert LEGACY_DIR.resolve().is_relative_to(Path(__file__).resolve().parent)
    for path in LEGACY_FILES:
        assert path.with_suffix(".npz").is_file(), path


def test_translation_records_dropped_and_renamed_keys():
    with h5py.File(TINY_LEGACY, "r") as f:
        config = json.loads(f.attrs["model_config"])
    changes = translate_legacy_config(config)
    assert "DepthwiseConv2D b1_dwconv: dropped groups=1" in changes
    assert "InputLayer input_1: batch_input_shape -> batch_shape" in changes
    assert "BatchNormalization stem_bn: axis=[3] -> 3" in changes


def test_translation_of_mixed_precision_policy_and_unknown_kwargs():
    layer = _legacy_layer("Dense", "head", None, units=3, renorm=True,
                          dtype={"class_name": "Policy", "config": {"name": "mixed_float16"}})
    changes = translate_legacy_config(layer)
    assert layer["config"]["dtype"] == "mixed_float16"
    assert "renorm" not in layer["config"] and "Dense head: dropped renorm=True" in changes
    dense = keras.layers.Dense.from_config(layer["config"])
    assert dense.dtype_policy.name == "mixed_float16"


def test_legacy_kcai_interleave_by_plain_class_name(tmp_path):
    path = tmp_path / "kcai.h5"
    weights = _kcai_weights()
    _write_legacy_h5(path, _kcai_legacy_config(), weights)
    model = load_model(str(path))
    assert isinstance(model.get_layer("interleave"), InterleaveChannels)
    assert model.get_layer("interleave").step_size == 2
    x = _inputs((4, 4, 4))
    np.testing.assert_allclose(model.predict(x, verbose=0), _kcai_reference(weights, x),
                               atol=1e-5)


def test_legacy_saved_weight_without_home_is_input_error(tmp_path):
    path = tmp_path / "extra.h5"
    weights = _kcai_weights()
    weights["dense"].append(("surplus", np.zeros(3, "float32")))
    _write_legacy_h5(path, _kcai_legacy_config(), weights)
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    assert "dense" in _assert_one_line_error(excinfo, str(path))


def test_legacy_shape_mismatch_is_input_error(tmp_path):
    path = tmp_path / "shape.h5"
    weights = _kcai_weights()
    weights["dense"][1] = ("bias", np.zeros(5, "float32"))
    _write_legacy_h5(path, _kcai_legacy_config(), weights)
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    assert "shape" in _assert_one_line_error(excinfo, str(path))


def test_legacy_missing_weight_is_input_error(tmp_path):
    path = tmp_path / "missing.h5"
    weights = _kcai_weights()
    del weights["conv"]
    _write_legacy_h5(path, _kcai_legacy_config(), weights)
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    assert "no saved value" in _assert_one_line_error(excinfo, str(path))


def test_legacy_lambda_refused_unless_unsafe(tmp_path):
    from keras.src.utils.python_utils import func_dump

    code, defaults, closure = func_dump(lambda t: t * 2.0)
    lam = _legacy_layer("Lambda", "double", None, function=[code, defaults, closure],
                        function_type="lambda", module="__main__", output_shape=None,
                        output_shape_type="raw", output_shape_module=None, arguments={})
    path = tmp_path / "lambda_legacy.h5"
    weights = _kcai_weights()
    _write_legacy_h5(path, _kcai_legacy_config([lam]), weights)
    with pytest.raises(UnsupportedModelError) as excinfo:
        load_model(str(path))
    assert "--unsafe" in _assert_one_line_error(excinfo, str(path))
    model = load_model(str(path), unsafe=True)
    x = _inputs((4, 4, 4))
    bias = weights["dense"][1][1]
    expected = 2.0 * (_kcai_reference(weights, x) - bias) + bias  # Dense after the doubling
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-4)


# --- Keras 3 files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_round_trip(tmp_path, suffix):
    model = _small_model()
    path = tmp_path / f"small{suffix}"
    model.save(path)
    before = _fingerprint(path)
    x = _inputs()
    loaded = load_model(str(path))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    assert _fingerprint(path) == before


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keffconvert_layers_round_trip(tmp_path, suffix):
    inputs = keras.Input((4, 4, 8))
    x = GroupedPointwiseConv2D(8, groups=4, name="gpw")(inputs)
    x = InterleaveChannels(4, name="shuffle")(x)
    model = keras.Model(inputs, x)
    path = tmp_path / f"keff{suffix}"
    model.save(path)
    loaded = load_model(str(path))
    assert isinstance(loaded.get_layer("gpw"), GroupedPointwiseConv2D)
    assert loaded.get_layer("shuffle").step_size == 4
    x = _inputs((4, 4, 8))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


def test_keras_file_naming_kcai_class_loads(tmp_path):
    """A .keras whose config names InterleaveChannels as K-CAI's own (unregistered) class."""
    inputs = keras.Input((4, 4, 4))
    model = keras.Model(inputs, InterleaveChannels(2, name="shuffle")(inputs))
    original = tmp_path / "orig.keras"
    model.save(original)
    path = tmp_path / "kcai.keras"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                text = data.decode().replace('"keffconvert>InterleaveChannels"',
                                             '"InterleaveChannels"')
                data = re.sub(r'"module": "keffconvert[.\w]*"', '"module": "cai.layers"', text)
            dst.writestr(item, data)
    assert "keffconvert" not in zipfile.ZipFile(path).read("config.json").decode()
    loaded = load_model(str(path))
    assert isinstance(loaded.get_layer("shuffle"), InterleaveChannels)
    x = _inputs((4, 4, 4))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_refused_unless_unsafe(tmp_path, suffix):
    model = _small_model(keras.layers.Lambda(lambda t: t * 2.0, name="double"))
    path = tmp_path / f"lambda{suffix}"
    model.save(path)
    with pytest.raises(UnsupportedModelError) as excinfo:
        load_model(str(path))
    message = _assert_one_line_error(excinfo, str(path))
    assert "--unsafe" in message and "trust" in message
    loaded = load_model(str(path), unsafe=True)
    x = _inputs()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


# --- built-in names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnetb0", "EfficientNet-B0", "mobilenet_v2"])
def test_builtin_names_build(name):
    model = load_model(name, classes=10, input_size=32)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 10)


def test_builtin_weights_file_is_passed_through(tmp_path):
    first = load_model("efficientnetb0", classes=10, input_size=32)
    path = tmp_path / "b0.weights.h5"
    first.save_weights(path)
    second = load_model("efficientnetb0", classes=10, input_size=32, weights=str(path))
    for saved, loaded in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, saved)


def test_builtin_table_covers_the_documented_names():
    expected = {f"efficientnetb{i}" for i in range(8)}
    expected |= {f"efficientnetv2-{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")}
    expected |= {"mobilenetv2", "resnet50"}
    assert set(BUILTIN_MODELS) == expected


def test_unknown_builtin_name_lists_known_names():
    with pytest.raises(InputError) as excinfo:
        load_model("efficientnetb9")
    message = _assert_one_line_error(excinfo, "efficientnetb9")
    assert "efficientnetb0" in message and "resnet50" in message


def test_builtin_bad_arguments_is_input_error():
    with pytest.raises(InputError) as excinfo:
        load_model("resnet50", input_size=8)
    _assert_one_line_error(excinfo, "resnet50")


# --- bad inputs ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    assert "no such file" in _assert_one_line_error(excinfo, str(path))


def test_directory(tmp_path):
    with pytest.raises(InputError) as excinfo:
        load_model(str(tmp_path))
    assert "directory" in _assert_one_line_error(excinfo, str(tmp_path))


def test_text_file_named_h5(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("not a model\n")
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    _assert_one_line_error(excinfo, str(path))


def test_truncated_fixture(tmp_path):
    path = tmp_path / "truncated.h5"
    data = TINY_LEGACY.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    _assert_one_line_error(excinfo, str(path))


def test_h5_without_model_config(tmp_path):
    path = tmp_path / "weights_only.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kernel", data=np.zeros(3))
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    assert "no model config" in _assert_one_line_error(excinfo, str(path))


@pytest.mark.parametrize("member", ["notes.txt", "config.json"])
def test_keras_zip_that_is_not_a_model(tmp_path, member):
    path = tmp_path / "junk.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, "{not json" if member == "config.json" else "hello")
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    _assert_one_line_error(excinfo, str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "model.pb"
    shutil.copy(TINY_LEGACY, path)
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    assert "unsupported" in _assert_one_line_error(excinfo, str(path))


# --- damaged files: Keras' own errors become one line, a bug stays a bug -----------------------


def _rewrite_keras_zip(source, target, config=None, weights=None):
    """A copy of the .keras file `source` with its config.json and/or model.weights.h5 replaced."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json" and config is not None:
                data = config if isinstance(config, str) else json.dumps(config)
            if item.filename == "model.weights.h5" and weights is not None:
                data = weights
            dst.writestr(item, data)


def _layer_config(config, name):
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def _unknown_class(config):
    _layer_config(config, "conv")["class_name"] = "NoSuchLayer"


def _bad_argument(config):
    _layer_config(config, "conv")["config"]["filters"] = "eight"


def _unknown_argument(config):
    _layer_config(config, "conv")["config"]["no_such_argument"] = 1


def _missing_input(config):
    _layer_config(config, "bn")["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0] = "nowhere"


def _weights_of_other_shape(config):
    _layer_config(config, "dense")["config"]["units"] = 5


KERAS_DAMAGE = {  # name: (config change, weights change)
    "config is a list": (lambda c: "[]", None),
    "config is a number": (lambda c: "3", None),
    "unknown layer class": (_unknown_class, None),
    "bad constructor argument": (_bad_argument, None),
    "unknown constructor argument": (_unknown_argument, None),
    "graph names a missing layer": (_missing_input, None),
    "weights of another shape": (_weights_of_other_shape, None),
    "weights not HDF5": (None, lambda w: b"garbage"),
    "weights truncated": (None, lambda w: w[: len(w) // 2]),
}


@pytest.mark.parametrize("damage", KERAS_DAMAGE)
def test_damaged_keras_file_is_one_line_input_error(tmp_path, damage):
    change_config, change_weights = KERAS_DAMAGE[damage]
    good = tmp_path / "good.keras"
    _small_model().save(good)
    with zipfile.ZipFile(good) as archive:
        config, weights = json.loads(archive.read("config.json")), archive.read("model.weights.h5")
    if change_config is not None:
        config = change_config(config) or config
    path = tmp_path / "damaged.keras"
    _rewrite_keras_zip(good, path, config=config, weights=change_weights(weights) if change_weights else None)
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    _assert_one_line_error(excinfo, str(path))


def _drop_weights_group(f):
    del f["model_weights"]


def _drop_one_layers_weights(f):
    del f["model_weights"]["dense"]


def _unknown_model_class(f):
    f.attrs["model_config"] = json.dumps({"class_name": "NoSuchModel", "config": {}})


def _model_config_without_layers(f):
    f.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {}})


H5_DAMAGE = {
    "no model_weights group": _drop_weights_group,
    "a layer's weights missing": _drop_one_layers_weights,
    "unknown model class": _unknown_model_class,
    "model config without layers": _model_config_without_layers,
}


@pytest.mark.parametrize("damage", H5_DAMAGE)
def test_damaged_keras3_h5_is_one_line_input_error(tmp_path, damage):
    path = tmp_path / "damaged.h5"
    _small_model().save(path)
    with h5py.File(path, "r+") as f:
        H5_DAMAGE[damage](f)
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    _assert_one_line_error(excinfo, str(path))


LEGACY_DAMAGE = {  # name: change to the model's config
    "unknown layer class": lambda config: config["layers"][1].update(class_name="NoSuchLayer"),
    "bad constructor argument": lambda config: config["layers"][1]["config"].update(filters="four"),
    "inbound layer missing": lambda config: config["layers"][2].update(inbound_nodes=[[["nowhere", 0, 0, {}]]]),
    "output index out of range": lambda config: config.update(output_layers=[["dense", 5, 0]]),
}


@pytest.mark.parametrize("damage", LEGACY_DAMAGE)
def test_damaged_legacy_config_is_one_line_input_error(tmp_path, damage):
    config = _kcai_legacy_config()
    LEGACY_DAMAGE[damage](config["config"])
    path = tmp_path / "damaged_legacy.h5"
    _write_legacy_h5(path, config, _kcai_weights())
    with pytest.raises(InputError) as excinfo:
        load_model(str(path))
    _assert_one_line_error(excinfo, str(path))


def test_a_bug_while_loading_is_not_reported_as_a_bad_file(tmp_path, monkeypatch):
    path = tmp_path / "small.keras"
    _small_model().save(path)

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a damaged file")

    monkeypatch.setattr(keras.models, "load_model", bug)
    with pytest.raises(ZeroDivisionError):
        load_model(str(path))


def test_builtin_weights_file_that_is_not_hdf5_is_input_error(tmp_path):
    path = tmp_path / "junk.weights.h5"
    path.write_text("not weights\n")
    with pytest.raises(InputError) as excinfo:
        load_model("efficientnetb0", classes=10, input_size=32, weights=str(path))
    _assert_one_line_error(excinfo, "efficientnetb0")


@pytest.mark.parametrize("error, reported", [
    (Exception("URL fetch failure on https://example.invalid/b0.h5: None -- no network"), True),  # keras.utils.get_file
    (ValueError("bad combination"), True),
    (ZeroDivisionError("a bug"), False),
])
def test_builtin_build_failures_are_input_errors_and_bugs_stay_bugs(monkeypatch, error, reported):
    def build(**kwargs):
        raise error

    monkeypatch.setitem(BUILTIN_MODELS, "efficientnetb0", build)
    with pytest.raises(InputError if reported else type(error)) as excinfo:
        load_model("efficientnetb0", classes=10)
    if reported:
        assert str(error).split(":")[0] in _assert_one_line_error(excinfo, "efficientnetb0")


@pytest.mark.parametrize("source, is_path", [
    ("efficientnetb0", False), ("EfficientNet-B0", False), ("model.keras", True), ("MODEL.H5", True),
    ("old.hdf5", True), ("runs/efficientnetb0", True), ("missing/model", True),
])
def test_model_path_rule(source, is_path):
    assert is_model_path(source) is is_path
