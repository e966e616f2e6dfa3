"""The calibration walk's schedule: every layer call of a model, nested models expanded, in order.

The data-aware fit walks the original network and the converted one side by side. Both are the
original's graph: the converted side calls the converted model's copies of kept layers and, at a
converted chain's conv, the chain's replacement (whose output stands for the chain's last
output; the chain's BN and activation then do nothing there). So one list of `Step`s, each a
node of the original with the keys of the values it reads and writes, serves both sides, and
nested Functional or Sequential models are flattened into it: their inputs and outputs are the
outer values they are called on and give back.
"""

from dataclasses import dataclass, field
from itertools import count

import keras

from keffconvert.graph.view import Graph, functional_view, is_graph_model


@dataclass
class Step:
    """One node of the original model, at any nesting level."""

    layer: object
    node: object
    inputs: list  # value keys of node.input_tensors, in order
    outputs: list  # value keys of node.outputs, in order
    prefix: str  # "outer/" for a layer inside a nested model called `outer`
    tensor_ids: list = field(default_factory=list)  # id() of node.input_tensors (node.arguments.fill_in)
    chain: object = None  # the converted chain whose conv this node is
    chain_output: str | None = None  # for a chain's step: the key of the chain's last output
    absorbed: bool = False  # a converted chain's BN or activation

    @property
    def name(self):
        return f"{self.prefix}{self.layer.name}"


@dataclass
class Schedule:
    steps: list
    inputs: list  # keys of the model's inputs
    outputs: list  # keys of the model's outputs

    def chain_steps(self):
        return [i for i, step in enumerate(self.steps) if step.chain is not None]


def schedule(model, analysis):
    """The `Schedule` of `model`, with each converted chain of `analysis` marked."""
    steps = []
    levels = count()

    def walk(level_model, input_keys, prefix):
        level = next(levels)
        view = functional_view(level_model)
        keys = {id(t): k for t, k in zip(keras.tree.flatten(view.inputs), input_keys)}
        for node in Graph(view).nodes:
            layer = node.operation
            inputs = [keys[id(t)] for t in node.input_tensors]
            if is_graph_model(layer):
                outputs = walk(layer, inputs, f"{prefix}{layer.name}/")
            else:
                outputs = [f"{level}:{id(t)}" for t in node.outputs]
                chain = analysis.chain_of(layer)
                steps.append(Step(layer, node, inputs, outputs, prefix, [id(t) for t in node.input_tensors], chain,
                                  f"{level}:{id(chain.layers[-1].output)}" if chain is not None else None,
                                  analysis.is_absorbed(layer)))
            keys.update(zip((id(t) for t in node.outputs), outputs))
        return [keys[id(t)] for t in keras.tree.flatten(view.outputs)]

    model_inputs = [f"input:{i}" for i in range(len(keras.tree.flatten(functional_view(model).inputs)))]
    outputs = walk(model, model_inputs, "")
    return Schedule(steps, model_inputs, outputs)
