"""keffconvert: turn a Keras CNN's pointwise convolutions into kEffNet grouped convolutions.

    import keras, keffconvert

    small, plan = keffconvert.convert(keras.applications.EfficientNetB0(weights=None, classes=10))

Importing keffconvert has no side effect on the process: it does not import Keras or TensorFlow
and does not touch stderr. The names below load on first use, and keffconvert's two layers are
registered with Keras as soon as Keras is imported (at once if it already is), so
`keras.models.load_model` reads converted models whichever of `import keras` and
`import keffconvert` comes first. Only the `keffconvert` command silences TensorFlow's start-up
lines (`keffconvert.cli.main`, `keffconvert._quiet`).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"
__all__ = ["convert", "sweep", "GroupedPointwiseConv2D", "InterleaveChannels", "PaddedGroupedPointwiseConv2D", "LayerPlan", "Plan", "__version__"]

_HOMES = {  # public name -> the module that defines it
    "convert": "keffconvert.convert",
    "sweep": "keffconvert.sweep",
    "GroupedPointwiseConv2D": "keffconvert.layers",
    "InterleaveChannels": "keffconvert.layers",
    "PaddedGroupedPointwiseConv2D": "keffconvert.layers",
    "LayerPlan": "keffconvert.plan",
    "Plan": "keffconvert.plan",
}
_REGISTERS_LAYERS = "keffconvert.layers"  # importing it registers the layers with Keras


def __getattr__(name):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type. The import system sets every submodule it loads as an attribute
    of its package; `keffconvert.convert` is the function, so the submodule of the same name must
    not replace it."""

    def __setattr__(self, name, value):
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterLayersWithKeras(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `keras` is imported, has Keras' own loader load it and then
    imports keffconvert.layers (which registers the layers), then steps out of the import system."""

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or self._searching:
            return None
        self._searching = True  # the search below goes through sys.meta_path, this finder included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _LoadThenRegister(spec.loader, self)
        return spec


class _LoadThenRegister(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self._loader  # Keras' loader, as if never wrapped
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        importlib.import_module(_REGISTERS_LAYERS)


if "keras" in sys.modules:
    importlib.import_module(_REGISTERS_LAYERS)
else:
    sys.meta_path.insert(0, _RegisterLayersWithKeras())
