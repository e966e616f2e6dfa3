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

import json
import os
import zipfile
from pathlib import Path

import h5py
import keras

from keffconvert.errors import InputError, UnsupportedModelError
from keffconvert.layers import custom_objects
from keffconvert.loading.builtin import BUILTIN_MODELS, build_builtin, builtin_key
from keffconvert.loading.failures import KERAS_LOAD_ERRORS, UNSAFE_HINT, load_failure, one_line
from keffconvert.loading.legacy_h5 import attr_text, load_legacy_h5, parse_json

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


_H5_SUFFIXES = (".h5", ".hdf5")


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
    name = builtin_key(source)
    if name is None:
        raise InputError(
            f"{source}: no such file, and not a built-in model name "
            f"(known: {', '.join(BUILTIN_MODELS)})"
        )
    return build_builtin(name, classes=classes, input_size=input_size, weights=weights)


def is_model_path(source):
    """Whether `source` names a model file rather than a built-in model: an existing path, or a
    name ending in .keras/.h5/.hdf5, or one holding a path separator (even if it does not exist,
    so a mistyped path is reported as a missing file, not as an unknown model name)."""
    source = os.fspath(source)
    return (os.path.exists(source) or source.lower().endswith(MODEL_SUFFIXES)
            or os.sep in source or "/" in source)


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
        raise InputError(f"{path}: unreadable .keras file: {one_line(exc)}") from exc
    _refuse_lambda(config, path, unsafe)
    return _keras_load(path, unsafe)


def _load_h5(path, unsafe):
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 file (corrupt, or not a Keras .h5 model)")
    try:
        with h5py.File(path, "r") as f:
            version = attr_text(f, "keras_version")
            config_text = attr_text(f, "model_config")
            if config_text is None:
                raise InputError(
                    f"{path}: no model config in this HDF5 file (a weights-only file, or not "
                    f"a Keras model)"
                )
            config = parse_json(config_text, path)
            _refuse_lambda(config, path, unsafe)
            if version is None or not version.startswith("3."):
                return load_legacy_h5(f, config, path, unsafe)
    except (OSError, KeyError, RuntimeError) as exc:  # h5py's errors for truncated/corrupt data
        raise InputError(f"{path}: unreadable HDF5 file: {one_line(exc)}") from exc
    return _keras_load(path, unsafe)


def _keras_load(path, unsafe):
    """Keras 3's own loader, for files Keras 3 wrote; its errors become one line."""
    try:
        return keras.models.load_model(
            path, safe_mode=not unsafe, custom_objects=custom_objects(), compile=False
        )
    except KERAS_LOAD_ERRORS as exc:
        raise load_failure(path, exc, "cannot load the Keras model") from exc


def _refuse_lambda(config, path, unsafe):
    """Mirror Keras safe mode: a Lambda layer is code that runs on load."""
    if unsafe:
        return
    names = [entry["config"].get("name", "?") for entry in _dicts_in(config)
             if entry.get("class_name") == "Lambda" and isinstance(entry.get("config"), dict)]
    if names:
        raise UnsupportedModelError(
            f"{path}: the model contains Lambda layer(s) {', '.join(names)}, which run "
            f"arbitrary Python code when loaded; {UNSAFE_HINT}"
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
