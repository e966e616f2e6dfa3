"""Choosing one option per conv under a parameter budget: the Lagrangian knapsack and AIMET's
greedy threshold, and the uniform cpg they are compared with (`keffconvert.target.choose`)."""

from dataclasses import dataclass, field


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


def totals(candidates, picks, before):
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
    params, cost = totals(candidates, picks, before)
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
        params, cost = totals(candidates, picks, before)
        if params - before <= allowed:
            return Selection("greedy", picks, params, cost, {"threshold": threshold})
    raise RuntimeError("no threshold meets the budget")  # excluded by choose's feasibility check


def uniform_plan(candidates, choices, allowed, before):
    """The least compressed single cpg that meets the budget, for comparison (None when none does)."""
    for cpg in sorted(choices, reverse=True):
        picks = [c.by_cpg.get(cpg, 0) for c in candidates]
        params, cost = totals(candidates, picks, before)
        if params - before <= allowed:
            return {"cpg": cpg, "trainable_params_after": params, "cost": round(cost, 6)}
    return None
