"""Every exit code means one thing: a bug exits 70 (never 1, which `check` keeps for "over budget"),
with one line on stderr and its traceback only in a log file or with --debug; an export that
disagrees with its source exits 7 and leaves no file behind."""

import re
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import small_cnn

import keffconvert.check.budget
import keffconvert.errors as errors
import keffconvert.export.tflite
import keffconvert.report.fidelity
import keffconvert.loading
import keffconvert.train  # noqa: F401 (defines KeffError subclasses too)
from keffconvert.cli import EXIT_CODES, cli
from keffconvert.commands.export import verify_export


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(autouse=True)
def no_debug_and_private_temp(monkeypatch, tmp_path):
    """No KEFFCONVERT_DEBUG from the caller's shell; crash logs go to this test's folder."""
    monkeypatch.delenv("KEFFCONVERT_DEBUG", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("exit_codes") / "small.keras"
    small_cnn().save(path)
    return path


def boom(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- the table ----------------------------------------------------------------------------------


def all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


def test_one_table_of_codes_and_every_error_class_uses_it():
    codes = [code for code, _ in errors.EXIT_CODES]
    assert len(codes) == len(set(codes))
    assert codes[:3] == [0, 1, 2] and errors.INTERNAL_ERROR == 70 and errors.INTERRUPTED == 130
    for code, meaning in errors.EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+{re.escape(meaning)}$", EXIT_CODES, re.M), code
    documented = set(codes) - {errors.SUCCESS, errors.OVER_BUDGET}
    assert errors.KeffError.exit_code == errors.INTERNAL_ERROR
    subclasses = list(all_subclasses(errors.KeffError))
    assert {"UsageConflict", "BudgetConfigError", "ExportMismatchError"} <= {c.__name__ for c in subclasses}
    for cls in subclasses:
        assert cls.exit_code in documented, cls
    assert keffconvert.check.budget.BudgetConfigError is errors.BudgetConfigError
    help_text = run("--help").output
    assert "Exit codes:" in help_text and "70" in help_text and "--debug" in help_text


# -- unexpected errors --------------------------------------------------------------------------


def test_a_crash_is_one_line_exit_70_and_its_traceback_is_in_a_log(monkeypatch, tmp_path):
    monkeypatch.setattr(keffconvert.loading, "load_model", boom)
    result = run(tmp_path / "m.keras")
    assert result.exit_code == errors.INTERNAL_ERROR, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert "RuntimeError: boom second line" in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in result.output
    log = re.search(r"traceback in (\S+\.log)", lines[0]).group(1)
    assert log.startswith(str(tmp_path / "tmp"))
    text = open(log).read()
    assert "Traceback" in text and "RuntimeError: boom" in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, tmp_path, how):
    monkeypatch.setattr(keffconvert.loading, "load_model", boom)
    if how == "flag":
        result = run("--debug", tmp_path / "m.keras")
    else:
        result = run("check", tmp_path / "m.keras", "--max-params", "1", env={"KEFFCONVERT_DEBUG": "1"})
    assert result.exit_code == errors.INTERNAL_ERROR, result.output
    assert "Traceback (most recent call last)" in result.stderr and "in boom" in result.stderr
    assert stderr_lines(result)[-1].startswith("keffconvert: internal error (a bug): RuntimeError: boom")
    assert not list((tmp_path / "tmp").iterdir()), "with --debug no log file is needed"


def test_debug_goes_before_a_subcommand_and_changes_nothing_else(model_file):
    result = run("--debug", "check", model_file, "--max-params", "10M")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout


def test_a_crash_before_any_command_runs_is_reported_the_same(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", boom)
    result = run("--version")
    assert result.exit_code == errors.INTERNAL_ERROR, result.output
    assert len(stderr_lines(result)) == 1 and "Traceback" not in result.output


# -- check: 1 is "over budget" and nothing else ---------------------------------------------------


def test_check_over_budget_is_1_and_a_crash_in_check_is_not(monkeypatch, model_file):
    over = run("check", model_file, "--max-params", "10")
    assert over.exit_code == errors.OVER_BUDGET, over.output
    assert "FAIL" in over.stdout
    monkeypatch.setattr(keffconvert.check.budget, "check_model", boom)
    crash = run("check", model_file, "--max-params", "10")
    assert crash.exit_code == errors.INTERNAL_ERROR, crash.output
    assert len(stderr_lines(crash)) == 1 and "Traceback" not in crash.output


@pytest.mark.parametrize("error, code", [(errors.KeffError("unclassified"), errors.INTERNAL_ERROR),
                                         (KeyboardInterrupt(), errors.INTERRUPTED),
                                         (MemoryError(), errors.INTERNAL_ERROR)])
def test_check_never_exits_1_but_for_the_budget(monkeypatch, model_file, error, code):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(keffconvert.check.budget, "check_model", fail)
    result = run("check", model_file, "--max-params", "10")
    assert result.exit_code == code, result.output
    assert len(stderr_lines(result)) == 1 and "Traceback" not in result.output


def test_usage_errors_stay_2(model_file):
    assert run("check", model_file).exit_code == errors.USAGE  # no limits
    assert run("check", model_file, "--max-params", "lots").exit_code == errors.USAGE
    assert run(model_file, "--no-such-option").exit_code == errors.USAGE


# -- export: a disagreeing export exits 7 and leaves nothing ------------------------------------


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def large_difference(reference, candidate):
    return {"samples": len(reference), "mean_abs_diff": 0.3, "max_abs_diff": 0.9, "correlation": 0.1,
            "top1_agreement": 0.25}


@pytest.mark.parametrize("fmt, name", [("keras", "m.keras"), ("saved_model", "m_saved")])
def test_export_that_disagrees_exits_7_and_writes_nothing(monkeypatch, model_file, tmp_path, fmt, name):
    monkeypatch.setattr(keffconvert.report.fidelity, "compare_predictions", large_difference)
    out = tmp_path / "out" / name
    out.parent.mkdir()
    result = run("export", model_file, "--format", fmt, "-o", out)
    assert result.exit_code == errors.EXPORT_MISMATCH, result.output
    assert "max |difference| 9.00e-01" in result.stdout and "DISAGREES" in result.stdout
    assert stderr_lines(result)[-1].startswith("keffconvert: error: ") and "not written" in result.stderr
    assert not out.exists() and no_leftovers(out.parent) == []


def test_tflite_export_that_disagrees_keeps_the_old_output(monkeypatch, model_file, tmp_path):
    real_predict = keffconvert.export.tflite.predict
    monkeypatch.setattr(keffconvert.export.tflite, "predict", lambda content, x: real_predict(content, x) + 0.5)
    out = tmp_path / "m.tflite"
    out.write_bytes(b"previous export")
    result = run("export", model_file, "-o", out, "--force")
    assert result.exit_code == errors.EXPORT_MISMATCH, result.output
    assert re.search(r"max \|difference\| 5\.00e-01, allowed 1\.00e-03", result.stdout), result.stdout
    assert out.read_bytes() == b"previous export" and no_leftovers(tmp_path) == []
    looser = run("export", model_file, "-o", out, "--force", "--tolerance", "0.6")
    assert looser.exit_code == 0, looser.output
    assert out.read_bytes() != b"previous export" and no_leftovers(tmp_path) == []


def test_verify_export_from_python():
    model = small_cnn()
    x = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    same = verify_export(model, model, x)
    assert same["passed"] and same["problems"] == [] and same["max_abs_diff"] == 0
    shifted = verify_export(model, lambda images: model.predict(images, verbose=0) + 0.01, x)
    assert not shifted["passed"] and "max |difference|" in shifted["problems"][0]
    assert verify_export(model, lambda images: model.predict(images, verbose=0) + 0.01, x, int8=True)["passed"]
    broken = verify_export(model, lambda images: np.full((4, 4), np.nan, "float32"), x, int8=True)
    assert not broken["passed"] and "non-finite" in broken["problems"][0]
    flipped = verify_export(model, lambda images: 1 - model.predict(images, verbose=0), x, int8=True,
                            min_agreement=0.9)
    assert not flipped["passed"] and "top-1 agreement" in flipped["problems"][-1]
