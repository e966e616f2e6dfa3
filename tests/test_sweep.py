"""`keffconvert sweep`: one report whose rows are the run folders' own results, the Pareto front
right, finished settings skipped on a rerun, bad settings refused in one line."""

import functools
import json
import shutil

import keras
import pytest
from click.testing import CliRunner

import keffconvert.train.run
from keffconvert.cli import cli
from keffconvert.errors import OutputError
from keffconvert.report.markdown import human
from keffconvert.report.sweep import PLOT, REPORT_JSON, REPORT_MD, pareto_front
from keffconvert.train.sweep import parse_channels_per_group, sweep
from keffconvert.train.recipe import Recipe

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_digits_model():
    """A small CNN for digits at 8x8 with two convertible 1x1 convs (16 -> 32 -> 16 channels)."""
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_act")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.Conv2D(16, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="tiny_digits")


RECIPE = dict(epochs=1, seed=1, augment=False, batch_size=256)
NO_HEATMAPS = dict(heatmap_images=0)  # a train() option, passed through to every run


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A finished 1-epoch scratch sweep of the tiny model at 2 and 4 channels per group."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    report = sweep(tiny_digits_model(), "digits", channels_per_group="4,2", out=out, recipe=Recipe(**RECIPE),
                   **NO_HEATMAPS)
    return out, report


def test_rows_are_the_run_folders_own_results(finished_sweep):
    out, report = finished_sweep
    assert [row["channels_per_group"] for row in report["rows"]] == [2, 4]  # sorted
    runs = {cpg: json.loads((out / f"cpg-{cpg}" / "report.json").read_text()) for cpg in (2, 4)}
    for row in report["rows"]:
        run = runs[row["channels_per_group"]]
        converted = run["models"][1]
        assert row["run_dir"] == f"cpg-{row['channels_per_group']}"
        for key in ("trainable_params", "total_params", "macs", "reduction_pct", "test_accuracy", "test_loss"):
            assert row[key] == converted[key], key
        assert row["trainable_params"] == run["plan"]["trainable_params_after"]
        assert row["converted_layers"] == run["plan"]["converted_layers"] == 2
    # fewer channels per group: more groups, fewer parameters and MACs
    assert report["rows"][0]["trainable_params"] < report["rows"][1]["trainable_params"]
    assert report["rows"][0]["macs"] < report["rows"][1]["macs"]
    # the original is trained once, beside the first setting, and is the reference point
    assert runs[2]["models"][0]["trained"] and not runs[4]["models"][0]["trained"]
    reference = report["reference"]
    assert reference["run_dir"] == "cpg-2"
    for key in ("trainable_params", "macs", "test_accuracy"):
        assert reference[key] == runs[2]["models"][0][key]
    for row in report["rows"]:
        assert row["accuracy_delta_points"] == pytest.approx(
            100 * (row["test_accuracy"] - reference["test_accuracy"]), abs=1e-3)
    assert json.loads((out / REPORT_JSON).read_text()) == report
    markdown = (out / REPORT_MD).read_text()
    for row in report["rows"]:
        assert f"| {row['trainable_params']:,} | {-row['reduction_pct']:+.2f}% | {human(row['macs'])} | " \
               f"{100 * row['test_accuracy']:.2f}% |" in markdown
    assert (out / PLOT).read_bytes()[:8] == PNG


def test_the_pareto_front_is_marked_on_the_sweeps_points(finished_sweep):
    _, report = finished_sweep
    points = [report["reference"], *report["rows"]]
    for cost in ("trainable_params", "macs"):
        expected = pareto_front([(p[cost], p["test_accuracy"]) for p in points])
        assert [p[f"pareto_{cost}"] for p in points] == expected
        assert report["pareto"][cost] == [("original" if p is points[0] else p["channels_per_group"])
                                          for p, on in zip(points, expected) if on]
    assert report["rows"][0]["pareto_trainable_params"]  # the smallest model is always on the front


def test_pareto_front_of_hand_made_points():
    points = [(1, 0.50), (2, 0.70), (3, 0.60), (4, 0.90), (4, 0.90), (5, 0.90), (None, 0.99), (0.5, None),
              (2, 0.70), (0.9, 0.40)]
    assert pareto_front(points) == [True, True, False, True, True, False, False, False, True, True]
    assert pareto_front([]) == []
    assert pareto_front([(3, 0.1)]) == [True]


def test_a_rerun_skips_finished_settings_and_resumes_the_unfinished_one(finished_sweep, tmp_path, monkeypatch):
    source, report = finished_sweep
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    (out / REPORT_JSON).unlink()             # killed before the sweep report...
    (out / "cpg-4" / "report.json").unlink()  # ...and before cpg 4's run report: cpg 4 is unfinished
    calls = []
    real_train = keffconvert.train.run.train

    @functools.wraps(real_train)  # sweep reads train's signature
    def counting_train(*args, **kwargs):
        calls.append(kwargs["channels_per_group"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(keffconvert.train.run, "train", counting_train)
    again = sweep(tiny_digits_model(), "digits", channels_per_group=[2, 4], out=out, recipe=Recipe(**RECIPE),
                  **NO_HEATMAPS)
    assert calls == [4]
    resumed = json.loads((out / "cpg-4" / "report.json").read_text())
    # cpg 4's model had finished training: the resumed run reports it, it does not train it again
    assert resumed["models"][1]["history"] == json.loads((source / "cpg-4" / "report.json").read_text()
                                                         )["models"][1]["history"]
    for key in ("reference", "rows", "pareto"):
        assert again[key] == report[key], key
    assert (out / REPORT_JSON).exists()


def test_a_finished_or_different_sweep_is_not_overwritten(finished_sweep, tmp_path):
    source, _ = finished_sweep
    with pytest.raises(OutputError, match="finished sweep"):
        sweep(tiny_digits_model(), "digits", channels_per_group="2,4", out=source, recipe=Recipe(**RECIPE),
              **NO_HEATMAPS)
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    (out / REPORT_JSON).unlink()
    with pytest.raises(OutputError, match=r"other settings \(channels_per_group, recipe\)"):
        sweep(tiny_digits_model(), "digits", channels_per_group="2,8", out=out, recipe=Recipe(epochs=2, seed=1),
              **NO_HEATMAPS)
    result = CliRunner().invoke(cli, ["sweep", "tiny.keras", "-c", "2,4", "--out", str(source)])
    assert result.exit_code == 5 and result.stderr.count("\n") == 1 and "finished sweep" in result.stderr


@pytest.mark.parametrize("value", ["4,x", "0,8", "", "4;8", "2.5"])
def test_a_bad_settings_list_is_one_line_and_exit_2(value, tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "efficientnetb0", "-c", value, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "--channels-per-group" in result.stderr
    assert not (tmp_path / "s").exists()


def test_settings_are_parsed_sorted_and_distinct():
    assert parse_channels_per_group("16, 4,8,4") == [4, 8, 16]
    assert parse_channels_per_group([32, 2]) == [2, 32]


def test_the_python_api_is_keffconvert_sweep():
    import keffconvert

    assert keffconvert.sweep is sweep and "sweep" in keffconvert.__all__


def test_the_accuracy_before_training_is_a_column_only_when_measured(finished_sweep):
    import copy

    from keffconvert.report.sweep import BEFORE_TRAINING, render_sweep_markdown

    _, report = finished_sweep
    assert BEFORE_TRAINING not in render_sweep_markdown(report)  # from scratch: nothing before training
    finetuned = copy.deepcopy(report)
    finetuned["rows"][0]["initial_test_accuracy"] = 0.4321
    markdown = render_sweep_markdown(finetuned)
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {report['rows'][0]['name']} |"))
    assert header.split(" | ").index(BEFORE_TRAINING) == row.split(" | ").index("43.21%")


def test_options_train_does_not_take_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="no_such_option"):
        sweep("efficientnetb0", channels_per_group="4", out=tmp_path / "s", no_such_option=1)
    assert not (tmp_path / "s").exists()
