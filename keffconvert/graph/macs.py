"""Multiply-accumulates of one layer call, per image, from its input and output shapes.

Only the layers that hold the arithmetic are counted (convolutions, grouped pointwise
convolutions, dense); normalisation, activations and pooling are left out, as is usual.
"""

import keras

from keffconvert.layers.grouped import GroupedPointwiseConv2D
from keffconvert.layers.padded import PaddedGroupedPointwiseConv2D, padded_groups


def _prod(dims):
    n = 1
    for d in dims:
        if d is None:
            return None
        n *= d
    return n


def layer_macs(layer, in_shape, out_shape):
    """MACs for one call of `layer`; None when a needed dimension is unknown."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        pixels, kernel = _prod(out_shape[1:-1]), _prod(layer.kernel_size)
        return None if pixels is None else pixels * kernel * in_shape[-1] * layer.depth_multiplier
    if isinstance(layer, keras.layers.SeparableConv2D):
        pixels, kernel = _prod(out_shape[1:-1]), _prod(layer.kernel_size)
        if pixels is None:
            return None
        return pixels * in_shape[-1] * (kernel * layer.depth_multiplier + layer.depth_multiplier * layer.filters)
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        pixels, kernel = _prod(out_shape[1:-1]), _prod(layer.kernel_size)
        return None if pixels is None else pixels * kernel * (in_shape[-1] // layer.groups) * layer.filters
    if isinstance(layer, GroupedPointwiseConv2D):
        pixels = _prod(out_shape[1:-1])
        return None if pixels is None else pixels * in_shape[-1] * layer.filters // layer.groups
    if isinstance(layer, PaddedGroupedPointwiseConv2D):  # the 2022 variant: cpg (padded) inputs per filter
        pixels = _prod(out_shape[1:-1])
        _, local, _ = padded_groups(in_shape[-1], layer.filters, layer.channels_per_group)
        return None if pixels is None else pixels * local * layer.filters
    if isinstance(layer, keras.layers.Dense):
        rows = _prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
        return None if rows is None else rows * in_shape[-1] * layer.units
    return 0


def model_macs(model):
    """Total MACs per image of a Functional/Sequential model, nested models included."""
    from keffconvert.graph.view import Graph, functional_view, is_graph_model

    total = 0
    for node in Graph(functional_view(model)).nodes:
        layer = node.operation
        if is_graph_model(layer):
            inner = model_macs(layer)
        else:
            inner = layer_macs(layer, node.input_tensors[0].shape, node.outputs[0].shape)
        if inner is None:
            return None
        total += inner
    return total
