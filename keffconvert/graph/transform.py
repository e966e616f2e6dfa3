"""Rebuild a model level by level, changing only what a `Transform` says: the one walk that both
the conversion (`rewrite.Rewriter`) and the inference export (`export.inference_model`) run.

Each level (the model, and every Functional or Sequential model nested in it) is cloned with
Keras' own `keras.models.clone_model`: the transform's `clone` makes each layer's new copy and its
`call` calls that copy in the new graph, or replaces it, or lets its input pass through. What to
change is decided beforehand, on the level's `graph.Graph` (a pattern matched, then a
replacement applied, as in TFMOT's ModelTransformer); this walk only applies it.

Keras does not run `call_function` inside a Sequential model (its layers are listed, not called),
so a Sequential level whose clone must branch or skip layers is rebuilt as a Functional model of
the same name first (`Transform.needs_functional`). Nested models are rebuilt by the same walk and
keep their `trainable` setting.
"""

import keras

from keffconvert.errors import UnsupportedModelError
from keffconvert.graph.view import as_functional, is_graph_model
from keffconvert.graph.keras_compat import producing_layer, safe_mode_off


class Transform:
    """The hooks `rebuild` calls. The defaults copy a model as it is: override what changes."""

    def needs_functional(self, model):
        """Whether Sequential level `model` must become Functional (its clone branches or skips)."""
        return False

    def begin_level(self, model):
        """Called with each level (a Functional model) before it is cloned; the value returned is
        what `clone` and `call` receive as `level` for that level's layers."""
        return None

    def clone(self, layer, level):
        """The new layer that stands for `layer` (never a Functional or Sequential model)."""
        return clone_layer(layer)

    def call(self, original, layer, level, *args, **kwargs):
        """The output, in the new graph, of new `layer` (the clone of `original`) on `args`."""
        return layer(*args, **kwargs)


def rebuild(model, transform, batch_size=None):
    """A new model computing what `transform` makes of `model`, nested models included.

    Args:
        model: a Functional or Sequential model.
        transform: a `Transform`.
        batch_size: fix the new inputs' batch dimension (nested models take what they are
            given); None keeps it as it is. A Sequential model given one becomes Functional.
    """
    if isinstance(model, keras.Sequential) and (batch_size is not None or transform.needs_functional(model)):
        model = as_functional(model)
    level = transform.begin_level(model)
    originals = {}  # id(clone) -> the layer it was cloned from

    def clone_function(layer):
        if is_graph_model(layer):
            clone = rebuild(layer, transform)
            if not layer.trainable:
                clone.trainable = False  # Keras propagates this to the layers, as it did in the original
            return clone
        clone = transform.clone(layer, level)
        originals[id(clone)] = layer
        return clone

    def call_function(layer, *args, **kwargs):
        original = originals.get(id(layer))
        if original is None:  # a nested model's clone
            return layer(*args, **kwargs)
        return transform.call(original, layer, level, *args, **kwargs)

    if isinstance(model, keras.Sequential):
        return keras.models.clone_model(model, clone_function=clone_function)
    return keras.models.clone_model(model, input_tensors=named_inputs(model, batch_size),
                                    clone_function=clone_function, call_function=call_function)


def clone_layer(layer):
    """A new layer from `layer`'s config, not yet built (weights are the caller's to copy).

    A nested subclassed model is copied as it is (`clone_subclassed_model`). A Lambda's code is
    already in memory (the user loaded the model, with --unsafe where it came from a file), so
    cloning it needs no safe mode.
    """
    if isinstance(layer, keras.Model):
        return clone_subclassed_model(layer)
    if isinstance(layer, keras.layers.Lambda):
        with safe_mode_off():
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
        return keras.Input(batch_shape=shape, dtype=tensor.dtype, name=producing_layer(tensor).name)

    return keras.tree.map_structure(new_input, model.input)
