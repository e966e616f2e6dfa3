"""Channel coupling: where a converted chain's output channels may be reordered freely.

Inside an MBConv block the expanded channels pass through layers that act on each channel alone
(depthwise conv, batch norm, activation, squeeze-and-excitation pooling and gate) until the next
pointwise conv mixes them. Reordering them there, consistently, changes nothing the model
computes; but it decides which of the original filters share a group in the grouped conv that
produces them. A `Region` is such a set of tensors, found on the one `Graph`: every producer of a
region tensor is a converted chain or a per-channel layer, every consumer a converted chain's
conv or a per-channel layer. The data-aware fit picks the order (`choose_order`) at the region's
first chain and applies it to every chain that produces region channels and to the weights of
the per-channel layers in between.
"""

from dataclasses import dataclass, field

import keras
import numpy as np

from keffconvert.graph.layer_kinds import is_elementwise, is_elementwise_activation_layer, is_plain_batch_norm

# Layers without weights that act on each channel alone (for Reshape: see `_per_channel`).
_CHANNELWISE = (keras.layers.ZeroPadding2D, keras.layers.Dropout, keras.layers.SpatialDropout2D,
                keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
                keras.layers.AveragePooling2D, keras.layers.MaxPooling2D, keras.layers.Multiply)


@dataclass
class Region:
    """Tensors whose channels share one order; the chains producing them and the layers to reorder."""

    producers: list = field(default_factory=list)  # Chain objects, in execution order
    layers: list = field(default_factory=list)  # per-channel layers with weights (depthwise, BN)
    out_layers: list = field(default_factory=list)  # kept convs/dense whose outputs are region channels
    in_layers: list = field(default_factory=list)  # kept convs/dense that read region channels


def find_regions(graph, analysis):
    """{id(chain.conv): Region} for every converted chain whose output opens a valid region."""
    regions = {}
    taken = set()
    for node in graph.nodes:
        chain = analysis.chain_of(node.operation)
        if chain is None or chain.entry.second_conv or id(chain.conv) in taken:
            continue  # a region opens at an expansion: its groups decide which filters go together
        region = _grow(graph, analysis, chain)
        if region is None:
            continue
        for producer in region.producers:
            taken.add(id(producer.conv))
            regions[id(producer.conv)] = region
    return regions


def _grow(graph, analysis, start):
    """The region opened by `start`'s output, or None when some tensor leaves the closed set."""
    region = Region()
    producers = {}
    tensors = {}
    queue = [start.layers[-1].output]
    while queue:
        tensor = queue.pop()
        if id(tensor) in tensors:
            continue
        tensors[id(tensor)] = tensor
        node = graph.producer(tensor)
        if node is None:
            return None
        chain = _chain_ending_in(analysis, node.operation)
        if chain is not None:
            producers[id(chain.conv)] = chain
        elif _mixes_channels(node.operation) and _elementwise_activation(node.operation):
            if node.operation not in region.out_layers:
                region.out_layers.append(node.operation)
        elif _per_channel(node.operation):
            if node.operation.weights and node.operation not in region.layers:
                region.layers.append(node.operation)
            queue.extend(node.input_tensors)
        else:
            return None
        for consumer in graph.consumers(tensor):
            if consumer is None:
                return None
            if analysis.chain_of(consumer.operation) is not None:
                continue  # a converted conv reads the region: its own fit sees the order
            if _mixes_channels(consumer.operation):
                if consumer.operation not in region.in_layers:
                    region.in_layers.append(consumer.operation)
                continue
            if not _per_channel(consumer.operation):
                return None
            queue.extend(consumer.outputs)
            queue.extend(consumer.input_tensors)
    order = {id(n.operation): i for i, n in enumerate(graph.nodes)}
    region.producers = sorted(producers.values(), key=lambda c: order.get(id(c.conv), 0))
    first = order[id(start.conv)]
    if region.producers[0] is not start or any(order[id(layer)] < first for layer in region.out_layers):
        return None  # the order is chosen at `start`: nothing may produce region channels before it
    if any(layer in region.in_layers for layer in region.out_layers):
        return None
    return region


def _mixes_channels(layer):
    """A kept layer whose input channels are rows and output channels columns of its kernel."""
    if type(layer) is keras.layers.Conv2D:
        return layer.groups == 1 and layer.data_format == "channels_last"
    return type(layer) is keras.layers.Dense and len(layer.kernel.shape) == 2


def _elementwise_activation(layer):
    return layer.activation is keras.activations.linear or is_elementwise(layer.activation)


def _chain_ending_in(analysis, layer):
    for chain in analysis.chains.values():
        if chain.layers[-1] is layer:
            return chain
    return None


def _per_channel(layer):
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return layer.depth_multiplier == 1 and type(layer) is keras.layers.DepthwiseConv2D
    if isinstance(layer, keras.layers.BatchNormalization):
        return is_plain_batch_norm(layer, len(layer.output.shape))
    if isinstance(layer, keras.layers.Reshape):
        return layer.target_shape[-1] == layer.input.shape[-1] and all(d == 1 for d in layer.target_shape[:-1])
    return type(layer) in _CHANNELWISE or is_elementwise_activation_layer(layer)


def choose_order(explained, groups):
    """The channel order that puts each original filter in the group that explains it best.

    `explained[f, j]` is how much of filter f's output group j's inputs can reproduce. Each group
    takes F/g filters (a balanced assignment, solved exactly). Returns `perm` with region
    position p holding original channel perm[p]; group j fills positions j, j+g, j+2g, ... (the
    interleave's output positions of its filters).
    """
    from scipy.optimize import linear_sum_assignment

    filters = explained.shape[0]
    step = filters // groups
    cost = -np.repeat(explained, step, axis=1)  # column j*step + s: slot s of group j
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(filters, dtype=np.int64)
    for f, slot in zip(rows, cols):
        j, s = divmod(slot, step)
        perm[s * groups + j] = f
    return perm


def permute_region(region, perm, clones):
    """Give the converted model's copies of the region's kept layers the channel order `perm`."""
    for layer in region.layers:
        permute_layer(clones[id(layer)], perm)
    for layer in region.out_layers:
        weights = clones[id(layer)].get_weights()
        clones[id(layer)].set_weights([w[..., perm] for w in weights])
    for layer in region.in_layers:
        weights = clones[id(layer)].get_weights()
        weights[0] = weights[0][..., perm, :]
        clones[id(layer)].set_weights(weights)


def permute_layer(layer, perm):
    """Reorder a depthwise conv's or batch norm's per-channel weights to `perm`."""
    weights = layer.get_weights()
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        weights = [w[:, :, perm, :] if w.ndim == 4 else w[perm] for w in weights]
    else:
        weights = [w[perm] for w in weights]
    layer.set_weights(weights)
