"""Grad-CAM heatmaps: they show where a model looks (on a task where that place is known), find
the last conv layer inside nested models, and `keffconvert heatmaps RUN` draws them from a run
folder alone, with the usual refusals and exit codes."""

import shutil
import struct

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keffconvert  # noqa: F401  (registers the converted model's layers)
from keffconvert.cli import cli
from keffconvert.errors import INPUT, OUTPUT, USAGE
from keffconvert.report.gradcam_tf import grad_cam, last_conv_layer
from keffconvert.report.heatmaps import SAMPLE_FILE, load_test_sample
from keffconvert.report.plots import heatmap_figure_size
from keffconvert.report.training import load_report
from tiny_run import PATCH, tiny_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def png_size(path):
    """(width, height) from a PNG's header."""
    data = path.read_bytes()
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])


def on_patch(maps, where):
    """Share of heatmaps whose peak lies on (or next to) the image's class-deciding patch."""
    hits = []
    for heatmap, (row, col) in zip(maps, where):
        r, c = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        hits.append(row - 1 <= r <= row + PATCH and col - 1 <= c <= col + PATCH)
    return float(np.mean(hits))


def test_the_heatmap_peaks_on_the_patch_that_decides_the_class_not_on_the_brighter_one(run):
    out, report, x_test, y_test, where = run
    # The control: the brightest place of each image is the green patch (255 against 200), which
    # says nothing about the class; a map of brightness would fail this test.
    assert on_patch(x_test.max(axis=-1).astype(float), where) < 0.2
    original = report["models"][0]
    assert original["test_accuracy"] >= 0.9  # the original learned the task, so it must look at the patch
    for model in report["models"]:
        if model["test_accuracy"] < 0.9:
            continue
        net = keras.models.load_model(out / model["checkpoint"], compile=False)
        cam = grad_cam(net, x_test.astype("float32"))
        assert cam.maps.shape == x_test.shape[:3] and cam.maps.min() >= 0 and cam.maps.max() <= 1
        assert on_patch(cam.maps, where) >= 0.8, model["role"]
        assert np.mean(cam.predicted == y_test) == pytest.approx(model["test_accuracy"], abs=1e-6)


def test_the_last_conv_layer_is_found_inside_a_nested_model(run):
    out = run[0]
    flat = keras.models.load_model(out / "original" / "best.keras", compile=False)
    base = keras.Model(flat.inputs, flat.get_layer("top").output, name="base")
    nested = keras.Sequential([keras.Input(flat.inputs[0].shape[1:]), base, flat.get_layer("pool"),
                               flat.get_layer("head")])
    assert last_conv_layer(nested).name == last_conv_layer(flat).name == "top"
    images = run[2][:6].astype("float32")
    np.testing.assert_allclose(grad_cam(nested, images).maps, grad_cam(flat, images).maps, atol=1e-5)


def test_the_training_report_holds_heatmaps_of_both_models(run):
    out, report, _, y_test, _ = run
    heatmaps = report["heatmaps"]
    assert [m["model"] for m in heatmaps["models"]] == ["original", "converted"]
    assert heatmaps["images"] == 4 and png_size(out / heatmaps["file"]) == heatmap_figure_size(4, 3)
    x, y, names = load_test_sample(out, report)
    assert heatmaps["labels"] == [int(v) for v in y[:4]] and len(set(y[:3])) == 3  # one of each class first
    assert f"![Grad-CAM heatmaps]({heatmaps['file']})" in (out / "report.md").read_text()


def test_heatmaps_command_draws_the_expected_layout_and_refuses_to_overwrite(run, tmp_path):
    out = run[0]
    target = tmp_path / "h.png"
    result = CliRunner().invoke(cli, ["heatmaps", str(out), "--images", "3", "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert png_size(target) == heatmap_figure_size(3, 3)  # 3 rows: image, original, converted
    assert "original: layer top" in result.output and "converted: layer" in result.output
    before = target.read_bytes()
    again = CliRunner().invoke(cli, ["heatmaps", str(out), "--images", "2", "--out", str(target)])
    assert again.exit_code == OUTPUT and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and target.read_bytes() == before
    forced = CliRunner().invoke(cli, ["heatmaps", str(out), "--images", "2", "--out", str(target), "--force"])
    assert forced.exit_code == 0 and png_size(target) == heatmap_figure_size(2, 3)


def test_a_run_folder_without_its_test_sample_rebuilds_it_from_the_recorded_data(run, tmp_path):
    out = run[0]
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(SAMPLE_FILE, "*.png"))
    report = load_report(copy / "report.json")
    rebuilt = load_test_sample(copy, report)
    kept = load_test_sample(out, report)
    np.testing.assert_array_equal(rebuilt[0], kept[0])
    np.testing.assert_array_equal(rebuilt[1], kept[1])
    assert rebuilt[2] == kept[2]


@pytest.mark.parametrize("arguments, code, message", [
    (["{missing}"], INPUT, "no such run folder"),
    (["{empty}"], INPUT, "no such file"),
    (["{run}", "--images", "0"], USAGE, "at least 1"),
    (["{run}", "--images", "33"], USAGE, "holds 32 test images"),
])
def test_bad_run_folders_and_options_are_one_line_with_their_exit_code(run, tmp_path, arguments, code, message):
    (tmp_path / "empty").mkdir()
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "run": run[0]}
    argv = ["heatmaps", *[a.format(**places) for a in arguments], "--out", str(tmp_path / "h.png")]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == code and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "h.png").exists()
