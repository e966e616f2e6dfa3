"""`keffconvert check`: budgets from options and files, exit codes, text and JSON output."""

import json
import math
import re

import keras
import pytest
from click.testing import CliRunner
from conftest import count

from keffconvert.check.budget import (Budget, BudgetConfigError, Verdict, budget_from_mapping, evaluate, measure,
                                parse_count, read_budget_file)
from keffconvert.cli import cli


def tiny_cnn(width=32, name="tiny"):
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", name="stem")(inp)
    x = keras.layers.Conv2D(2 * width, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.Conv2D(width, 1, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(x), name=name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small model, a larger baseline, and files that are not models."""
    folder = tmp_path_factory.mktemp("check")
    small, big = tiny_cnn(16, "small"), tiny_cnn(64, "big")
    paths = {"small": folder / "small.keras", "big": folder / "big.keras"}
    small.save(paths["small"])
    big.save(paths["big"])
    (folder / "broken.keras").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (folder / "broken.h5").write_text("not hdf5")
    paths.update(broken_keras=folder / "broken.keras", broken_h5=folder / "broken.h5",
                 missing=folder / "missing.keras")
    sizes = {"small": count(small.trainable_weights), "small_total": count(small.weights),
             "big": count(big.trainable_weights)}
    return paths, sizes


def run(args, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(cli, ["check", *map(str, args)])


def test_over_budget_exits_1_and_names_the_limit_and_excess(files):
    paths, sizes = files
    limit = sizes["small"] - 100
    result = run([paths["small"], "--max-params", limit])
    assert result.exit_code == 1, result.output
    over = sizes["small"] - limit
    line = f"FAIL max-params: {sizes['small']:,} > {limit:,} (over by {over:,}, +{100 * over / limit:.1f}%)"
    assert line in result.stdout
    assert "over budget: 1 of 1 limits failed (max-params)" in result.stdout


def test_within_budget_exits_0(files):
    paths, sizes = files
    result = run([paths["small"], "--max-params", sizes["small"], "--max-total-params", "1M"])
    assert result.exit_code == 0, result.output
    assert f"PASS max-params: {sizes['small']:,} <= {sizes['small']:,} (0 to spare)" in result.stdout
    assert f"PASS max-total-params: {sizes['small_total']:,} <= 1,000,000" in result.stdout
    assert "within budget: 2 of 2 limits met" in result.stdout


def test_one_failing_limit_of_several_fails_the_check(files):
    paths, sizes = files
    result = run([paths["small"], "--max-params", "1M", "--max-total-params", 10])
    assert result.exit_code == 1
    assert "PASS max-params" in result.stdout and "FAIL max-total-params" in result.stdout


@pytest.mark.parametrize("which", ["missing", "broken_keras", "broken_h5"])
def test_unreadable_model_is_exit_3_never_a_pass(files, which):
    paths, _ = files
    result = run([paths[which], "--max-params", "1G"])
    assert result.exit_code == 3, result.output
    assert "PASS" not in result.stdout and "within budget" not in result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("keffconvert: error: ")


def test_unknown_builtin_name_is_exit_3(files):
    result = run(["efficientnet-b99", "--max-params", "1G"])
    assert result.exit_code == 3


def test_unreadable_baseline_is_exit_3(files):
    paths, _ = files
    result = run([paths["small"], "--min-reduction", 10, "--baseline", paths["missing"]])
    assert result.exit_code == 3


def test_no_limits_is_a_one_line_usage_error(files, tmp_path, monkeypatch):
    paths, _ = files
    result = run([paths["small"]], cwd=tmp_path, monkeypatch=monkeypatch)  # no ./pyproject.toml here
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no limits given" in result.stderr


def test_pyproject_without_budget_table_is_no_limits(files, tmp_path, monkeypatch):
    paths, _ = files
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    result = run([paths["small"]], cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "no limits given" in result.stderr


def test_missing_model_with_no_limits_is_still_not_a_pass(files, tmp_path, monkeypatch):
    paths, _ = files
    result = run([paths["missing"]], cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code not in (0, 1)


def test_budget_from_pyproject_in_the_working_directory(files, tmp_path, monkeypatch):
    paths, sizes = files
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.keffconvert.budget]\n'
        f'max-params = {sizes["small"] - 1}\nmax-total-params = "1M"\n')
    result = run([paths["small"]], cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 1, result.output
    assert "budget from pyproject.toml [tool.keffconvert.budget]" in result.stdout
    assert f"FAIL max-params: {sizes['small']:,} > {sizes['small'] - 1:,} (over by 1," in result.stdout
    assert "PASS max-total-params" in result.stdout


def test_command_line_overrides_the_budget_file(files, tmp_path):
    paths, sizes = files
    budget = tmp_path / "budget.toml"
    budget.write_text(f"max-params = {sizes['small'] - 1}\nmax-total-params = 10\n")
    result = run([paths["small"], "--budget", budget, "--max-params", "1M", "--max-total-params", "1M"])
    assert result.exit_code == 0, result.output
    assert "PASS max-params" in result.stdout and "budget from " in result.stdout


def test_flags_alone_do_not_read_pyproject(files, tmp_path, monkeypatch):
    paths, _ = files
    (tmp_path / "pyproject.toml").write_text("[tool.keffconvert.budget]\nmax-total-params = 10\n")
    result = run([paths["small"], "--max-params", "1M"], cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 0 and "max-total-params" not in result.stdout


def test_json_budget_file_and_json_output(files, tmp_path):
    paths, sizes = files
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"max_params": sizes["small"] + 5, "max-macs": 10}))
    result = run([paths["small"], "--budget", budget, "--format", "json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["failed"] == ["max-macs"]
    assert report["limits"] == {"max-params": sizes["small"] + 5, "max-macs": 10}
    assert report["measured"]["trainable_params"] == sizes["small"]
    params, macs = report["checks"]
    assert params == {"limit": "max-params", "bound": sizes["small"] + 5, "actual": sizes["small"],
                      "passed": True, "margin": 5}
    assert macs["limit"] == "max-macs" and macs["passed"] is False and macs["actual"] == report["measured"]["macs"]


@pytest.mark.parametrize("content, message", [
    ("max-params = [", "not valid TOML"),
    ("max_parameters = 5", "unknown budget key"),
    ('max-params = "lots"', "max-params"),
    ("min-reduction = 120", "between 0 and 100"),
])
def test_bad_budget_file_is_a_usage_error(files, tmp_path, content, message):
    paths, _ = files
    budget = tmp_path / "budget.toml"
    budget.write_text(content + "\n")
    result = run([paths["small"], "--budget", budget])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_missing_budget_file_is_a_usage_error(files, tmp_path):
    paths, _ = files
    result = run([paths["small"], "--budget", tmp_path / "nope.toml"])
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_min_reduction_against_a_baseline(files):
    paths, sizes = files
    expected = 100 * (1 - sizes["small"] / sizes["big"])
    ok = run([paths["small"], "--min-reduction", math.floor(expected), "--baseline", paths["big"]])
    assert ok.exit_code == 0, ok.output
    assert re.search(rf"PASS min-reduction: {expected:.2f}% >= {math.floor(expected):.2f}% ", ok.stdout)
    bad = run([paths["small"], "--min-reduction", 99, "--baseline", paths["big"], "--format", "json"])
    assert bad.exit_code == 1
    check = json.loads(bad.stdout)["checks"][0]
    assert check["limit"] == "min-reduction" and check["passed"] is False
    assert check["actual"] == pytest.approx(expected, abs=1e-3)
    assert check["baseline_trainable_params"] == sizes["big"]


def test_min_reduction_without_baseline_is_a_usage_error(files):
    paths, _ = files
    result = run([paths["small"], "--min-reduction", 50])
    assert result.exit_code == 2 and "baseline" in result.stderr


def test_max_macs_needs_a_fixed_input_size(tmp_path):
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.Conv2D(8, 1)(inp))
    model.save(tmp_path / "free.keras")
    result = run([tmp_path / "free.keras", "--max-macs", "1G"])
    assert result.exit_code == 4 and "input size" in result.stderr


def test_builtin_as_converted_matches_the_paper(b0_small):
    result = run(["efficientnetb0", "--classes", 10, "--input-size", 32, "--as-converted",
                  "--max-params", "700k", "--min-reduction", 84])
    assert result.exit_code == 0, result.output
    assert "PASS max-params: 639,702 <= 700,000 (60,298 to spare)" in result.stdout
    assert "PASS min-reduction: 84.09% >= 84.00%" in result.stdout


def test_counts_accept_suffixes_and_separators():
    assert parse_count("700k") == 700_000 and parse_count("4.5M") == 4_500_000
    assert parse_count("700_000") == parse_count("700,000") == parse_count(700000) == 700_000
    for bad in ("1.5", "-3", True, "x", 2.5):
        with pytest.raises(BudgetConfigError):
            parse_count(bad)


def test_pure_functions_measure_and_evaluate():
    model = tiny_cnn(64)
    m = measure(model)
    assert m.trainable_params == count(model.trainable_weights) and m.total_params == count(model.weights)
    converted = measure(model, as_converted=True)
    assert converted.trainable_params < m.trainable_params == converted.trainable_params_original
    budget = budget_from_mapping({"max-params": m.trainable_params - 1, "min-reduction": 10, "as-converted": True})
    assert budget == Budget(max_params=m.trainable_params - 1, min_reduction=10.0, as_converted=True, source="budget")
    verdicts = evaluate(converted, budget)
    assert [v.limit for v in verdicts] == ["max-params", "min-reduction"] and all(v.passed for v in verdicts)
    assert Verdict("max-params", 700_000, 812_000, False).message() == \
        "FAIL max-params: 812,000 > 700,000 (over by 112,000, +16.0%)"
    assert Verdict("max-params", 700_000, 639_702, True).message() == \
        "PASS max-params: 639,702 <= 700,000 (60,298 to spare)"


def test_read_budget_file_finds_the_pyproject_table(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n[tool.keffconvert.budget]\nmax-macs = "3M"\nbaseline = "resnet50"\n')
    budget = read_budget_file(path)
    assert budget.max_macs == 3_000_000 and budget.baseline == "resnet50"
    path.write_text('[project]\nname = "x"\n')
    assert read_budget_file(path, required=False) is None
    with pytest.raises(BudgetConfigError, match=r"no \[tool.keffconvert.budget\] table"):
        read_budget_file(path)
