"""Data-aware conversion: fit every replacement so the converted model keeps what the original learned.

The original network and the converted one are walked side by side over the calibration images
(`keffconvert.fit.stream`): at each converted chain, in execution order, the walk stops with the
second moments of the chain's input in the converted network and in the original, the
replacement is fitted (`keffconvert.fit.solve`), and the walk goes on with the fitted weights.
So each fit also corrects what earlier replacements changed in its input, each layer runs once
per network and batch (compiled, as `Model.predict` runs it), and memory does not grow with the
number of images: the activations a later segment needs go to a `ValueStore`, which spills to
disk past its memory limit. The coupling regions (`keffconvert.fit.coupling`) let each
expansion's filters be regrouped, at the region's first chain, into the groups that reproduce
them best.
"""

import time

import keras
import numpy as np

from keffconvert.data.batches import CheckedBatches, as_batches
from keffconvert.errors import DataError, UnsupportedModelError
from keffconvert.fit.coupling import choose_order, find_regions, permute_region
from keffconvert.fit.schedule import schedule
from keffconvert.fit.solve import BlockGrouping, ChainFit, ChainStats, PaddedGrouping, folded_map, layer_weights
from keffconvert.fit.store import ValueStore
from keffconvert.fit.stream import Walk
from keffconvert.graph.model_info import input_shape
from keffconvert.graph.view import Graph, functional_view, is_graph_model
from keffconvert.rewrite.weights import output_order


def calibrate(analysis, replacements, clones, calibration):
    """Fit each replacement in `replacements` ({id(conv): Replacement}) on `calibration`'s images.

    Args:
        analysis: the `Analysis` of the original model (its chains are the ones replaced).
        replacements: the built replacement layers, already holding the transferred weights.
        clones: {id(original layer): its copy in the converted model} for the kept layers.
        calibration: a `keffconvert.Calibration` (the images, rounds, batch size, memory limit,
            progress callback).

    Returns:
        `{"samples": N, "time_s": seconds, "layers": {name: {"relative_error", "slices_error",
        "regrouped", "fit_time_s"}}, "spilled_bytes": B}`; relative errors are
        sum ||y - z||^2 / sum ||z - mean z||^2 of the pre-activation on the calibration images,
        for the fitted replacement and for the plain block-diagonal slices.
    """
    start = time.time()
    model = analysis.model
    source = calibration_source(model, calibration.images)
    fitter = _Fitter(analysis, replacements, clones, calibration)
    plan = schedule(model, analysis)
    chains = plan.chain_steps()
    with ValueStore(calibration.memory_limit, calibration.spill_folder) as store:
        walk = Walk(plan, source, chains, syncs=chains, store=store, conv_side=True, clones=clones,
                    replacements=replacements, batch_size=calibration.batch_size)
        last = walk.run(on_sync=lambda step, moments: fitter.fit(plan.steps[step], moments))
        for step in chains:  # chains no later segment waits on (the last one)
            if plan.steps[step].name not in fitter.results:
                fitter.fit(plan.steps[step], last[step])
        spilled = store.spilled
    return {"samples": len(source), "time_s": round(time.time() - start, 3), "layers": fitter.results,
            "spilled_bytes": int(spilled)}


def calibration_source(model, images):
    """`images` as checked batches of the model's input (one image input of fixed size)."""
    shape = input_shape(model)
    if len(model.inputs) != 1 or shape is None or None in shape:
        raise UnsupportedModelError(f"{model.name} takes input {shape}: the data-aware fit needs one image "
                                    "input of fixed size")
    try:
        source = as_batches(images)
    except (TypeError, ValueError) as error:
        raise DataError(f"calibration images: {error}") from error
    return CheckedBatches(source, shape)


class _Fitter:
    """Fits one chain at a time from its moments, and sets the replacement's weights."""

    def __init__(self, analysis, replacements, clones, calibration):
        self.analysis = analysis
        self.replacements = replacements
        self.clones = clones
        self.rounds = calibration.rounds
        self.progress = calibration.progress
        # the 2022 variant's padded groups overlap: no free channel order to choose
        regroup = not any(_is_padded(chain) for chain in analysis.chains.values())
        self.regions = {}  # id(conv) -> Region
        if regroup:
            for level in graph_levels(analysis.model):
                self.regions.update(find_regions(Graph(level), analysis))
        self.orders = {}  # id(Region) -> channel order chosen at its first chain
        self.results = {}

    def fit(self, step, moments):
        started = time.time()
        chain = step.chain
        entry = chain.entry
        replacement = self.replacements[id(chain.conv)]
        stats = ChainStats.from_moments(*moments)
        linear = chain.act is None and chain.conv.activation is keras.activations.linear
        intercept = chain.bn is not None or chain.conv.use_bias
        target = folded_map(chain.conv, chain.bn)
        options = dict(intercept=intercept, fit_l=entry.second_conv and linear, grouping=_grouping(chain))
        padded = _is_padded(chain)  # the 2022 variant: no interleave on the output
        positions = np.arange(entry.filters) if entry.second_conv or padded else output_order(entry)
        try:
            fitter = ChainFit(stats, target, entry.groups, order=positions, **options)
        except ValueError as error:  # non-finite statistics: the activations overflowed
            raise DataError(f"{step.name}: cannot fit on these calibration images ({error})") from None
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
        self.results[step.name] = {"relative_error": fit.relative_error, "slices_error": slices,
                                   "regrouped": bool(np.any(channel_order != np.arange(entry.filters))),
                                   "fit_time_s": round(time.time() - started, 3)}
        if self.progress is not None:
            self.progress(step.name, fit.relative_error)

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


def graph_levels(model):
    """The Functional views of `model` and of every graph model nested in it."""
    view = functional_view(model)
    levels = [view]
    for node in Graph(view).nodes:
        if is_graph_model(node.operation):
            levels += graph_levels(node.operation)
    return levels


def _is_padded(chain):
    """Whether the chain is replaced by the 2022 variant's padded grouped convs."""
    return bool(chain.new_layer("k").channels_per_group)


def _grouping(chain):
    entry = chain.entry
    if _is_padded(chain):
        return PaddedGrouping(entry.in_channels, entry.filters, chain.new_layer("k").channels_per_group)
    return BlockGrouping(entry.in_channels, entry.filters, entry.groups)
