"""Load the model to convert: a `.keras` / `.h5` file, or a built-in `keras.applications` name.

Why there is a legacy path: most users' `model.h5` files were written by tf.keras 2.x
(TensorFlow 2.4 to 2.15), and Keras 3's own `keras.models.load_model` refuses them (see
METHOD.md, "Facts measured"):

* their layer configs carry keyword arguments that Keras 3 constructors no longer take
  (`DepthwiseConv2D(groups=1)`) or spell differently (`InputLayer(batch_input_shape=...)`,
  `BatchNormalization(axis=[3])`, single outputs written as one-element lists);
* a nested model (the usual `Sequential([EfficientNetB0 base, pooling, dropout, Dense])`) keeps
  its weights in one h5 group, all trainable weights first and then all non-trainable ones,
  while Keras 3 assigns them layer by layer in its own order, so batch-norm statistics land in
  the wrong variables.

So for such files this module translates the config generically (by the Keras 3 class's
constructor signature, recursively through nested models), builds the model from it, and
assigns every saved weight BY NAME (layer name, weight name). Files written by Keras 3 go
through `keras.models.load_model` unchanged.

Every failure a user can cause becomes a one-line `InputError` or `UnsupportedModelError`
naming the path; the input file is only ever opened read-only.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import zipfile
from pathlib import Path

import h5py
import keras

from keffconvert.errors import InputError, UnsupportedModelError
from keffconvert.layers import custom_objects
from keffconvert.model_info import leaf_layers

__all__ = ["BUILTIN_MODELS", "MODEL_SUFFIXES", "is_model_path", "load_model", "translate_legacy_config"]

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "efficientnetb0": keras.applications.EfficientNetB0,
    "efficientnetb1": keras.applications.EfficientNetB1,
    "efficientnetb2": keras.applications.EfficientNetB2,
    "efficientnetb3": keras.applications.EfficientNetB3,
    "efficientnetb4": keras.applications.EfficientNetB4,
    "efficientnetb5": keras.applications.EfficientNetB5,
    "efficientnetb6": keras.applications.EfficientNetB6,
    "efficientnetb7": keras.applications.EfficientNetB7,
    "efficientnetv2-b0": keras.applications.EfficientNetV2B0,
    "efficientnetv2-b1": keras.applications.EfficientNetV2B1,
    "efficientnetv2-b2": keras.applications.EfficientNetV2B2,
    "efficientnetv2-b3": keras.applications.EfficientNetV2B3,
    "efficientnetv2-s": keras.applications.EfficientNetV2S,
    "efficientnetv2-m": keras.applications.EfficientNetV2M,
    "efficientnetv2-l": keras.applications.EfficientNetV2L,
    "mobilenetv2": keras.applications.MobileNetV2,
    "resnet50": keras.applications.ResNet50,
}

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_H5_SUFFIXES = (".h5", ".hdf5")
_MODEL_CLASSES = ("Functional", "Model", "Sequential")
_MAX_DETAIL = 200  # characters of an underlying error kept in our one-line message
_UNSAFE_HINT = "pass --unsafe only for files you trust"

# What Keras 3.15 raises for a file it cannot turn into a model (each seen on a damaged file or
# config: tests/test_loading.py has the cases): an unknown class or bad constructor argument
# (TypeError, ValueError), a config of the wrong structure (KeyError, IndexError, AttributeError,
# TypeError), a graph naming a layer that is not there (RuntimeError, ValueError), unreadable
# weights (h5py's OSError, KeyError, RuntimeError; zipfile.BadZipFile), a Lambda whose marshalled
# code is damaged (EOFError, ValueError). Anything else is a bug and is reported as one.
_KERAS_LOAD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OSError,
                      EOFError, zipfile.BadZipFile)


def load_model(
    source: str,
    *,
    unsafe: bool = False,
    classes: int | None = None,
    input_size: int | None = None,
    weights: str | None = None,
) -> keras.Model:
    """Return the Keras model in file `source`, or the built-in model named `source`.

    An existing path wins over a built-in name; a name ending in .keras/.h5/.hdf5 or holding
    a path separator is always treated as a path (`is_model_path`).

    `unsafe` allows Lambda layers (arbitrary code in the file). `classes`, `input_size` (side
    of a square RGB input) and `weights` apply to built-in names only.
    """
    source = os.fspath(source)
    if is_model_path(source):
        return _load_file(Path(source), unsafe)
    name = _builtin_key(source)
    if name is None:
        raise InputError(
            f"{source}: no such file, and not a built-in model name "
            f"(known: {', '.join(BUILTIN_MODELS)})"
        )
    return _build_builtin(name, classes=classes, input_size=input_size, weights=weights)


# ---------------------------------------------------------------------------------------------
# Built-in names


def is_model_path(source):
    """Whether `source` names a model file rather than a built-in model: an existing path, or a
    name ending in .keras/.h5/.hdf5, or one holding a path separator (even if it does not exist,
    so a mistyped path is reported as a missing file, not as an unknown model name)."""
    source = os.fspath(source)
    return (os.path.exists(source) or source.lower().endswith(MODEL_SUFFIXES)
            or os.sep in source or "/" in source)


def _builtin_key(source):
    """The BUILTIN_MODELS key for a spelling like 'EfficientNet-B0' or 'efficientnet_b0'."""
    compact = source.strip().lower().replace("-", "").replace("_", "")
    for key in BUILTIN_MODELS:
        if key.replace("-", "") == compact:
            return key
    return None


def _build_builtin(name, *, classes, input_size, weights):
    kwargs = {"weights": weights, "classes": 1000 if classes is None else int(classes)}
    if input_size is not None:
        kwargs["input_shape"] = (int(input_size), int(input_size), 3)
    try:
        return BUILTIN_MODELS[name](**kwargs)
    except Exception as exc:
        # Keras raises ValueError for a bad size/classes/weights combination, h5py an OSError for
        # an unreadable weights file, and keras.utils.get_file (Keras 3.15) a bare
        # Exception("URL fetch failure on ...") when the weights cannot be downloaded. Anything
        # else is a bug, reported as one.
        if not isinstance(exc, (ValueError, OSError)) and type(exc) is not Exception:
            raise
        raise InputError(f"{name}: cannot build the built-in model: {_one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------
# Files


def _load_file(path, unsafe):
    _check_is_readable_file(path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return _load_keras_zip(path, unsafe)
    if suffix in _H5_SUFFIXES:
        return _load_h5(path, unsafe)
    raise InputError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
        f"expected one of {', '.join(MODEL_SUFFIXES)}"
    )


def _check_is_readable_file(path):
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(
            f"{path}: is a directory, not a model file (SavedModel directories are not "
            f"supported; save the model as .keras or .h5)"
        )
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")


def _load_keras_zip(path, unsafe):
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a Keras .keras file (not a zip archive)")
    try:
        with zipfile.ZipFile(path, "r") as archive:
            config = json.loads(archive.read("config.json"))
    except KeyError:
        raise InputError(f"{path}: not a Keras .keras file (no config.json inside)") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable .keras file: {_one_line(exc)}") from exc
    _refuse_lambda(config, path, unsafe)
    return _keras_load(path, unsafe)


def _load_h5(path, unsafe):
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 file (corrupt, or not a Keras .h5 model)")
    try:
        with h5py.File(path, "r") as f:
            version = _attr_text(f, "keras_version")
            config_text = _attr_text(f, "model_config")
            if config_text is None:
                raise InputError(
                    f"{path}: no model config in this HDF5 file (a weights-only file, or not "
                    f"a Keras model)"
                )
            config = _parse_json(config_text, path)
            _refuse_lambda(config, path, unsafe)
            if version is None or not version.startswith("3."):
                return _load_legacy_h5(f, config, path, unsafe)
    except (OSError, KeyError, RuntimeError) as exc:  # h5py's errors for truncated/corrupt data
        raise InputError(f"{path}: unreadable HDF5 file: {_one_line(exc)}") from exc
    return _keras_load(path, unsafe)


def _keras_load(path, unsafe):
    """Keras 3's own loader, for files Keras 3 wrote; its errors become one line."""
    try:
        return keras.models.load_model(
            path, safe_mode=not unsafe, custom_objects=custom_objects(), compile=False
        )
    except _KERAS_LOAD_ERRORS as exc:
        raise _load_failure(path, exc, "cannot load the Keras model") from exc


def _refuse_lambda(config, path, unsafe):
    """Mirror Keras safe mode: a Lambda layer is code that runs on load."""
    if unsafe:
        return
    names = [entry["config"].get("name", "?") for entry in _dicts_in(config)
             if entry.get("class_name") == "Lambda" and isinstance(entry.get("config"), dict)]
    if names:
        raise UnsupportedModelError(
            f"{path}: the model contains Lambda layer(s) {', '.join(names)}, which run "
            f"arbitrary Python code when loaded; {_UNSAFE_HINT}"
        )


def _dicts_in(tree):
    """Every dict in a JSON tree (so wrapped layers, e.g. TimeDistributed(Lambda), count too)."""
    if isinstance(tree, dict):
        yield tree
        for value in tree.values():
            yield from _dicts_in(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _dicts_in(value)


def _load_failure(path, exc, what):
    """The one-line error for an exception Keras raised while loading `path`."""
    if "safe_mode" in str(exc) or "unsafe_deserialization" in str(exc):
        return UnsupportedModelError(
            f"{path}: the model contains code Keras will not load in safe mode; {_UNSAFE_HINT}"
        )
    return InputError(f"{path}: {what}: {_one_line(exc)}")


# ---------------------------------------------------------------------------------------------
# tf.keras 2.x .h5 files: translate the config, build, assign weights by name


def _load_legacy_h5(f, config, path, unsafe):
    try:
        changes = translate_legacy_config(config)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"{path}: malformed model config: {_one_line(exc)}") from exc
    if changes:
        log.info("%s: translated the tf.keras 2.x config: %s", path, "; ".join(changes))
    model = _build_from_config(config, path, unsafe)
    if "model_weights" not in f:
        raise InputError(f"{path}: no model_weights group in this HDF5 file")
    _assign_weights_by_name(f["model_weights"], model, path)
    return model


def translate_legacy_config(config):
    """Rewrite a tf.keras 2.x model config in place so Keras 3 can build it.

    Returns the changes made, one string each (e.g. "DepthwiseConv2D b1_dwconv: dropped
    groups=1"), for logging.
    """
    changes = []
    for entry in _layer_entries(config):
        if entry.get("class_name") in _MODEL_CLASSES:
            _translate_model_entry(entry, changes)
        else:
            _translate_layer_entry(entry, changes)
    return changes


def _layer_entries(config):
    """Every layer entry (dict with class_name/config) of a model config, nested models too."""
    if not isinstance(config, dict):
        return
    yield config
    inner = config.get("config")
    if config.get("class_name") in _MODEL_CLASSES and isinstance(inner, dict):
        for layer in inner.get("layers", []):
            yield from _layer_entries(layer)


def _translate_model_entry(entry, changes):
    """Name nested models by their public Keras 3 class; unwrap tf.keras's one-element io lists."""
    entry["class_name"] = "Sequential" if entry["class_name"] == "Sequential" else "Model"
    entry["module"] = "keras"
    entry.pop("registered_name", None)
    config = entry["config"]
    for key in ("input_layers", "output_layers"):
        value = config.get(key)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
            config[key] = value[0]
            changes.append(f"{config.get('name')}: single {key[:-7]} written as a list")


def _translate_layer_entry(entry, changes):
    cls = _resolve_class(entry["class_name"])
    config = entry["config"]
    label = f"{entry['class_name']} {config.get('name', '?')}"
    for note in _rename_legacy_keys(entry["class_name"], cls, config):
        changes.append(f"{label}: {note}")
    if cls is None:
        return  # unknown class: Keras reports it when building
    accepted = _accepted_kwargs(cls)
    if accepted is None:
        return  # the constructor takes any **kwargs itself
    for key in [k for k in config if k not in accepted]:
        changes.append(f"{label}: dropped {key}={config.pop(key)!r}")


def _rename_legacy_keys(class_name, cls, config):
    """Keys Keras 3 spells differently; yields a note for each one changed."""
    shape = config.pop("batch_input_shape", None)
    if shape is not None:
        if class_name == "InputLayer":
            config["batch_shape"] = shape
            yield "batch_input_shape -> batch_shape"
        else:
            config["input_shape"] = shape[1:]
            yield "batch_input_shape -> input_shape"
    axis = config.get("axis")
    if isinstance(axis, list) and len(axis) == 1 and _default_is_int(cls, "axis"):
        config["axis"] = axis[0]
        yield f"axis={axis} -> {axis[0]}"
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":
        config["dtype"] = dtype["config"]["name"]  # tf.keras mixed precision policy
        yield f"dtype=Policy({config['dtype']}) -> {config['dtype']!r}"
    function = config.get("function")
    if class_name == "Lambda" and isinstance(function, list):
        code, defaults, closure = (list(function) + [None, None])[:3]
        config["function"] = {
            "class_name": "__lambda__",
            "config": {"code": code, "defaults": defaults, "closure": closure},
        }
        yield "function (marshalled list) -> __lambda__"


def _resolve_class(class_name):
    known = custom_objects()
    if class_name in known:
        return known[class_name]
    registered = keras.saving.get_registered_object(class_name)
    if registered is not None:
        return registered
    cls = getattr(keras.layers, class_name, None)
    return cls if isinstance(cls, type) else None


def _accepted_kwargs(cls):
    """Keyword arguments `cls(**kwargs)` accepts, or None if it accepts anything.

    Walks the MRO while each `__init__` forwards `**kwargs` to its parent; `Layer` itself
    also takes `input_shape`/`input_dim` through `**kwargs`.
    """
    accepted = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        accepted |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        if klass is keras.layers.Layer:
            accepted |= {"input_shape", "input_dim"}
            break
    else:
        return None
    accepted.discard("self")
    return accepted


def _default_is_int(cls, argument):
    if cls is None:
        return False
    parameter = inspect.signature(cls.__init__).parameters.get(argument)
    return parameter is not None and isinstance(parameter.default, int)


def _build_from_config(config, path, unsafe):
    try:
        return keras.saving.deserialize_keras_object(
            config, custom_objects=custom_objects(), safe_mode=not unsafe
        )
    except _KERAS_LOAD_ERRORS as exc:
        raise _load_failure(path, exc, "cannot rebuild the tf.keras 2.x model in Keras 3") from exc


def _assign_weights_by_name(weights_group, model, path):
    """Give every model variable its saved value, matched by layer and weight name."""
    unassigned = {id(v): v for v in model.weights}
    for group_name in _attr_list(weights_group, "layer_names"):
        group = weights_group[group_name]
        saved = [(name, group[name][()]) for name in _attr_list(group, "weight_names")]
        if not saved:
            continue
        owner = _owner_layer(model, group_name, path)
        pairs = _match_saved_to_variables(saved, _named_variables(owner), group_name, path)
        for variable, name, value in pairs:
            if tuple(variable.shape) != value.shape:
                raise InputError(
                    f"{path}: saved weight {group_name}/{name} has shape {value.shape}, "
                    f"the model expects {tuple(variable.shape)}"
                )
            variable.assign(value.astype(variable.dtype))
            unassigned.pop(id(variable), None)
    if unassigned:
        names = ", ".join(v.path for v in list(unassigned.values())[:5])
        raise InputError(
            f"{path}: {len(unassigned)} model weight(s) have no saved value (e.g. {names})"
        )


def _owner_layer(model, group_name, path):
    if group_name == "top_level_model_weights":
        return model
    try:
        return model.get_layer(group_name)
    except ValueError:
        raise InputError(
            f"{path}: saved weights for layer {group_name!r}, which the model does not have"
        ) from None


def _named_variables(layer):
    """(variable, keys) for each weight of `layer`, nested models' layers included.

    Keys a saved name like 'block1a_bn/gamma' can match: '<owning layer>/<weight>' and the
    variable's path (which may have model-name prefixes, e.g. 'sequential/dense/kernel').
    """
    owners = {}
    for sub in leaf_layers(layer):
        for variable in sub.weights:
            owners.setdefault(id(variable), sub)
    result = []
    for variable in layer.weights:
        sub = owners.get(id(variable), layer)
        result.append((variable, (f"{sub.name}/{variable.name}", variable.path)))
    return result


def _match_saved_to_variables(saved, variables, group_name, path):
    """Pair each saved (name, value) with a variable: by name, else by order within its layer."""
    pairs, unmatched = [], []
    free = {id(v): (v, keys) for v, keys in variables}  # not yet given a saved value
    for name, value in saved:
        variable = _find_by_name(_strip_suffix(name), free.values())
        if variable is None:
            unmatched.append((name, value))
        else:
            del free[id(variable)]
            pairs.append((variable, name, value))
    for layer_name, layer_saved in _group_by_layer(unmatched).items():
        pairs += _match_by_order(layer_name, layer_saved, free, group_name, path)
    return pairs


def _find_by_name(name, candidates):
    """The one candidate whose key equals `name`, else whose path ends with '/name'."""
    exact = [v for v, keys in candidates if name in keys]
    if len(exact) == 1:
        return exact[0]
    suffix = [v for v, keys in candidates if keys[1].endswith("/" + name)]
    return suffix[0] if len(suffix) == 1 else None


def _group_by_layer(saved):
    """{'b1_dwconv': [('b1_dwconv/depthwise_kernel:0', value)], ...}, in saved order."""
    groups = {}
    for name, value in saved:
        groups.setdefault(_strip_suffix(name).rpartition("/")[0], []).append((name, value))
    return groups


def _match_by_order(layer_name, saved, free, group_name, path):
    """Weights Keras 3 renamed (DepthwiseConv2D's depthwise_kernel is now kernel): pair the
    layer's saved weights with its still-unassigned variables in tf.keras's order (trainable
    first), only when they line up one to one in count and shape."""
    mine = [v for v, keys in free.values() if _owned_by(keys, layer_name)]
    mine = [v for v in mine if v.trainable] + [v for v in mine if not v.trainable]
    if len(mine) != len(saved) or any(
        tuple(v.shape) != value.shape for v, (_, value) in zip(mine, saved)
    ):
        names = ", ".join(name for name, _ in saved[:5])
        raise InputError(
            f"{path}: saved weight(s) in group {group_name!r} match no model weight: {names}"
        )
    for variable in mine:
        del free[id(variable)]
    return [(v, name, value) for v, (name, value) in zip(mine, saved)]


def _owned_by(keys, layer_name):
    """Whether a variable's keys ('<layer>/<weight>', path) place it in layer `layer_name`."""
    owner, parent = keys[0].rpartition("/")[0], keys[1].rpartition("/")[0]
    return layer_name in (owner, parent) or parent.endswith("/" + layer_name)


def _strip_suffix(weight_name):
    """'block1a_bn/gamma:0' -> 'block1a_bn/gamma' (TF variable names end in ':<index>')."""
    head, sep, tail = weight_name.rpartition(":")
    return head if sep and tail.isdigit() else weight_name


# ---------------------------------------------------------------------------------------------
# Small helpers


def _attr_text(obj, name):
    value = obj.attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return None if value is None else str(value)


def _attr_list(group, name):
    """A string-list attribute; h5 files split long ones into name0, name1, ... chunks."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values += list(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _parse_json(text, path):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: the model config is not valid JSON: {_one_line(exc)}") from exc


def _one_line(exc):
    """The first line of an exception's message, shortened: never a traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3] + "..."
    return text
