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

from dataclasses import dataclass

import numpy as np

from keffconvert.errors import BudgetConfigError
from keffconvert.plan.analysis import analyze
from keffconvert.target.select import Candidate, Option, Selection, select_greedy, select_lagrangian, uniform_plan
from keffconvert.target.sensitivity import data_sensitivity, kernel_sensitivity


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


def choose(model, target, *, calibration=None, include=None, exclude=None):
    """Pick every eligible conv's option so the converted model fits `target` (a
    `keffconvert.Target`) at the least cost; `calibration` (a `keffconvert.Calibration` or None)
    measures the cost by the data-aware fit.

    Returns a `Choice`; `BudgetConfigError` (exit 2) when even the most compressed plan is over
    the budget.
    """
    target_params, target_reduction, method = target.params, target.reduction, target.method
    choices = list(target.choices)
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
        samples = data_sensitivity(base, candidates, calibration)
        sensitivity = {"kind": "data-aware fit", "samples": samples, "time_s": round(_now() - started, 2)}
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


def _summary(selection):
    return {"trainable_params_after": selection.params_after, "cost": round(selection.cost, 6),
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in selection.detail.items()}}


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


def _now():
    import time

    return time.time()
