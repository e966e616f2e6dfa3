"""Data-aware conversion: fit every replacement so the converted model keeps what the original learned.

The original's graph is walked once, layer by layer, over the calibration images, carrying two
sets of values side by side: what the original computes and what the converted model computes
(the converted side calls the converted model's own copies of kept layers, whose channel order
the regrouping may have changed). At each
replaced chain, in topological order, the statistics of its input in the converted network and
in the original are accumulated, the replacement is fitted (`keffconvert.fit`), and its output
with the fitted weights is what the converted network carries on. So the whole fit costs about
two forward passes of the calibration set, plus a small least-squares problem per chain. Values
are dropped as soon as their last consumer has run, and stay backend tensors throughout (no
copies to numpy and back between layers; only the chains' second moments come to numpy). Each
value is a list of batches (`split`) that layers are called on one by one: never cut from, nor
joined into, one tensor of all images, which at 224x224 cost a copy of every activation twice.
"""

import time

import keras
import numpy as np

from keffconvert.coupling import choose_order, find_regions, permute_region
from keffconvert.fit import BlockGrouping, ChainFit, ChainStats, PaddedGrouping, folded_map, layer_weights
from keffconvert.graph import Graph, functional_view, is_graph_model
from keffconvert.weights import output_order

# Pixels of one chain's input whose statistics are accumulated: a (C+1)^2 second-moment matrix
# is estimated well from far fewer rows than 512 images at 112x112 give (6.4M), so large layers
# use a seeded random subset of this many.
MAX_PIXELS = 1_000_000


def calibrate(analysis, replacements, clones, images, *, batch_size=64, rounds=3, regroup=True, progress=None):
    """Fit each replacement in `replacements` ({id(conv): Replacement}) on `images`.

    Args:
        analysis: the `Analysis` of the original model (its chains are the ones replaced).
        replacements: the built replacement layers, already holding the transferred weights.
        clones: {id(original layer): its copy in the converted model} for the kept layers.
        regroup: reorder the channels of each coupling region (`keffconvert.coupling`) so each
            filter lands in the group that reproduces it best.
        images: calibration inputs, as the model takes them (float32, already scaled).
        batch_size: images per layer call (bounds the memory of one call, not of the walk).
        rounds: K/L alternations for linear chains that have an L.
        progress: called with (layer name, relative error) after each fit, or None.

    Returns:
        `{"samples": N, "time_s": seconds, "layers": {name: {"relative_error", "slices_error"}}}`;
        relative errors are sum ||y - z||^2 / sum ||z - mean z||^2 of the pre-activation on the
        calibration images, for the fitted replacement and for the plain block-diagonal slices.
    """
    start = time.time()
    walker = _Walker(analysis, replacements, clones, rounds, regroup, progress)
    x = split(images, batch_size)
    walker.run_level(analysis.model, [x], [x], prefix="")
    return {"samples": len(images), "time_s": round(time.time() - start, 3), "layers": walker.results}


class _Walker:
    def __init__(self, analysis, replacements, clones, rounds, regroup, progress):
        self.analysis = analysis
        self.replacements = replacements
        self.clones = clones
        # the 2022 variant's padded groups overlap: no free channel order to choose
        self.regroup = regroup and not any(_is_padded(chain) for chain in analysis.chains.values())
        self.regions = {}  # id(conv) -> Region, for the level being walked
        self.orders = {}  # id(Region) -> channel order chosen at its first chain
        self.rounds = rounds
        self.progress = progress
        self.results = {}

    def run_level(self, model, orig_inputs, conv_inputs, prefix):
        """Both networks' outputs of one model level (nested graph models recurse)."""
        view = functional_view(model)
        graph = Graph(view)
        orig = {id(t): v for t, v in zip(keras.tree.flatten(view.inputs), orig_inputs)}
        conv = {id(t): v for t, v in zip(keras.tree.flatten(view.inputs), conv_inputs)}
        pending = graph.input_uses()
        keep = {id(t) for t in keras.tree.flatten(view.outputs)}
        if self.regroup:
            self.regions.update(find_regions(graph, self.analysis))

        for node in graph.nodes:
            layer = node.operation
            if is_graph_model(layer):
                o_out, c_out = self.run_level(layer, [orig[id(t)] for t in node.input_tensors],
                                              [conv[id(t)] for t in node.input_tensors],
                                              prefix=f"{prefix}{layer.name}/")
                orig.update(zip((id(t) for t in node.outputs), o_out))
                conv.update(zip((id(t) for t in node.outputs), c_out))
            else:
                chain = self.analysis.chain_of(layer)
                if chain is not None:
                    x_conv, x_orig = conv[id(node.input_tensors[0])], orig[id(node.input_tensors[0])]
                    conv[id(chain.layers[-1].output)] = self._fit(chain, x_conv, x_orig, prefix)
                elif not self.analysis.is_absorbed(layer):
                    clone = self.clones.get(id(layer), layer)
                    conv.update(zip((id(t) for t in node.outputs), call_in_batches(clone, node, conv)))
                orig.update(zip((id(t) for t in node.outputs), call_in_batches(layer, node, orig)))
            for tensor in node.input_tensors:
                pending[id(tensor)] -= 1
                if pending[id(tensor)] == 0 and id(tensor) not in keep:
                    orig.pop(id(tensor), None)
                    conv.pop(id(tensor), None)
        outputs = keras.tree.flatten(view.outputs)
        return [orig[id(t)] for t in outputs], [conv[id(t)] for t in outputs]

    def _fit(self, chain, x_conv, x_orig, prefix):
        """Fit one chain's replacement and return its output on the converted network's values."""
        started = time.time()
        entry = chain.entry
        replacement = self.replacements[id(chain.conv)]
        stats = _chain_stats(x_conv, x_orig, entry.in_channels, np.random.default_rng(len(self.results)))
        linear = chain.act is None and chain.conv.activation is keras.activations.linear
        intercept = chain.bn is not None or chain.conv.use_bias
        target = folded_map(chain.conv, chain.bn)
        options = dict(intercept=intercept, fit_l=entry.second_conv and linear)
        padded = _is_padded(chain)  # the 2022 variant: no interleave on the output
        positions = np.arange(entry.filters) if entry.second_conv or padded else output_order(entry)
        options["grouping"] = _grouping(chain)
        fitter = ChainFit(stats, target, entry.groups, order=positions, **options)
        slices = fitter.relative_error(fitter.target * fitter.k_mask, None)  # the plain conversion's K
        channel_order = self._channel_order(chain, stats, target, options)
        if np.any(channel_order != np.arange(entry.filters)):
            fitter = ChainFit(stats, target, entry.groups, order=channel_order[positions], **options)
        fit = fitter.run(self.rounds)
        epsilon = chain.bn.epsilon if chain.bn is not None else None
        use_bias = chain.conv.use_bias
        k_conv, k_bn = layer_weights(fit.k, stats.conv, fitter.grouping, use_bias=use_bias, bn_epsilon=epsilon)
        replacement.k.set_weights(k_conv)
        if k_bn is not None:
            replacement.k_bn.set_weights(k_bn)
        if fit.l is not None:
            g = fitter.l_inputs(fit.k)
            l_conv, l_bn = layer_weights(fit.l, g.T @ stats.conv @ g, fitter.grouping, use_bias=use_bias,
                                         bn_epsilon=epsilon, role="l")
            replacement.l.set_weights(l_conv)
            if l_bn is not None:
                replacement.l_bn.set_weights(l_bn)
        name = f"{prefix}{chain.conv.name}"
        self.results[name] = {"relative_error": fit.relative_error, "slices_error": slices,
                              "regrouped": bool(np.any(channel_order != np.arange(entry.filters))),
                              "fit_time_s": round(time.time() - started, 3)}
        if self.progress is not None:
            self.progress(name, fit.relative_error)
        return [replacement(batch) for batch in x_conv]

    def _channel_order(self, chain, stats, target, options):
        """The order of the chain's output channels in the converted model (identity outside a
        coupling region); chosen, and applied to the region's per-channel layers, at its first chain."""
        filters = chain.entry.filters
        region = self.regions.get(id(chain.conv))
        if region is None:
            return np.arange(filters)
        if region.producers[0] is chain:
            explained = ChainFit(stats, target, chain.entry.groups, **options).explained_by_group()
            perm = choose_order(explained, chain.entry.groups)
            self.orders[id(region)] = perm
            permute_region(region, perm, self.clones)
        return self.orders[id(region)]


def _is_padded(chain):
    """Whether the chain is replaced by the 2022 variant's padded grouped convs."""
    return bool(chain.new_layer("k").channels_per_group)


def _grouping(chain):
    entry = chain.entry
    if _is_padded(chain):
        return PaddedGrouping(entry.in_channels, entry.filters, chain.new_layer("k").channels_per_group)
    return BlockGrouping(entry.in_channels, entry.filters, entry.groups)


def split(images, batch_size):
    """`images` as a list of backend tensors of `batch_size` images each (the walks' values)."""
    images = np.asarray(images, "float32")
    return [keras.ops.convert_to_tensor(images[s:s + batch_size]) for s in range(0, len(images), batch_size)]


def call_in_batches(layer, node, values):
    """`layer` on the values ({id(tensor): list of batches}) of `node`'s inputs, batch by batch;
    per output of the node, its list of batches."""
    batches = len(values[id(node.input_tensors[0])])
    outputs = []
    for i in range(batches):
        args, kwargs = node.arguments.fill_in({key: value[i] for key, value in values.items()})
        outputs.append(keras.tree.flatten(layer(*args, **kwargs)))
    return [list(parts) for parts in zip(*outputs)]


def _chain_stats(x_conv, x_orig, channels, rng):
    """`ChainStats` of a chain's inputs (lists of batches) in both networks; above MAX_PIXELS
    pixels, of a seeded random subset. The products run on the backend (multithreaded, no copy
    to numpy)."""
    ops = keras.ops
    n = sum(batch.shape[0] for batch in x_conv)
    pixels = int(np.prod(x_conv[0].shape[1:-1]))
    keep = min(1.0, MAX_PIXELS / max(1, pixels * n))
    stats = ChainStats(channels)
    for batch_conv, batch_orig in zip(x_conv, x_orig):
        xc = ops.reshape(batch_conv, (-1, channels))
        xo = ops.reshape(batch_orig, (-1, channels))
        if keep < 1.0:
            rows = np.flatnonzero(rng.random(xc.shape[0]) < keep)
            xc, xo = ops.take(xc, rows, axis=0), ops.take(xo, rows, axis=0)
        # xc^T [xc, xo] and xo^T xo: the three blocks the fit reads (xo^T xc is the cross's transpose)
        left = ops.matmul(ops.transpose(xc), ops.concatenate([xc, xo], axis=1))
        moments = [ops.convert_to_numpy(m).astype("float64") for m in
                   (left, ops.matmul(ops.transpose(xo), xo), ops.sum(xc, axis=0), ops.sum(xo, axis=0))]
        stats.add_moments(moments[0][:, :channels], moments[0][:, channels:], *moments[1:], int(xc.shape[0]))
    return stats
