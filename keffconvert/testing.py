"""Test helpers: keep a model inside its parameter budget from your own test suite.

    from keffconvert.testing import assert_within_budget

    def test_model_stays_small():
        model = build_my_model()
        assert_within_budget(model, max_params=700_000, max_macs="5M")

The same limits and messages as `keffconvert check` (both use `keffconvert.check.budget`).
"""

from keffconvert.check.budget import budget_from_mapping, check_model

__all__ = ["assert_within_budget"]


def _as_model(model, classes, input_size, unsafe):
    import keras

    if isinstance(model, keras.Model):
        return model
    from keffconvert.loading import load_model

    return load_model(model, unsafe=unsafe, classes=classes, input_size=input_size)


def assert_within_budget(model, max_params=None, max_total_params=None, max_macs=None, min_reduction=None,
                         baseline=None, *, as_converted=False, channels_per_group=16, classes=None,
                         input_size=None, unsafe=False):
    """Raise AssertionError naming every limit `model` exceeds, its actual value and the excess.

    Args:
        model: a `keras.Model`, a model file path (.keras/.h5) or a built-in name.
        max_params: most trainable parameters allowed.
        max_total_params: most parameters allowed, non-trainable included.
        max_macs: most multiply-accumulates per image (the model needs a fixed input size).
        min_reduction: least trainable-parameter reduction vs `baseline`, in percent.
        baseline: a `keras.Model`, path or built-in name for `min_reduction`; with
            `as_converted` it defaults to `model` itself, unconverted.
        as_converted: measure `model` as `keffconvert.convert` would convert it (a dry run).
        channels_per_group: cpg for `as_converted`.
        classes, input_size, unsafe: passed to the loader for a path or built-in name.

    Returns:
        The list of `keffconvert.check.budget.Verdict`s (all passed).

    Raises:
        AssertionError: a limit is exceeded.
        ValueError: no limit given, or a limit is malformed (a budget that checks nothing must
            not pass silently).
        keffconvert.errors.InputError / UnsupportedModelError: the model cannot be read or measured.
    """
    from keffconvert.check.budget import BudgetConfigError, require_limits

    settings = {"max-params": max_params, "max-total-params": max_total_params, "max-macs": max_macs,
                "min-reduction": min_reduction, "as-converted": as_converted,
                "channels-per-group": channels_per_group}
    baseline_label = None
    if baseline is not None:
        baseline_label = baseline if isinstance(baseline, str) else getattr(baseline, "name", "baseline")
        settings["baseline"] = str(baseline_label)
    if all(v is None for v in (max_params, max_total_params, max_macs, min_reduction)):
        raise ValueError("assert_within_budget: give at least one of max_params, max_total_params, "
                         "max_macs, min_reduction")
    try:
        budget = require_limits(budget_from_mapping({k: v for k, v in settings.items() if v is not None},
                                                    source="arguments"))
    except BudgetConfigError as error:
        raise ValueError(f"assert_within_budget: {error}") from None
    loaded = _as_model(model, classes, input_size, unsafe)
    base_model = None
    if min_reduction is not None and baseline is not None:
        base_model = _as_model(baseline, classes, input_size, unsafe)
    measurement, _, verdicts = check_model(loaded, budget, base_model)
    failed = [v for v in verdicts if not v.passed]
    if failed:
        how = " as converted" if measurement.as_converted else ""
        lines = [f"model {measurement.model_name!r}{how} is over budget:"]
        lines += [f"  {v.failure_text()}" for v in failed]
        raise AssertionError("\n".join(lines))
    return verdicts
