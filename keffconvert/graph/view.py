"""A read-only view of a Functional or Sequential model's layer graph: who produces and who
consumes what.

Keras keeps this in its Functional graph (read through `keras_compat`); this module is the one
place that reads it, so the rest of keffconvert (the conversion's analysis, the calibration walk,
the inference export's folding plan) sees nodes in execution order, the node that produces each
tensor and the nodes that consume it.
"""

from collections import defaultdict

import keras

from keffconvert.graph.keras_compat import is_functional, nodes_by_depth, sequential_graph


def is_graph_model(obj):
    """Functional and Sequential models have a graph; subclassed models do not."""
    return is_functional(obj) or isinstance(obj, keras.Sequential)


def functional_view(model):
    """The Functional graph behind `model` (a built Sequential keeps one of its own)."""
    if isinstance(model, keras.Sequential):
        functional = sequential_graph(model)
        if functional is None:
            raise_unbuilt(model)
        return functional
    return model


def as_functional(model):
    """A Sequential `model` as a Functional model of the same name over the same layers."""
    view = functional_view(model)
    return keras.Model(view.inputs, view.outputs, name=model.name)


def raise_unbuilt(model):
    from keffconvert.errors import UnsupportedModelError

    raise UnsupportedModelError(
        f"Sequential model {model.name!r} has no input shape, so its layers cannot be traced; "
        "start it with keras.Input(shape=...)"
    )


class Graph:
    """Nodes of one model level in execution order, with the producer and the consumers of every
    tensor. A model output counts as one consumer, written None."""

    def __init__(self, model):
        self.model = model
        by_depth = nodes_by_depth(model)
        self.nodes = [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]
                      if n.operation is not None and not n.is_input]
        self._producers = {}
        self._consumers = defaultdict(list)
        self._calls = defaultdict(int)
        for node in self.nodes:
            self._calls[id(node.operation)] += 1
            for tensor in node.outputs:
                self._producers[id(tensor)] = node
            for tensor in node.input_tensors:
                self._consumers[id(tensor)].append(node)
        for tensor in model.outputs:
            self._consumers[id(tensor)].append(None)

    @classmethod
    def of(cls, model):
        """The graph of a Functional model or of a built Sequential model."""
        return cls(functional_view(model))

    def call_count(self, layer):
        return self._calls[id(layer)]

    def called_once(self, layer):
        return self.call_count(layer) == 1

    def producer(self, tensor):
        """The node whose output `tensor` is, or None (a model input)."""
        return self._producers.get(id(tensor))

    def input_producer(self, node):
        """The node producing `node`'s single input, or None (several inputs, or a model input)."""
        if len(node.input_tensors) != 1:
            return None
        return self.producer(node.input_tensors[0])

    def consumers(self, tensor):
        """The nodes that take `tensor` as an input, once per use; None for a model output."""
        return list(self._consumers.get(id(tensor), ()))

    def only_consumer(self, tensor):
        """The node that alone consumes `tensor` (once, and it is no model output), or None."""
        consumers = self._consumers.get(id(tensor), ())
        return consumers[0] if len(consumers) == 1 else None

    def sole_consumer(self, node):
        """The node that alone consumes `node`'s single output, or None."""
        if len(node.outputs) != 1:
            return None
        return self.only_consumer(node.outputs[0])

    def input_uses(self):
        """{id(tensor): how many node inputs take it}: a walk that drops a value after its last use
        counts down from here."""
        return {key: sum(node is not None for node in nodes) for key, nodes in self._consumers.items()}

    def feeds_only(self, node, consumer):
        """Whether `node`'s single output goes to `consumer` and nowhere else."""
        return consumer is not None and self.sole_consumer(node) is consumer
