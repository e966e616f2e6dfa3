"""tf.keras 2.x `.h5` files, which Keras 3 cannot load: translate the config, build, assign weights by name.

Their layer configs carry keyword arguments that Keras 3 constructors no longer take
(`DepthwiseConv2D(groups=1)`) or spell differently (`InputLayer(batch_input_shape=...)`,
`BatchNormalization(axis=[3])`, single outputs written as one-element lists), and a nested model
keeps its weights in one h5 group, all trainable weights first and then all non-trainable ones,
while Keras 3 assigns them layer by layer in its own order. So the config is translated
generically (by the Keras 3 class's constructor signature, recursively through nested models),
the model built from it, and every saved weight assigned BY NAME (layer name, weight name).
"""

from __future__ import annotations

import inspect
import json
import logging

import keras

from keffconvert.errors import InputError
from keffconvert.graph.model_info import leaf_layers
from keffconvert.layers import custom_objects
from keffconvert.loading.failures import KERAS_LOAD_ERRORS, load_failure, one_line

log = logging.getLogger(__name__)

MODEL_CLASSES = ("Functional", "Model", "Sequential")


def load_legacy_h5(f, config, path, unsafe):
    try:
        changes = translate_legacy_config(config)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"{path}: malformed model config: {one_line(exc)}") from exc
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
        if entry.get("class_name") in MODEL_CLASSES:
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
    if config.get("class_name") in MODEL_CLASSES and isinstance(inner, dict):
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
    except KERAS_LOAD_ERRORS as exc:
        raise load_failure(path, exc, "cannot rebuild the tf.keras 2.x model in Keras 3") from exc


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


def attr_text(obj, name):
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


def parse_json(text, path):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: the model config is not valid JSON: {one_line(exc)}") from exc
