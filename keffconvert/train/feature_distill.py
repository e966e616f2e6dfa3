"""Feature distillation: the fine-tuned model also matches the original's block outputs.

Distilling the outputs gives the student ten numbers an image. On a small data set (digits:
1,150 training images) it soon reproduces them on every training image and learns little more of
what the teacher computes. The outputs of the residual blocks give thousands of numbers an
image, and the data-aware conversion has already put the student's close to the teacher's:
matching them too should keep the student near the teacher's function inside the network
(FitNets, Romero et al. 2015, arXiv 1412.6550; few-sample distillation block by block, Li et al.
2020, arXiv 1812.01839). On B0 trained on digits (97.77%) it did not measurably: over six seeds
test accuracy after 3 epochs was 95.0% on average with it (weight 0.5) and 94.8% without, with
as many runs dipping below their start, so it is an option (`--feature-distill-weight`), off by
default (docs/results.md, "What a conversion does").

The points are the residual `Add` layers that both models have (same name, same shape): block
outputs, whose channels the conversion keeps in the original's order. An `Add` that a channel
reordering of the data-aware conversion may reach (`keffconvert.coupling`: it starts at an
expansion's output, a replacement without L, and runs through layers that act per channel) is
left out, so a student is never pulled toward a teacher's channel that is not its own.
"""

import keras
from keras import ops

from keffconvert.graph.view import Graph, functional_view, is_graph_model
from keffconvert.layers.grouped import GroupedPointwiseConv2D
from keffconvert.graph.model_info import leaf_layers


def matching_layers(student, teacher):
    """Names of the residual `Add` layers to match, in the teacher's order (nested models too)."""
    student_adds = {layer.name: layer for layer in leaf_layers(student) if isinstance(layer, keras.layers.Add)}
    reordered = _maybe_reordered(student)
    names = []
    for layer in leaf_layers(teacher):
        twin = student_adds.get(layer.name)
        if (isinstance(layer, keras.layers.Add) and twin is not None and layer.name not in reordered
                and tuple(twin.output.shape) == tuple(layer.output.shape)):
            names.append(layer.name)
    return names


def tapped(model, names):
    """A Functional model over a fresh input returning [model's output, *the named layers' outputs].

    It calls `model`'s own layers (nested models are walked through, so their inner layers can be
    tapped), so it shares every weight with `model` and trains it.
    """
    inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype) for t in keras.tree.flatten(model.inputs)]
    found = {}
    outputs = _retrace(model, inputs, set(names), found)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, [*outputs, *(found[name] for name in names)])


def feature_loss(student_features, teacher_features):
    """Mean over the points of ||s - t||^2 / ||t - mean t||^2 on the batch: each point weighs the
    same whatever its scale (the fit's relative error, `keffconvert.fit`)."""
    terms = []
    for s, t in zip(student_features, teacher_features):
        s, t = ops.cast(s, "float32"), ops.cast(t, "float32")
        spread = ops.mean(ops.square(t - ops.mean(t, axis=tuple(range(len(t.shape) - 1)))))
        terms.append(ops.mean(ops.square(s - t)) / (spread + 1e-6))
    return ops.mean(ops.stack(terms))


def _retrace(model, inputs, names, found):
    view = functional_view(model)
    values = {id(t): v for t, v in zip(keras.tree.flatten(view.inputs), inputs)}
    for node in Graph(view).nodes:
        layer = node.operation
        if is_graph_model(layer):
            outputs = _retrace(layer, [values[id(t)] for t in node.input_tensors], names, found)
        else:
            args, kwargs = node.arguments.fill_in(values)
            outputs = keras.tree.flatten(layer(*args, **kwargs))
        values.update(zip((id(t) for t in node.outputs), outputs))
        if layer.name in names:
            found[layer.name] = outputs[0]
    return [values[id(t)] for t in keras.tree.flatten(view.outputs)]


def _maybe_reordered(model):
    """Names of the layers, at any level, that a channel reordering starting at an expansion's
    replacement (a grouped K without an L beside it; `keffconvert.replacement` names them
    `<conv>_k` and `<conv>_l`) reaches through per-channel layers."""
    reached = set()
    for level in _levels(model):
        graph = Graph.of(level)
        names = {node.operation.name for node in graph.nodes}
        queue = [node for node in graph.nodes if isinstance(node.operation, GroupedPointwiseConv2D)
                 and node.operation.name.endswith("_k") and node.operation.name[:-2] + "_l" not in names]
        while queue:
            node = queue.pop()
            for tensor in node.outputs:
                for consumer in graph.consumers(tensor):
                    if consumer is None or _mixes_channels(consumer.operation):
                        continue
                    if consumer.operation.name not in reached:
                        reached.add(consumer.operation.name)
                        queue.append(consumer)
    return reached


def _levels(model):
    """`model` and every graph model nested in it: each has a graph of its own."""
    yield model
    for layer in model.layers:
        if is_graph_model(layer):
            yield from _levels(layer)


def _mixes_channels(layer):
    """Layers whose outputs mix input channels: a reordering of their inputs stops there."""
    return (is_graph_model(layer) or isinstance(layer, (keras.layers.Dense, GroupedPointwiseConv2D))
            or (isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D)))
