"""Every script in examples/ runs as a user would run it, so the examples cannot rot."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import count

import keffconvert
from keffconvert.data.splits import stratified_split
from keffconvert.train.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CI = EXAMPLES / "ci"


def run_example(args, cwd=ROOT, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_example_is_tested():
    tested = {"convert_custom_model.py", "convert_transfer_model.py", "finetune_image_folder.py", "table2.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_convert_custom_model():
    out = run_example([EXAMPLES / "convert_custom_model.py"])
    assert re.search(r"^converted [1-9]\d* of \d+ Conv2D layers$", out, re.M), out
    assert re.search(r"^trainable parameters: [\d,]+ -> [\d,]+ \(\d+\.\d% fewer\)$", out, re.M), out
    assert "reloaded predictions match" in out


@pytest.mark.slow
def test_convert_transfer_model():
    out = run_example([EXAMPLES / "convert_transfer_model.py"])
    match = re.search(r"^converted (\d+) of \d+ Conv2D layers, (\d+) of them inside the nested base model "
                      r"'efficientnetb0'$", out, re.M)
    assert match and int(match.group(2)) == int(match.group(1)) > 0, out
    assert re.search(r"^nested base 'efficientnetb0' now holds [1-9]\d* GroupedPointwiseConv2D layers$", out, re.M)
    assert "weights copied: True" in out and "prediction shape: (2, 5)" in out


def test_finetune_image_folder():
    out = run_example([EXAMPLES / "finetune_image_folder.py"])
    assert re.search(r"^image folder: 3 classes .*, 48 PNG files$", out, re.M), out
    assert re.search(r"^converted [1-9] pointwise convs: trainable parameters [\d,]+ -> [\d,]+", out, re.M), out
    result = re.search(r"^fine-tuned 1 epoch: kEffNet-.*, test accuracy (\d\.\d\d), test loss (\d+\.\d+)$", out, re.M)
    assert result, out
    # A real evaluation on the held-out images: the accuracy is k/N for the N test images the
    # recipe's split holds out of the folder (3 classes of 16, nothing else), shown to 2 decimals.
    accuracy, loss = float(result.group(1)), float(result.group(2))
    recipe = Recipe()
    labels = np.repeat(np.arange(3), 16)
    n_test = len(stratified_split(labels, recipe.test_split, recipe.seed)[1])
    assert 2 <= n_test <= 20, n_test  # 9 today; few enough that "a multiple of 1/N" constrains
    shown = {round(k / n_test, 2): k for k in range(n_test + 1)}
    assert accuracy in shown, (accuracy, n_test, out)
    # and the loss is the same evaluation's cross-entropy: each of the N - k misclassified images
    # gives its true class p <= 1/2, so a mean of at least (N - k) / N * ln 2 (loss shown to 3 dp)
    wrong = n_test - shown[accuracy]
    assert np.log(2) * wrong / n_test - 0.0005 <= loss < 50, (accuracy, loss, out)
    assert re.search(r"^run folder: .*report\.json", out, re.M), out


@pytest.mark.slow
def test_table2_matches_the_converter():
    """The script's numbers against converted models counted here (B0..B2, to stay quick)."""
    out = run_example([EXAMPLES / "table2.py", "--upto", "2"])
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^(B\d)\s+([\d,]+)\s+([\d,]+)\s+-\d+\.\d\d%", out, re.M)}
    assert sorted(rows) == ["B0", "B1", "B2"], out
    for i in range(3):
        model = getattr(keras.applications, f"EfficientNetB{i}")(weights=None, classes=10)
        converted, _ = keffconvert.convert(model, channels_per_group=16, transfer_weights=False)
        before, after = count(model.trainable_weights), count(converted.trainable_weights)
        if i == 0:
            assert (before, after) == (4_020_358, 639_702)  # METHOD.md, the paper's Tables 1 and 2
        assert rows[f"B{i}"] == (f"{before:,}", f"{after:,}")
        keras.backend.clear_session()


def _check_step(text):
    """(run command, working directory) of the workflow step that runs `keffconvert check`."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        workflow = yaml.safe_load(text)
        job = next(iter(workflow["jobs"].values()))
        step = next(s for s in job["steps"] if "keffconvert check" in s.get("run", "")
                    and "--format json" not in s["run"])
        cwd = step.get("working-directory") or job.get("defaults", {}).get("run", {}).get("working-directory", ".")
        return step["run"].strip(), cwd
    runs = re.findall(r"^\s+run: (keffconvert check .*)$", text, re.M)
    cwd = re.search(r"^\s+working-directory: (\S+)\s*$", text, re.M)
    return [r for r in runs if "--format json" not in r][0], cwd.group(1) if cwd else "."


def test_ci_workflow_runs_the_committed_budget(monkeypatch):
    text = (CI / "keffconvert-budget.yml").read_text()
    assert "- name: Check the parameter budget" in text and "pip install" in text
    command, cwd = _check_step(text)
    assert command.startswith("keffconvert check ") and (ROOT / cwd / "pyproject.toml").is_file()
    args = shlex.split(command)[2:]
    out = run_example(["-m", "keffconvert.cli", "check", *args], cwd=ROOT / cwd)
    assert "budget from pyproject.toml [tool.keffconvert.budget]" in out
    assert "PASS max-params: 639,702 <= 700,000 (60,298 to spare)" in out
    assert re.search(r"^within budget: (\d+) of \1 limits met$", out, re.M), out
    # the same budget file, tightened on the command line, fails the build
    from click.testing import CliRunner

    from keffconvert.cli import cli

    monkeypatch.chdir(ROOT / cwd)
    result = CliRunner().invoke(cli, ["check", *args, "--budget", "pyproject.toml", "--max-params", "600000"])
    assert result.exit_code == 1, result.output
    assert "FAIL max-params: 639,702 > 600,000 (over by 39,702, +6.6%)" in result.stdout
    assert "PASS max-total-params" in result.stdout  # the file's other limits still apply
