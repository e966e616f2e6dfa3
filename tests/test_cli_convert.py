"""`keffconvert MODEL`: the plan, the written model, and one line + exit code for each mistake."""

import hashlib
import json
import re
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LEGACY, small_cnn

from keffconvert.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.keras"
    small_cnn().save(path)
    return path


def one_error_line(result, code):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("keffconvert: error: ") or lines[-1].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[-1]


def test_converts_and_writes_beside_the_input(model_file):
    before = digest(model_file)
    result = run(model_file, "--channels-per-group", "8")
    assert result.exit_code == 0, result.output
    out = model_file.with_name("model_keff.keras")
    assert out.exists() and f"wrote {out}" in result.output
    assert "trainable parameters:" in result.output and "converted" in result.output
    assert digest(model_file) == before, "the input file is never modified"
    assert not list(model_file.parent.glob(".model_keff*")), "no temporary file is left behind"


def test_report_json_matches_the_written_model(model_file, tmp_path):
    report = tmp_path / "plan.json"
    out = tmp_path / "small.keras"
    assert run(model_file, "-c", "8", "-o", out, "--report", report).exit_code == 0
    data = json.loads(report.read_text())
    converted = keras.models.load_model(out)
    assert data["plan"]["trainable_params_after"] == sum(int(np.prod(w.shape)) for w in converted.trainable_weights)
    assert data["plan"]["converted_layers"] == len(data["plan"]["layers"]) - data["plan"]["skipped_layers"] > 0


def test_dry_run_writes_no_model(model_file):
    result = run(model_file, "--dry-run", "-c", "8")
    assert result.exit_code == 0
    assert not model_file.with_name("model_keff.keras").exists()


def test_exclude_keeps_matching_layers(model_file, tmp_path):
    result = run(model_file, "-c", "8", "--exclude", "reduce", "-o", tmp_path / "o.keras")
    assert result.exit_code == 0
    assert "excluded by pattern 'reduce'" in result.output


def test_existing_output_is_refused_without_force(model_file, tmp_path):
    out = tmp_path / "taken.keras"
    out.write_text("precious")
    line = one_error_line(run(model_file, "-c", "8", "-o", out), 5)
    assert "exists" in line and "--force" in line
    assert out.read_text() == "precious"
    assert run(model_file, "-c", "8", "-o", out, "--force").exit_code == 0
    assert keras.models.load_model(out) is not None


def test_missing_output_folder_is_refused(model_file, tmp_path):
    line = one_error_line(run(model_file, "-o", tmp_path / "nope" / "o.keras"), 5)
    assert "does not exist" in line


def _text_file_named_h5(d):
    (d / "notes.h5").write_text("hello")
    return d / "notes.h5"


def _zip_without_config(d):
    with zipfile.ZipFile(d / "x.keras", "w") as archive:
        archive.writestr("a.txt", "x")
    return d / "x.keras"


@pytest.mark.parametrize("make,reasons", [
    (lambda d: d / "missing.h5", ["no such file"]),
    (lambda d: d, ["directory"]),
    (_text_file_named_h5, ["not an hdf5 file"]),
    (_zip_without_config, ["not a keras .keras file", "config.json"]),
    (lambda d: "efficientnetb9", ["not a built-in model name", "efficientnetb0", "resnet50"]),
], ids=["missing", "directory", "text-as-h5", "zip-without-config", "unknown-builtin"])
def test_unreadable_inputs_get_one_line_and_code_3(tmp_path, make, reasons):
    target = str(make(tmp_path))
    line = one_error_line(run(target), 3)
    assert f"keffconvert: error: {target}: " in line, "the line names the input, then says why"
    for reason in reasons:
        assert reason in line.lower(), (reason, line)


def test_channels_per_group_below_one_is_a_usage_error(model_file):
    result = run(model_file, "--channels-per-group", "0")
    assert result.exit_code == 2 and "channels-per-group" in result.output


def test_channels_first_model_is_refused_with_code_4(tmp_path):
    inp = keras.Input((16, 8, 8))
    path = tmp_path / "cf.keras"
    keras.Model(inp, keras.layers.Conv2D(16, 1, data_format="channels_first")(inp)).save(path)
    assert "channels_first" in one_error_line(run(path), 4)


def test_lambda_model_is_refused_without_unsafe(tmp_path):
    inp = keras.Input((8, 8, 32))
    x = keras.layers.Lambda(lambda t: t * 2)(inp)
    path = tmp_path / "lam.keras"
    keras.Model(inp, keras.layers.Conv2D(32, 1)(x)).save(path)
    assert "--unsafe" in one_error_line(run(path), 4)
    assert run(path, "--unsafe", "-c", "8", "-o", tmp_path / "o.keras").exit_code == 0


def test_nothing_to_convert_says_so_and_exits_0(tmp_path):
    inp = keras.Input((8, 8, 3))
    path = tmp_path / "plain.keras"
    keras.Model(inp, keras.layers.Conv2D(4, 3)(inp)).save(path)
    result = run(path)
    assert result.exit_code == 0 and "nothing to convert" in result.output
    assert not (tmp_path / "plain_keff.keras").exists()


def test_builtin_name_converts_to_the_papers_number(tmp_path):
    result = run("efficientnetb0", "--classes", "10", "--dry-run")
    assert result.exit_code == 0
    assert "4,020,358 -> 639,702" in result.output


FIDELITY_LINE = re.compile(r"before training, on (\d+) images: top-1 agreement with the original "
                           r"(\d+\.\d)%, output correlation (-?\d\.\d{3})")


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(LEGACY.glob("*.h5")), ids=lambda p: p.name)
def test_legacy_files_convert_and_load_with_plain_keras(tmp_path, fixture):
    out = tmp_path / f"{fixture.stem}_keff.keras"
    reference = np.load(fixture.with_suffix(".npz"))  # x, and y: what the saving TensorFlow predicted
    before = digest(fixture)
    result = run(fixture, "-o", out, "--fidelity-data", fixture.with_suffix(".npz"))
    assert result.exit_code == 0, result.output
    assert digest(fixture) == before
    predictions = tmp_path / "converted_predictions.npy"
    check = subprocess.run(
        [sys.executable, "-c",
         "import sys, numpy as np, keras, keffconvert; m = keras.models.load_model(sys.argv[1]); "
         "np.save(sys.argv[3], m.predict(np.load(sys.argv[2])['x'], verbose=0))",
         str(out), str(fixture.with_suffix(".npz")), str(predictions)],
        capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
    converted = np.load(predictions)
    assert converted.shape == reference["y"].shape

    # The printed fidelity must be the written model measured against the original, computed here
    # independently from the old TensorFlow's own predictions: a measure of the wrong pair (the
    # converted model against itself gives 100% and 1.000), of other images, or none at all fails.
    match = FIDELITY_LINE.search(result.output)
    assert match, result.output
    samples, agree, corr = int(match[1]), float(match[2]) / 100, float(match[3])
    assert samples == len(reference["x"])
    assert 0.0 <= agree <= 1.0 and -1.0 <= corr <= 1.0
    expected_agree = np.mean(reference["y"].argmax(1) == converted.argmax(1))
    assert abs(agree - expected_agree) <= 0.0005 + 1e-9, (agree, expected_agree)
    expected_corr = np.corrcoef(reference["y"].ravel().astype("float64"),
                                converted.ravel().astype("float64"))[0, 1]
    assert abs(corr - expected_corr) <= 0.0005 + 1e-6, (corr, expected_corr)
