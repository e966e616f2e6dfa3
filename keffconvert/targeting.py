"""A parameter budget as the input: which convs to convert, and at which channels per group.

Given a target (trainable parameters, or a reduction in percent), every eligible pointwise conv
gets one option out of "not converted" and the groups that the candidate cpgs (4, 8, 16, 32, 64
by default) give it. Choosing is a knapsack over those options:

* Parameters. Each option's change of trainable parameters comes from `analyze` at that cpg,
  so the chosen plan's total is exactly what the rewrite builds (a conv's count depends on its
  own groups only).
* Sensitivity, the cost of an option: the relative error of the conv's output (pre-activation,
  batch norm folded) under that option, 0 when not converted.
  - With calibration images: the data-aware fit (`keffconvert.fit.ChainFit`: K, then L on
    what K leaves) of the replacement at those groups to the original, fitted on half of the
    images and measured on the other half, from the statistics of the conv's input in the
    original network (each conv alone, the others left as they are: the question AIMET asks
    per layer), with the regrouping of expanded channels the conversion also does
    (`coupling.choose_order`).
  - Without data: the share of the (folded) kernel's energy that the block-diagonal grouping
    drops, in K's filter order. That is the relative error of the plain conversion
    (block-diagonal slices, L at zero) for inputs with uncorrelated unit channels. On an
    untrained model every conv scores about 1 - 1/g, so the choice follows parameters saved.
  The model's cost is the sum of its convs' errors.
* Selection (`method`):
  - "lagrangian" (the default): each conv takes the option minimising
    error + lambda * (parameters, in units of the original's), with lambda bisected to the
    smallest value that meets the budget, then the slack left is spent greedily on the upgrades
    that remove most error per parameter.
  - "greedy": AIMET's greedy per-layer compression-ratio selection (the anchor to beat): one
    error threshold for every conv; each takes its most compressed option within the threshold,
    and the threshold is the smallest that meets the budget. It ignores how many parameters each
    option saves, which is what the Lagrangian weighs.
  The plan's `target` records the chosen total cost against the other method and against the
  uniform cpg that meets the same budget, so the comparison is printed with every plan.
"""

from dataclasses import dataclass, field, replace

import keras
import numpy as np

from keffconvert.analysis import analyze
from keffconvert.errors import BudgetConfigError
from keffconvert.fit import ChainFit, folded_map

CHOICES = (4, 8, 16, 32, 64)
METHODS = ("lagrangian", "greedy")
MAX_PIXELS = 1_000_000  # input pixels per conv whose statistics are kept (as calibrate.py does)


@dataclass
class Option:
    """One way to treat a conv: `cpg` None means not converted."""

    cpg: int | None
    groups: int
    delta: int  # change of trainable parameters (<= 0)
    error: float = 0.0

    def to_dict(self):
        return {"cpg": self.cpg, "groups": self.groups, "trainable_delta": self.delta,
                "error": round(float(self.error), 6)}


@dataclass
class Candidate:
    """An eligible conv, its chain (from the analysis at the smallest cpg) and its options."""

    name: str
    chain: object
    options: list = field(default_factory=list)  # options[0] is "not converted"
    by_cpg: dict = field(default_factory=dict)  # cpg -> index of the option that cpg gives


@dataclass
class Selection:
    """Which option each candidate takes, and the resulting totals."""

    method: str
    picks: list
    params_after: int
    cost: float
    detail: dict = field(default_factory=dict)


@dataclass
class Choice:
    """The outcome: the `per_layer` mapping to convert with, and what the plan records."""

    per_layer: dict
    candidates: list
    selection: Selection
    target: dict


def target_budget(trainable_before, target_params=None, target_reduction=None):
    """The trainable-parameter budget from exactly one of the two ways of stating it."""
    if (target_params is None) == (target_reduction is None):
        raise BudgetConfigError("give exactly one of target_params and target_reduction")
    if target_params is not None:
        if isinstance(target_params, bool) or not isinstance(target_params, (int, np.integer)) or target_params < 1:
            raise BudgetConfigError(f"target_params must be a whole number >= 1, got {target_params!r}")
        return int(target_params)
    if isinstance(target_reduction, bool) or not isinstance(target_reduction, (int, float)) \
            or not 0 <= target_reduction < 100:
        raise BudgetConfigError(f"target_reduction must be a percentage in [0, 100), got {target_reduction!r}")
    return int(np.floor(trainable_before * (1 - target_reduction / 100.0)))


def choose(model, *, target_params=None, target_reduction=None, choices=CHOICES, method="lagrangian",
           calibration=None, include=None, exclude=None):
    """Pick every eligible conv's option so the converted model fits the budget at the least cost.

    Returns a `Choice`; `BudgetConfigError` (exit 2) when even the most compressed plan is over
    the budget.
    """
    if method not in METHODS:
        raise BudgetConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    choices = sorted({int(c) for c in choices})
    if not choices or choices[0] < 1:
        raise BudgetConfigError(f"channels-per-group choices must be >= 1, got {choices}")
    base, candidates = layer_options(model, choices, include, exclude)
    before = base.plan.trainable_params_before
    budget = target_budget(before, target_params, target_reduction)
    smallest = before + sum(min(o.delta for o in c.options) for c in candidates)
    if smallest > budget:
        raise BudgetConfigError(
            f"the budget of {budget:,} trainable parameters cannot be met: the most compressed plan "
            f"(every eligible conv at its fewest parameters among cpg {', '.join(map(str, choices))}) "
            f"keeps {smallest:,} of {before:,}")
    if calibration is not None:
        started = _now()
        data_sensitivity(base, candidates, calibration)
        sensitivity = {"kind": "data-aware fit", "samples": int(len(calibration)), "time_s": round(_now() - started, 2)}
    else:
        kernel_sensitivity(candidates)
        sensitivity = {"kind": "kernel energy outside the groups (no data)"}
    allowed = budget - before
    picked = {"lagrangian": select_lagrangian, "greedy": select_greedy}
    results = {name: select(candidates, allowed, before) for name, select in picked.items()}
    chosen = results[method]
    per_layer = {c.name: c.options[i].cpg for c, i in zip(candidates, chosen.picks)}
    target = {
        "budget_trainable_params": budget,
        "target_params": target_params,
        "target_reduction": target_reduction,
        "choices": choices,
        "method": method,
        "sensitivity": sensitivity,
        "cost": round(chosen.cost, 6),
        "trainable_params_after": chosen.params_after,
        "compared": {name: _summary(result) for name, result in results.items() if name != method},
        "uniform": uniform_plan(candidates, choices, allowed, before),
        **chosen.detail,
    }
    return Choice(per_layer, candidates, chosen, target)


def layer_options(model, choices, include, exclude):
    """(analysis at the smallest cpg, [Candidate]): every conv any choice converts, with its options."""
    analyses = {cpg: analyze(model, cpg, include=include, exclude=exclude) for cpg in choices}
    base = analyses[choices[0]]  # the most groups: every conv some choice converts is converted here
    candidates = []
    for conv_id, chain in base.chains.items():
        candidate = Candidate(chain.entry.name, chain, [Option(None, 1, 0)])
        for cpg in choices:
            other = analyses[cpg].chains.get(conv_id)
            if other is None:
                continue
            entry = other.entry
            found = next((i for i, o in enumerate(candidate.options) if o.groups == entry.groups), None)
            if found is None:
                candidate.options.append(Option(cpg, entry.groups, entry.trainable_after - entry.trainable_before))
                found = len(candidate.options) - 1
            candidate.by_cpg[cpg] = found
        candidates.append(candidate)
    return base, candidates


# -- sensitivity ------------------------------------------------------------------------------------

def kernel_sensitivity(candidates):
    """Data-free: the share of the folded kernel's energy outside the block-diagonal groups."""

    for candidate in candidates:
        chain = candidate.chain
        kernel = folded_map(chain.conv, chain.bn)[:-1]
        total = float(np.sum(kernel ** 2))
        for option in candidate.options[1:]:
            positions = _positions(chain.entry, option.groups)
            mask = _block_mask(kernel.shape[0], kernel.shape[1], option.groups)
            kept = float(np.sum((kernel[:, positions] ** 2) * mask))
            option.error = 1.0 - kept / total if total > 0 else 0.0


def data_sensitivity(analysis, candidates, images, batch_size=64):
    """Data-aware: each option's relative error on held-out images after a fit on the others.

    The statistics of each conv's input are split by image into two halves: the replacement is
    fitted on one and measured on the other, since late layers (one pixel per image at small
    inputs) have more inputs than a few hundred images can pin down, and measured on the images
    it was fitted to they would all look free. The fit is K alone, then L on what K leaves:
    the conversion's full fit only lowers that error further, and this is cheap enough to run
    for every option of every conv.
    """
    from keffconvert.coupling import choose_order

    halves = input_statistics(analysis, images, batch_size=batch_size)
    for candidate in candidates:
        chain = candidate.chain
        entry = chain.entry
        fit_on, measure_on = halves[id(chain.conv)]
        target = folded_map(chain.conv, chain.bn)
        linear = chain.act is None and chain.conv.activation is keras.activations.linear
        options = dict(intercept=chain.bn is not None or chain.conv.use_bias, fit_l=entry.second_conv and linear)
        for option in candidate.options[1:]:
            order = _positions(entry, option.groups)
            if not entry.second_conv:  # an expansion: its filters may be regrouped (coupling.py)
                explained = ChainFit(fit_on, target, option.groups, **options).explained_by_group()
                order = choose_order(explained, option.groups)[order]
            fitter = ChainFit(fit_on, target, option.groups, order=order, **options)
            k = fitter._solve_k_alone(fitter.b)
            l = fitter._solve_l(k) if options["fit_l"] else None
            option.error = held_out_error(fitter.total_map(k, l), target[:, order], measure_on)


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


def input_statistics(analysis, images, batch_size=64):
    """{id(conv): (ChainStats of the even images, of the odd images)}: every chain's input in the
    original network, from one walk over `images`."""
    from keffconvert.calibrate import call_in_batches, split
    from keffconvert.graph import Graph, functional_view, is_graph_model

    stats = {}
    rng = np.random.default_rng(0)

    def run_level(model, inputs):
        view = functional_view(model)
        graph = Graph(view)
        values = {id(t): v for t, v in zip(keras.tree.flatten(view.inputs), inputs)}
        pending = graph.input_uses()
        keep = {id(t) for t in keras.tree.flatten(view.outputs)}
        for node in graph.nodes:
            layer = node.operation
            if is_graph_model(layer):
                outputs = run_level(layer, [values[id(t)] for t in node.input_tensors])
            else:
                chain = analysis.chain_of(layer)
                if chain is not None:
                    x = np.concatenate([keras.ops.convert_to_numpy(b) for b in values[id(node.input_tensors[0])]])
                    stats[id(layer)] = tuple(_statistics(x[half::2], chain.entry.in_channels, rng) for half in (0, 1))
                outputs = call_in_batches(layer, node, values)
            values.update(zip((id(t) for t in node.outputs), outputs))
            for tensor in node.input_tensors:
                pending[id(tensor)] -= 1
                if pending[id(tensor)] == 0 and id(tensor) not in keep:
                    values.pop(id(tensor), None)
        return [values[id(t)] for t in keras.tree.flatten(view.outputs)]

    run_level(analysis.model, [split(images, batch_size)])
    return stats


def _statistics(x, channels, rng):
    """ChainStats of inputs that are the same in both networks (one product serves all three)."""
    from keffconvert.fit import ChainStats

    stats = ChainStats(channels)
    rows = x.reshape(-1, channels)
    if len(rows) > MAX_PIXELS // 2:
        rows = rows[np.sort(rng.choice(len(rows), MAX_PIXELS // 2, replace=False))]
    rows = np.concatenate([rows, np.ones((len(rows), 1), rows.dtype)], axis=1).astype("float64")
    stats.conv = stats.cross = stats.orig = rows.T @ rows
    return stats


def _positions(entry, groups):
    """Which of M's output channels each of K's filters computes at `groups` (weights.output_order)."""
    from keffconvert.weights import output_order

    step = entry.filters // groups
    return output_order(replace(entry, groups=groups, interleave_step=step if step > 1 else None))


def _block_mask(channels, filters, groups):
    rows = np.arange(channels)[:, None] // (channels // groups)
    cols = np.arange(filters)[None, :] // (filters // groups)
    return rows == cols


# -- selection ----------------------------------------------------------------------------------------

def _totals(candidates, picks, before):
    options = [c.options[i] for c, i in zip(candidates, picks)]
    return before + sum(o.delta for o in options), float(sum(o.error for o in options))


def select_lagrangian(candidates, allowed, before):
    """Per conv argmin error + lam * delta / before, lam bisected to just meet `allowed`, then the
    slack spent on the upgrades that remove most error per parameter."""
    scale = float(before or 1)

    def picks_at(lam):
        return [min(range(len(c.options)), key=lambda i, c=c: (c.options[i].error + lam * c.options[i].delta / scale,
                                                               -c.options[i].delta))
                for c in candidates]

    def delta(picks):
        return sum(c.options[i].delta for c, i in zip(candidates, picks))

    lo, hi = 0.0, 1.0
    while delta(picks_at(hi)) > allowed:
        hi *= 2.0
        if hi > 1e15:  # cannot happen once the most compressed plan fits; a guard, not a result
            raise RuntimeError("no multiplier meets the budget")
    if delta(picks_at(lo)) <= allowed:
        hi = lo
    for _ in range(100):
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        if delta(picks_at(mid)) <= allowed:
            hi = mid
        else:
            lo = mid
    picks = picks_at(hi)
    picks = _spend_slack(candidates, picks, allowed)
    params, cost = _totals(candidates, picks, before)
    return Selection("lagrangian", picks, params, cost, {"lambda": hi})


def _spend_slack(candidates, picks, allowed):
    """Move convs to less compressed options while the budget allows, best error saved per parameter first."""
    picks = list(picks)
    used = sum(c.options[i].delta for c, i in zip(candidates, picks))
    while True:
        best = None
        for n, (c, i) in enumerate(zip(candidates, picks)):
            current = c.options[i]
            for j, option in enumerate(c.options):
                extra = option.delta - current.delta
                gain = current.error - option.error
                if extra <= 0 or gain <= 0 or used + extra > allowed:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, n, j, extra)
        if best is None:
            return picks
        _, n, j, extra = best
        picks[n] = j
        used += extra


def select_greedy(candidates, allowed, before):
    """AIMET's greedy selection: the smallest common error threshold under which every conv takes
    its most compressed option and the total fits."""
    for threshold in sorted({o.error for c in candidates for o in c.options}):
        picks = [min((i for i, o in enumerate(c.options) if o.error <= threshold),
                     key=lambda i, c=c: (c.options[i].delta, c.options[i].error)) for c in candidates]
        params, cost = _totals(candidates, picks, before)
        if params - before <= allowed:
            return Selection("greedy", picks, params, cost, {"threshold": threshold})
    raise RuntimeError("no threshold meets the budget")  # excluded by choose's feasibility check


def uniform_plan(candidates, choices, allowed, before):
    """The least compressed single cpg that meets the budget, for comparison (None when none does)."""
    for cpg in sorted(choices, reverse=True):
        picks = [c.by_cpg.get(cpg, 0) for c in candidates]
        params, cost = _totals(candidates, picks, before)
        if params - before <= allowed:
            return {"cpg": cpg, "trainable_params_after": params, "cost": round(cost, 6)}
    return None


def _summary(selection):
    return {"trainable_params_after": selection.params_after, "cost": round(selection.cost, 6),
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in selection.detail.items()}}


# -- the plan ----------------------------------------------------------------------------------------

def annotate(plan, choice):
    """Write each conv's options, its choice and why, and the target summary into `plan`."""
    by_name = {c.name: (c, i) for c, i in zip(choice.candidates, choice.selection.picks)}
    for entry in plan.layers:
        if entry.name not in by_name:
            continue
        candidate, pick = by_name[entry.name]
        entry.options = [o.to_dict() for o in candidate.options]
        entry.choice = _why(candidate, pick)
    plan.target = choice.target


def _why(candidate, pick):
    chosen = candidate.options[pick]
    others = [o for o in candidate.options[1:] if o.delta < 0]  # no selection takes one that saves nothing
    if chosen.cpg is None and not others:
        return "kept: no conversion of it saves trainable parameters"
    if chosen.cpg is None:
        cheapest = max(others, key=lambda o: o.delta)  # the conversion that saves least
        return (f"kept: its mildest conversion (cpg {cheapest.cpg}) would cost error {cheapest.error:.3f} "
                f"to save {-cheapest.delta:,}")
    return f"cpg {chosen.cpg} ({chosen.groups} groups): error {chosen.error:.3f}, saves {-chosen.delta:,}"


def sensitivity_cell(entry):
    """'4:0.62 8:0.48 ...': the error of each option the conv had (for the plan's table)."""
    if not entry.options:
        return "-"
    return " ".join(f"{o['cpg']}:{o['error']:.2f}" for o in entry.options if o["cpg"] is not None)


def _now():
    import time

    return time.time()


def target_lines(target):
    """The budget, how the plan was chosen and what the alternatives would have cost (for the CLI)."""
    stated = (f"{target['target_reduction']:g}% fewer" if target.get("target_reduction") is not None
              else f"{target['target_params']:,}")
    lines = [f"target: {stated} trainable parameters -> at most {target['budget_trainable_params']:,}; "
             f"chosen by {target['method']} on {target['sensitivity']['kind']}: "
             f"{target['trainable_params_after']:,} parameters, sensitivity (sum of layer errors) {target['cost']:.3f}"]
    for name, other in target["compared"].items():
        label = "AIMET-style greedy threshold" if name == "greedy" else name
        lines.append(f"  {label} would give {other['trainable_params_after']:,} parameters at sensitivity "
                     f"{other['cost']:.3f}")
    uniform = target.get("uniform")
    lines.append(f"  uniform cpg {uniform['cpg']} (the least compression that fits) would give "
                 f"{uniform['trainable_params_after']:,} parameters at sensitivity {uniform['cost']:.3f}"
                 if uniform else "  no single cpg of the choices meets this budget")
    return lines
