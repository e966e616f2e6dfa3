"""How much error each option of each conv would cost: from the kernel alone, or from a fit to
calibration images measured on held-out ones (`keffconvert.target.choose` explains both)."""

from dataclasses import replace

import keras
import numpy as np

from keffconvert.fit.solve import ChainFit, ChainStats, folded_map



def kernel_sensitivity(candidates):
    """Data-free: the share of the folded kernel's energy outside the block-diagonal groups."""

    for candidate in candidates:
        chain = candidate.chain
        kernel = folded_map(chain.conv, chain.bn)[:-1]
        total = float(np.sum(kernel ** 2))
        for option in candidate.options[1:]:
            positions = option_positions(chain.entry, option.groups)
            mask = _block_mask(kernel.shape[0], kernel.shape[1], option.groups)
            kept = float(np.sum((kernel[:, positions] ** 2) * mask))
            option.error = 1.0 - kept / total if total > 0 else 0.0


def data_sensitivity(analysis, candidates, calibration):
    """Data-aware: each option's relative error on held-out images after a fit on the others.

    The statistics of each conv's input are split by image into two halves: the replacement is
    fitted on one and measured on the other, since late layers (one pixel per image at small
    inputs) have more inputs than a few hundred images can pin down, and measured on the images
    it was fitted to they would all look free. The fit is K alone, then L on what K leaves:
    the conversion's full fit only lowers that error further, and this is cheap enough to run
    for every option of every conv.
    """
    from keffconvert.fit.coupling import choose_order

    halves, samples = input_statistics(analysis, calibration)
    for candidate in candidates:
        chain = candidate.chain
        entry = chain.entry
        fit_on, measure_on = halves[id(chain.conv)]
        target = folded_map(chain.conv, chain.bn)
        linear = chain.act is None and chain.conv.activation is keras.activations.linear
        options = dict(intercept=chain.bn is not None or chain.conv.use_bias, fit_l=entry.second_conv and linear)
        for option in candidate.options[1:]:
            order = option_positions(entry, option.groups)
            if not entry.second_conv:  # an expansion: its filters may be regrouped (coupling.py)
                explained = ChainFit(fit_on, target, option.groups, **options).explained_by_group()
                order = choose_order(explained, option.groups)[order]
            fitter = ChainFit(fit_on, target, option.groups, order=order, **options)
            k = fitter.solve_k_alone(fitter.b)
            l = fitter.solve_l(k) if options["fit_l"] else None
            option.error = held_out_error(fitter.total_map(k, l), target[:, order], measure_on)
    return samples


def held_out_error(theta, target, stats):
    """sum ||[x,1] theta - [x,1] target||^2 / sum ||z - mean z||^2 over the pixels behind `stats`
    (inputs the same on both sides: the original network's), as `ChainFit.relative_error` counts."""
    moments = stats.conv
    n = moments[-1, -1]
    diff = theta - target
    z_sum = moments[-1] @ target
    spread = np.sum((moments @ target) * target) - z_sum @ z_sum / n  # trace(T' M T) without the F x F product
    error = np.sum((moments @ diff) * diff)
    return float(max(error, 0.0) / spread) if spread > 0 else 0.0


def input_statistics(analysis, calibration):
    """({id(conv): (ChainStats of the even images, of the odd images)}, images): every chain's input
    in the original network, from one compiled walk over the calibration images."""
    from keffconvert.fit.calibrate import calibration_source
    from keffconvert.fit.schedule import schedule
    from keffconvert.fit.store import ValueStore
    from keffconvert.fit.stream import Walk

    source = calibration_source(analysis.model, calibration.images)
    plan = schedule(analysis.model, analysis)
    chains = plan.chain_steps()
    with ValueStore(calibration.memory_limit, calibration.spill_folder) as store:
        moments = Walk(plan, source, chains, store=store, batch_size=calibration.batch_size).run()
    stats = {}
    for step in chains:
        stats[id(plan.steps[step].chain.conv)] = tuple(ChainStats.from_moments(m, m, m) for m in moments[step])
    return stats, len(source)


def option_positions(entry, groups):
    """Which of M's output channels each of K's filters computes at `groups` (weights.output_order)."""
    from keffconvert.rewrite.weights import output_order

    step = entry.filters // groups
    return output_order(replace(entry, groups=groups, interleave_step=step if step > 1 else None))


def _block_mask(channels, filters, groups):
    rows = np.arange(channels)[:, None] // (channels // groups)
    cols = np.arange(filters)[None, :] // (filters // groups)
    return rows == cols
