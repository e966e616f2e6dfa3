"""A read-only view of a Functional or Sequential model's layer graph: who consumes what.

Keras keeps this in its Functional graph (`_nodes_by_depth`); this module is the one place that
reads those internals, so the rest of keffconvert sees nodes in execution order and consumers.
"""

from collections import defaultdict

import keras
from keras.src.models.functional import Functional


def is_graph_model(obj):
    """Functional and Sequential models have a graph; subclassed models do not."""
    return isinstance(obj, (Functional, keras.Sequential))


def functional_view(model):
    """The Functional graph behind `model` (a built Sequential keeps one of its own)."""
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise_unbuilt(model)
        return functional
    return model


def raise_unbuilt(model):
    from keffconvert.errors import UnsupportedModelError

    raise UnsupportedModelError(
        f"Sequential model {model.name!r} has no input shape, so its layers cannot be traced; "
        "start it with keras.Input(shape=...)"
    )


class Graph:
    """Nodes of one model level in execution order, with the consumers of every tensor."""

    def __init__(self, model):
        self.model = model
        depths = sorted(model._nodes_by_depth, reverse=True)
        self.nodes = [n for d in depths for n in model._nodes_by_depth[d]
                      if n.operation is not None and not n.is_input]
        self._consumers = defaultdict(list)
        self._calls = defaultdict(int)
        for node in self.nodes:
            self._calls[id(node.operation)] += 1
            for tensor in node.input_tensors:
                self._consumers[id(tensor)].append(node)
        for tensor in model.outputs:
            self._consumers[id(tensor)].append(None)  # a model output is a consumer too

    def call_count(self, layer):
        return self._calls[id(layer)]

    def sole_consumer(self, node):
        """The node that alone consumes `node`'s single output, or None."""
        if len(node.outputs) != 1:
            return None
        consumers = self._consumers[id(node.outputs[0])]
        if len(consumers) != 1 or consumers[0] is None:
            return None
        return consumers[0]
