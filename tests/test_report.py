"""The report: Table-1-style Markdown and plots, rebuilt from report.json alone."""

import json

import keras
import pytest
from click.testing import CliRunner

import keffconvert
from keffconvert.cli import cli
from keffconvert.report.training import PLOT_FILES, build_report, regenerate, render_markdown, write_report
from keffconvert.train.recipe import Recipe

PNG = b"\x89PNG\r\n\x1a\n"


def small_model():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", name="stem")(inp)
    x = keras.layers.Conv2D(64, 1, activation="relu", name="expand")(x)
    x = keras.layers.Conv2D(32, 1, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x), name="small")


def result(key, name, trainable, total, accuracy, epochs=3):
    history = [{"epoch": e + 1, "accuracy": 0.3 + 0.1 * e, "val_accuracy": 0.25 + 0.1 * e, "loss": 2.0 - e * 0.3,
                "val_loss": 2.1 - e * 0.3, "learning_rate": 0.003 * 0.99 ** e, "time_s": 1.0} for e in range(epochs)]
    return {"key": key, "name": name, "model_name": name, "trainable_params": trainable, "total_params": total,
            "test_accuracy": accuracy, "test_loss": 0.5, "best_epoch": epochs,
            "best_val_accuracy": history[-1]["val_accuracy"], "best_val_loss": history[-1]["val_loss"],
            "epochs": epochs, "train_time_s": 3.0, "test_time_s": 0.2, "checkpoint": f"{key}/best.keras",
            "history": history, "distilled": False}


@pytest.fixture(scope="module")
def plan():
    return keffconvert.convert(small_model(), 16, dry_run=True)[1]


def make_report(plan, with_original=True):
    results = {"converted": result("converted", "kEffNet-small (cpg 16)", plan.trainable_params_after,
                                   plan.total_params_after, 0.9123)}
    if with_original:
        results["original"] = result("original", "small", plan.trainable_params_before, plan.total_params_before,
                                     0.9250)
    data = {"source": "digits", "kind": "digits", "image_size": [16, 16, 3], "classes": 10, "train": 1293,
            "val": 144, "test": 360, "val_source": "10% of training", "test_source": "20% held out"}
    return build_report(source="small", mode="scratch", plan=plan, results=results, data=data,
                        recipe=Recipe(epochs=3), settings={}, environment={"device": "cpu"}, input_scale="raw",
                        command="keffconvert train small.keras --epochs 3")


def test_markdown_table_has_params_reduction_macs_and_accuracy(plan):
    report = make_report(plan)
    markdown = render_markdown(report)
    table = markdown.split("\n\n")[1].splitlines()
    assert table[0] == "| model | trainable params | reduction | MACs | test acc | test loss |"
    assert table[2].startswith(f"| small | {plan.trainable_params_before:,} | - |")
    assert table[3].startswith(f"| kEffNet-small (cpg 16) | {plan.trainable_params_after:,} | "
                               f"{-plan.reduction_pct:+.2f}% |")
    assert "| 92.50% | 0.5000 |" in table[2] and "| 91.23% | 0.5000 |" in table[3]
    assert report["accuracy_delta_points"] == pytest.approx(-1.27)
    assert "**-1.27 points**" in markdown
    assert "| expand | 32 | 64 |" in markdown  # the per-layer plan
    assert "keffconvert train small.keras --epochs 3" in markdown


def test_report_command_regenerates_markdown_and_plots_from_json_alone(plan, tmp_path):
    report = make_report(plan)
    written = write_report(report, tmp_path)
    assert {p.name for p in written} == {"report.md", "report.json", *PLOT_FILES.values()}
    original_md = (tmp_path / "report.md").read_text()
    for name in ("report.md", *PLOT_FILES.values()):
        (tmp_path / name).unlink()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").read_text() == original_md
    for name in PLOT_FILES.values():
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))


def test_a_report_without_the_original_says_not_trained(plan, tmp_path):
    report = make_report(plan, with_original=False)
    assert report["accuracy_delta_points"] is None
    (tmp_path / "report.json").write_text(json.dumps(report))
    paths = regenerate(tmp_path / "report.json", tmp_path)
    assert "| not trained | - |" in (tmp_path / "report.md").read_text()
    assert all(p.exists() for p in paths)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON report"),
    ('{"format": "something else"}', "not a keffconvert train report"),
])
def test_bad_report_json_is_one_line_and_exit_code_3(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "r.json")])
    assert result.exit_code == 3 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
