"""Parameter budgets: measure a model, compare it with limits, say by how much it passes or fails.

Pure functions over plain data, shared by `keffconvert check` (CLI, exit 1 when over budget) and
`keffconvert.testing.assert_within_budget` (pytest). Nothing here trains or converts a model: a
model is measured as it is, or, with `as_converted=True`, as `convert(..., dry_run=True)` says it
would be after conversion (the plan's "after" totals; no layer is built).

Limits (the same keys in a budget file, on the command line and as keyword arguments, with `-`
or `_`):

    max-params        trainable parameters <= N
    max-total-params  all parameters (trainable + batch-norm statistics etc.) <= N
    max-macs          multiply-accumulates per image <= N (needs a fixed input size)
    min-reduction     trainable-parameter reduction vs `baseline`, in percent, >= PCT
    baseline          the model `min-reduction` compares against (file or built-in name);
                      with `as-converted` it defaults to the model itself, unconverted
    as-converted      measure the model as keffconvert would convert it (true/false)
    channels-per-group  cpg for `as-converted` (default 16)

A budget file is a `pyproject.toml` with a `[tool.keffconvert.budget]` table, or a small TOML or
JSON file holding those keys at its top level (or under tool.keffconvert.budget).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keffconvert.errors import BudgetConfigError, UnsupportedModelError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LIMIT_KEYS = ("max-params", "max-total-params", "max-macs", "min-reduction")
SETTING_KEYS = ("baseline", "as-converted", "channels-per-group")
BUDGET_KEYS = LIMIT_KEYS + SETTING_KEYS
PYPROJECT_TABLE = "[tool.keffconvert.budget]"

_WHAT = {
    "max-params": "trainable parameters",
    "max-total-params": "parameters",
    "max-macs": "multiply-accumulates per image",
    "min-reduction": "trainable-parameter reduction",
}
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


# ---------------------------------------------------------------------------------------------
# Budgets


@dataclass
class Budget:
    """Limits plus how to measure; None means "not limited"."""

    max_params: int | None = None
    max_total_params: int | None = None
    max_macs: int | None = None
    min_reduction: float | None = None
    baseline: str | None = None  # a model path or built-in name
    as_converted: bool = False
    channels_per_group: int = 16
    source: str | None = None  # where the file values came from, for messages

    @property
    def limits(self):
        """{key: bound} of the limits that are set, in LIMIT_KEYS order."""
        values = {key: getattr(self, _attr(key)) for key in LIMIT_KEYS}
        return {key: value for key, value in values.items() if value is not None}

    def merged(self, overrides):
        """A copy with every non-None value of `overrides` ({key or attr: value}) replacing ours."""
        data = asdict(self)
        for key, value in overrides.items():
            if value is not None:
                data[_attr(key)] = value
        return Budget(**data)


def _attr(key):
    return key.replace("-", "_")


def parse_count(value, key="value"):
    """A non-negative whole number: 700000, "700_000", "700,000", "700k", "4.5M", "1.2G"."""
    if isinstance(value, bool):
        raise BudgetConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise BudgetConfigError(f"{key}: expected a whole number, got {value!r}")
        number = int(value)
    elif isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "").lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgb]?)", text)
        if not match:
            raise BudgetConfigError(f"{key}: expected a count such as 700000 or 4.5M, got {value!r}")
        scaled = float(match.group(1)) * _SUFFIXES.get(match.group(2), 1)
        if scaled != int(scaled):
            raise BudgetConfigError(f"{key}: {value!r} is not a whole number")
        number = int(scaled)
    else:
        raise BudgetConfigError(f"{key}: expected a number, got {value!r}")
    if number < 0:
        raise BudgetConfigError(f"{key}: must be >= 0, got {value!r}")
    return number


def parse_percent(value, key="min-reduction"):
    """A percentage in [0, 100]: 80, 80.5, "80%"."""
    if isinstance(value, str):
        value = value.strip().rstrip("%").strip()
        try:
            value = float(value)
        except ValueError:
            raise BudgetConfigError(f"{key}: expected a percentage such as 80 or 80.5, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetConfigError(f"{key}: expected a percentage, got {value!r}")
    if not 0 <= value <= 100:
        raise BudgetConfigError(f"{key}: must be between 0 and 100, got {value!r}")
    return float(value)


def budget_from_mapping(data, source="budget"):
    """Validate a {key: value} mapping (keys with '-' or '_') into a Budget; unknown keys fail."""
    if not isinstance(data, dict):
        raise BudgetConfigError(f"{source}: the budget must be a table of keys, got {type(data).__name__}")
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("_", "-").lower()
        if key not in BUDGET_KEYS:
            raise BudgetConfigError(f"{source}: unknown budget key {raw_key!r} (known: {', '.join(BUDGET_KEYS)})")
        where = f"{source}: {key}"
        if key in ("max-params", "max-total-params", "max-macs"):
            values[key] = parse_count(value, where)
        elif key == "min-reduction":
            values[key] = parse_percent(value, where)
        elif key == "baseline":
            if not isinstance(value, str) or not value.strip():
                raise BudgetConfigError(f"{where}: expected a model path or built-in name, got {value!r}")
            values[key] = value
        elif key == "as-converted":
            if not isinstance(value, bool):
                raise BudgetConfigError(f"{where}: expected true or false, got {value!r}")
            values[key] = value
        else:  # channels-per-group
            cpg = parse_count(value, where)
            if cpg < 1:
                raise BudgetConfigError(f"{where}: must be >= 1, got {value!r}")
            values[key] = cpg
    return Budget(source=source).merged(values)


def read_budget_file(path, required=True):
    """The budget in `path`: `[tool.keffconvert.budget]` of a pyproject.toml, or a small TOML or
    JSON file with the keys at its top level. A relative `baseline` that names an existing file
    beside the budget file is resolved against that folder.

    Returns None when `required` is False and the file or its table is absent.
    """
    path = Path(path)
    if not path.is_file():
        if not required:
            return None
        raise BudgetConfigError(f"budget file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BudgetConfigError(f"budget file {path}: cannot read it: {error}") from error
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise BudgetConfigError(f"budget file {path}: not valid JSON: {error}") from error
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise BudgetConfigError(f"budget file {path}: not valid TOML: {error}") from error
    if not isinstance(data, dict):
        raise BudgetConfigError(f"budget file {path}: expected a table/object at the top level")
    table = data
    for key in ("tool", "keffconvert", "budget"):
        table = table.get(key) if isinstance(table, dict) else None
    if table is None:
        if "tool" in data or "project" in data or "build-system" in data or path.name == "pyproject.toml":
            if not required:
                return None
            raise BudgetConfigError(f"budget file {path}: no {PYPROJECT_TABLE} table")
        table, where = data, str(path)
    else:
        where = f"{path} {PYPROJECT_TABLE}"
    budget = budget_from_mapping(table, source=where)
    if budget.baseline and not Path(budget.baseline).is_absolute():
        beside = path.parent / budget.baseline
        if beside.exists() and path.parent.resolve() != Path.cwd().resolve():
            budget.baseline = str(beside)  # a committed baseline beside its budget file
    return budget


def require_limits(budget):
    """Refuse a budget with no limit at all: checking nothing must not look like a pass."""
    if not budget.limits:
        raise BudgetConfigError(
            "no limits given: pass --max-params, --max-total-params, --max-macs or --min-reduction, "
            f"or --budget FILE, or add a {PYPROJECT_TABLE} table to ./pyproject.toml"
        )
    if budget.min_reduction is not None and budget.baseline is None and not budget.as_converted:
        raise BudgetConfigError(
            "min-reduction needs a baseline to compare with: pass --baseline MODEL "
            "(or --as-converted to compare with the model before conversion)"
        )
    return budget


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    """What a budget can limit, for one model."""

    model_name: str
    trainable_params: int
    total_params: int
    macs: int | None = None
    input_shape: list | None = None
    as_converted: bool = False
    channels_per_group: int | None = None
    # the unconverted model's trainable parameters, when measured as converted
    trainable_params_original: int | None = None

    def to_dict(self):
        return asdict(self)


def _check_measurable(model):
    import keras

    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Keras model")
    if not model.built:
        raise UnsupportedModelError(
            f"model {model.name!r} is not built, so it has no parameters to count; "
            "give it an input shape (keras.Input(shape=...)) or call it once"
        )


def measure(model, *, as_converted=False, channels_per_group=16, macs=True):
    """Count `model`'s trainable and total parameters and (if `macs`) its MACs per image.

    With `as_converted`, the counts are those keffconvert's conversion would give (a dry run:
    the model is analysed, nothing is built or trained). MACs are None when the input size is
    not fixed (or the model has no layer graph).
    """
    _check_measurable(model)
    if as_converted:
        from keffconvert.plan.analysis import analyze

        plan = analyze(model, channels_per_group).plan
        return Measurement(
            model_name=model.name, trainable_params=plan.trainable_params_after,
            total_params=plan.total_params_after, macs=plan.macs_after,
            input_shape=plan.input_shape, as_converted=True, channels_per_group=channels_per_group,
            trainable_params_original=plan.trainable_params_before,
        )
    from keffconvert.graph.model_info import count_params, input_shape

    count = None
    if macs:
        from keffconvert.graph.view import is_graph_model
        from keffconvert.graph.macs import model_macs

        if is_graph_model(model):
            count = model_macs(model)
    trainable, total = count_params(model)
    shape = input_shape(model)
    return Measurement(model_name=model.name, trainable_params=trainable, total_params=total, macs=count,
                       input_shape=None if shape is None else list(shape))


def reduction_pct(trainable, baseline_trainable):
    """Percent fewer trainable parameters than the baseline (negative when larger)."""
    if not baseline_trainable:
        raise UnsupportedModelError("the baseline model has no trainable parameters to compare with")
    return 100.0 * (1 - trainable / baseline_trainable)


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Verdict:
    """One limit's outcome."""

    limit: str  # a LIMIT_KEYS key
    bound: float
    actual: float
    passed: bool
    detail: dict = field(default_factory=dict)

    @property
    def margin(self):
        """How far inside the limit (positive) or past it (negative), in the limit's unit."""
        if self.limit == "min-reduction":
            return self.actual - self.bound
        return self.bound - self.actual

    def message(self):
        """`PASS max-params: 639,702 <= 700,000 (60,298 to spare)` and its FAIL counterpart."""
        status = "PASS" if self.passed else "FAIL"
        if self.limit == "min-reduction":
            base, mine = self.detail.get("baseline_trainable_params"), self.detail.get("trainable_params")
            counts = f"; {mine:,} vs {base:,} in {self.detail.get('baseline')}" if base is not None else ""
            if self.passed:
                return (f"{status} min-reduction: {self.actual:.2f}% >= {self.bound:.2f}% "
                        f"({self.margin:.2f} points to spare{counts})")
            return (f"{status} min-reduction: {self.actual:.2f}% < {self.bound:.2f}% "
                    f"(short by {-self.margin:.2f} points{counts})")
        actual, bound = int(self.actual), int(self.bound)
        if self.passed:
            return f"{status} {self.limit}: {actual:,} <= {bound:,} ({bound - actual:,} to spare)"
        over = actual - bound
        pct = f", +{100.0 * over / bound:.1f}%" if bound else ""
        return f"{status} {self.limit}: {actual:,} > {bound:,} (over by {over:,}{pct})"

    def failure_text(self):
        """A sentence for an AssertionError: the limit, the actual value, and by how much."""
        what = _WHAT[self.limit]
        if self.limit == "min-reduction":
            return (f"{what} is {self.actual:.2f}%, below min_reduction={self.bound:.2f}% "
                    f"by {-self.margin:.2f} percentage points")
        over = int(self.actual - self.bound)
        pct = f", +{100.0 * over / self.bound:.1f}%" if self.bound else ""
        return (f"{what}: {int(self.actual):,} exceeds {_attr(self.limit)}={int(self.bound):,} "
                f"by {over:,}{pct}")

    def to_dict(self):
        data = {"limit": self.limit, "bound": self.bound, "actual": self.actual,
                "passed": self.passed, "margin": self.margin}
        if self.limit == "min-reduction":
            data["bound"], data["actual"] = round(self.bound, 4), round(self.actual, 4)
            data["margin"] = round(self.margin, 4)
        data.update(self.detail)
        return data


def evaluate(measurement, budget, baseline=None):
    """One Verdict per limit set in `budget`, in LIMIT_KEYS order.

    `baseline` is the baseline's Measurement, needed for min-reduction unless the measurement
    was taken as converted (then the unconverted model is the baseline).
    """
    verdicts = []
    for key, bound in budget.limits.items():
        if key == "max-params":
            verdicts.append(_at_most(key, bound, measurement.trainable_params))
        elif key == "max-total-params":
            verdicts.append(_at_most(key, bound, measurement.total_params))
        elif key == "max-macs":
            if measurement.macs is None:
                raise UnsupportedModelError(
                    f"model {measurement.model_name!r}: multiply-accumulates are unknown because its "
                    "input size is not fixed (or it has no layer graph); give a fixed input size "
                    "(--input-size for a built-in name) or drop max-macs"
                )
            verdicts.append(_at_most(key, bound, measurement.macs))
        else:
            if baseline is not None:
                base, label = baseline.trainable_params, budget.baseline or baseline.model_name
            elif measurement.trainable_params_original is not None:
                base, label = measurement.trainable_params_original, "the unconverted model"
            else:
                raise BudgetConfigError("min-reduction needs a baseline model to compare with")
            actual = reduction_pct(measurement.trainable_params, base)
            verdicts.append(Verdict(key, float(bound), actual, actual >= bound,
                                    {"baseline": str(label), "baseline_trainable_params": base,
                                     "trainable_params": measurement.trainable_params}))
    return verdicts


def _at_most(key, bound, actual):
    return Verdict(key, int(bound), int(actual), actual <= bound)


def summary_line(verdicts):
    failed = [v for v in verdicts if not v.passed]
    if not failed:
        return f"within budget: {len(verdicts)} of {len(verdicts)} limits met"
    return f"over budget: {len(failed)} of {len(verdicts)} limits failed ({', '.join(v.limit for v in failed)})"


def report_dict(model_label, measurement, budget, verdicts, baseline=None):
    """The JSON object `keffconvert check --format json` prints."""
    return {
        "model": model_label,
        "measured": measurement.to_dict(),
        "baseline": None if baseline is None else {"model": budget.baseline, **baseline.to_dict()},
        "limits": budget.limits,
        "budget_source": budget.source,
        "checks": [v.to_dict() for v in verdicts],
        "passed": all(v.passed for v in verdicts),
        "failed": [v.limit for v in verdicts if not v.passed],
    }


def check_model(model, budget, baseline_model=None):
    """Measure `model` (and `baseline_model` if min-reduction needs it) and evaluate `budget`.

    Returns (measurement, baseline_measurement or None, verdicts).
    """
    require_limits(budget)
    measurement = measure(model, as_converted=budget.as_converted,
                          channels_per_group=budget.channels_per_group)
    baseline = None
    if budget.min_reduction is not None and baseline_model is not None:
        baseline = measure(baseline_model, macs=False)
    return measurement, baseline, evaluate(measurement, budget, baseline)
