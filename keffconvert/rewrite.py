"""Rebuild a model with every planned chain M[->B][->A] swapped for the kEffNet sub-architecture.

The walk is Keras' own `keras.models.clone_model`: `clone_function` clones each layer (and
recurses into nested models), `call_function` replaces a chain's conv by the sub-architecture and
lets the chain's BN and activation pass their input through. Only what the `Analysis` decided is
changed; every other layer is cloned from its config under its own name.
"""

import keras

from keffconvert.errors import UnsupportedModelError
from keffconvert.graph import functional_view, is_graph_model


class Rewriter:
    """Holds the clone -> original mapping so weights can be copied once the model is built."""

    def __init__(self, analysis):
        self.analysis = analysis
        self.originals = {}  # id(clone) -> original layer
        self.cloned = []  # (clone, original) for layers kept as they were
        self.replacements = []  # (Chain, Replacement)

    def rewrite(self, model):
        if isinstance(model, keras.Sequential) and self.analysis.converts_directly(model):
            # The replacement branches and sums, which a Sequential cannot hold: go Functional.
            view = functional_view(model)
            model = keras.Model(view.inputs, view.outputs, name=model.name)
        if isinstance(model, keras.Sequential):
            return keras.models.clone_model(model, clone_function=self._clone)
        return keras.models.clone_model(model, input_tensors=named_inputs(model), clone_function=self._clone,
                                        call_function=self._call)

    def _clone(self, layer):
        if is_graph_model(layer):
            clone = self.rewrite(layer)
            if not layer.trainable:
                clone.trainable = False  # Keras propagates this to the layers, as it did in the original
            return clone
        clone = clone_subclassed_model(layer) if isinstance(layer, keras.Model) else clone_layer(layer)
        self.originals[id(clone)] = layer
        if self.analysis.chain_of(layer) is None and not self.analysis.is_absorbed(layer):
            self.cloned.append((clone, layer))
        return clone

    def _call(self, layer, *args, **kwargs):
        original = self.originals.get(id(layer))
        chain = self.analysis.chain_of(original) if original is not None else None
        if chain is not None:
            replacement = Replacement(chain)
            self.replacements.append((chain, replacement))
            return replacement(args[0])
        if original is not None and self.analysis.is_absorbed(original):
            return args[0]
        return layer(*args, **kwargs)


class Replacement:
    """The layers that stand in for one chain, built from its `NewLayer` descriptions:
    K, B', A, interleave, then L, B'', A and the sum (absent roles are None)."""

    ROLES = ("k", "k_bn", "k_act", "interleave", "l", "l_bn", "l_act", "sum")

    def __init__(self, chain):
        built = {layer.role: layer.build() for layer in chain.new_layers}
        for role in self.ROLES:
            setattr(self, role, built.get(role))

    def __call__(self, x):
        k_out = _apply([self.k, self.k_bn, self.k_act], x)
        mixed = self.interleave(k_out) if self.interleave is not None else k_out
        if self.l is None:
            return mixed
        l_out = _apply([self.l, self.l_bn, self.l_act], mixed)
        return self.sum([l_out, k_out])


def clone_layer(layer):
    """A new layer from `layer`'s config. A Lambda's code is already in memory (the user loaded
    the model, with --unsafe where it came from a file), so cloning it needs no safe mode."""
    if isinstance(layer, keras.layers.Lambda):
        from keras.src.saving.serialization_lib import SafeModeScope

        with SafeModeScope(False):
            return layer.__class__.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())


def clone_subclassed_model(model):
    """A copy of a nested subclassed model, kept as it is (it has no graph to rewrite).

    It must round-trip through its config, as saving it would need anyway; its weights are
    copied once the new model is built.
    """
    try:
        return model.__class__.from_config(model.get_config())
    except Exception as error:  # user code: any failure means the same thing
        raise UnsupportedModelError(
            f"nested subclassed model {model.name!r} ({type(model).__name__}) cannot be copied: "
            f"its get_config/from_config do not round-trip ({type(error).__name__}: {error}); "
            "rebuild it as a Functional or Sequential model") from error


def named_inputs(model, batch_size=None):
    """New inputs under the original input layers' names (clone_model would name them anew),
    with the batch dimension fixed to `batch_size` when given."""
    def new_input(tensor):
        shape = tuple(tensor.shape)
        if batch_size is not None:
            shape = (batch_size,) + shape[1:]
        return keras.Input(batch_shape=shape, dtype=tensor.dtype, name=tensor._keras_history[0].name)

    return keras.tree.map_structure(new_input, model.input)


def _apply(layers, x):
    for layer in layers:
        if layer is not None:
            x = layer(x)
    return x
