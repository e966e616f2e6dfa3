"""keffconvert: turn a Keras CNN's pointwise convolutions into kEffNet grouped convolutions.

    import keras, keffconvert

    small, plan = keffconvert.convert(keras.applications.EfficientNetB0(weights=None, classes=10))
    small, plan = keffconvert.convert(model, calibration=images)          # fitted to the original
    small, plan = keffconvert.convert(model, target=keffconvert.Target(reduction=80))

Importing keffconvert has no side effect on the process: it does not import Keras or TensorFlow
and does not touch stderr. The names below load on first use, and keffconvert's two layers are
registered with Keras as soon as Keras is imported (at once if it already is), so
`keras.models.load_model` reads converted models whichever of `import keras` and
`import keffconvert` comes first. Only the `keffconvert` command silences TensorFlow's start-up
lines (`keffconvert.cli.main`, `keffconvert.quiet_start`).
"""

import importlib
import importlib.abc
import importlib.util
import sys

from keffconvert.lazy import lazy_names

__version__ = "0.1.0"
__all__ = ["Calibration", "GroupedPointwiseConv2D", "InterleaveChannels", "LayerPlan", "PaddedGroupedPointwiseConv2D",
           "Plan", "Target", "__version__", "convert", "sweep"]

_HOMES = {  # public name -> the module that defines it
    "convert": "keffconvert.converter",
    "Calibration": "keffconvert.options",
    "Target": "keffconvert.options",
    "sweep": "keffconvert.train.sweep",
    "GroupedPointwiseConv2D": "keffconvert.layers.grouped",
    "InterleaveChannels": "keffconvert.layers.grouped",
    "PaddedGroupedPointwiseConv2D": "keffconvert.layers.padded",
    "LayerPlan": "keffconvert.plan.model_plan",
    "Plan": "keffconvert.plan.model_plan",
}
_REGISTERS_LAYERS = "keffconvert.layers"  # importing it registers the layers with Keras


__getattr__, __dir__ = lazy_names(__name__, _HOMES)


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
