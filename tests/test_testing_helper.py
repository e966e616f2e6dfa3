"""`keffconvert.testing.assert_within_budget`: the pytest helper over keffconvert.check.budget."""

import keras
import pytest
from conftest import count, small_cnn

from keffconvert.errors import InputError
from keffconvert.testing import assert_within_budget


@pytest.fixture(scope="module")
def model():
    return small_cnn()


def test_within_budget_returns_the_verdicts(model):
    n = count(model.trainable_weights)
    verdicts = assert_within_budget(model, max_params=n, max_total_params=count(model.weights))
    assert [(v.limit, v.actual, v.passed) for v in verdicts] == [
        ("max-params", n, True), ("max-total-params", count(model.weights), True)]


def test_over_budget_message_names_limit_actual_and_excess(model):
    n = count(model.trainable_weights)
    with pytest.raises(AssertionError) as info:
        assert_within_budget(model, max_params=n - 10, max_total_params=10**9)
    message = str(info.value)
    assert f"model '{model.name}' is over budget" in message
    assert f"trainable parameters: {n:,} exceeds max_params={n - 10:,} by 10," in message
    assert "max_total_params" not in message  # only the failing limits


def test_every_failing_limit_is_listed(model):
    with pytest.raises(AssertionError) as info:
        assert_within_budget(model, max_params=1, max_total_params=1, max_macs=1)
    message = str(info.value)
    assert "max_params=1" in message and "max_total_params=1" in message and "max_macs=1" in message


def test_min_reduction_against_a_baseline_model(model):
    bigger = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4000)], name="bigger")
    expected = 100 * (1 - count(model.trainable_weights) / count(bigger.trainable_weights))
    assert_within_budget(model, min_reduction=expected - 0.01, baseline=bigger)
    with pytest.raises(AssertionError, match=r"below min_reduction=\d+\.\d+% by 0\.0[12] percentage points"):
        assert_within_budget(model, min_reduction=expected + 0.015, baseline=bigger)


def test_as_converted_uses_the_conversion_plan(model):
    import keffconvert

    _, plan = keffconvert.convert(model, dry_run=True, channels_per_group=8)
    assert_within_budget(model, max_params=plan.trainable_params_after, as_converted=True, channels_per_group=8)
    with pytest.raises(AssertionError, match="as converted"):
        assert_within_budget(model, max_params=plan.trainable_params_after - 1, as_converted=True,
                             channels_per_group=8)
    assert_within_budget(model, min_reduction=plan.reduction_pct - 0.001, as_converted=True, channels_per_group=8)


def test_paths_and_builtin_names(model, tmp_path):
    path = tmp_path / "m.keras"
    model.save(path)
    assert_within_budget(str(path), max_params=count(model.trainable_weights))
    assert_within_budget("efficientnetb0", max_params=700_000, classes=10, input_size=32, as_converted=True)
    with pytest.raises(InputError):
        assert_within_budget(str(tmp_path / "missing.keras"), max_params=10**9)


def test_no_limit_is_an_error_not_a_pass(model):
    with pytest.raises(ValueError, match="at least one"):
        assert_within_budget(model)
    with pytest.raises(ValueError, match="baseline"):
        assert_within_budget(model, min_reduction=10)
