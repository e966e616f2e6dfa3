"""Per-class results: precision, recall, F1 and support follow from the confusion matrix, agree
with scikit-learn, and reach the training report (JSON, Markdown, confusion-matrix PNGs)."""

import json
import shutil

import keras
import numpy as np
import pytest
from sklearn import metrics

import keffconvert  # noqa: F401  (registers the converted model's layers)
from keffconvert.report.per_class import check_consistency, confusion_matrix, f1_drops, per_class_results
from keffconvert.report.training import CONFUSION_FILES, regenerate
from tiny_run import CLASSES, tiny_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_per_class_numbers_match_sklearn_including_a_class_never_predicted():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))  # class 4 only by luck
    y_pred[y_pred == 4] = 3  # class 4 is never predicted: precision 0 by convention
    results = per_class_results(y_true, y_pred, list("abcde"))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=range(5), zero_division=0)
    assert [c["precision"] for c in results["classes"]] == pytest.approx(precision)
    assert [c["recall"] for c in results["classes"]] == pytest.approx(recall)
    assert [c["f1"] for c in results["classes"]] == pytest.approx(f1)
    assert [c["support"] for c in results["classes"]] == list(support)
    assert results["confusion_matrix"] == metrics.confusion_matrix(y_true, y_pred, labels=range(5)).tolist()
    assert results["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert results["macro_f1"] == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert results["classes"][4]["precision"] == 0.0 and results["classes"][4]["support"] > 0
    assert check_consistency(results, test_accuracy=results["accuracy"]) == []


def test_the_consistency_check_names_numbers_that_do_not_follow_from_the_matrix():
    results = per_class_results([0, 0, 1, 1, 2], [0, 1, 1, 1, 2], ["x", "y", "z"])
    assert check_consistency(results) == []
    tampered = json.loads(json.dumps(results))
    tampered["classes"][1]["recall"] = 0.5
    tampered["confusion_matrix"][2][2] += 1
    problems = check_consistency(tampered, test_accuracy=0.8)
    assert any(p.startswith("class y: recall 0.5") for p in problems)
    assert any("samples" in p for p in problems) and any(p.startswith("accuracy") for p in problems)


def test_f1_drops_lists_the_classes_that_lost_most_first():
    truth = np.repeat(np.arange(4), 10)
    original = per_class_results(truth, truth, list("abcd"))  # perfect
    worse = truth.copy()
    worse[:4] = 1  # class a loses 4 images to b
    worse[20] = 3  # class c loses one to d
    converted = per_class_results(truth, worse, list("abcd"))
    drops = f1_drops(original, converted, count=3)
    expected = sorted(((100 * (o["f1"] - c["f1"]), o["name"]) for o, c in zip(original["classes"], converted["classes"])
                       if o["f1"] > c["f1"]), key=lambda d: -d[0])[:3]
    assert [(pytest.approx(d["drop"], abs=1e-3), d["name"]) for d in drops] == \
        [(pytest.approx(v, abs=1e-3), n) for v, n in expected]
    assert drops[0]["name"] == "a" and len(drops) == 3


def test_a_training_report_holds_per_class_results_that_match_its_checkpoints(run):
    out, report, x_test, y_test, _ = run
    for model in report["models"]:
        per_class = model["per_class"]
        assert per_class["class_names"] == CLASSES
        assert check_consistency(per_class, test_accuracy=model["test_accuracy"]) == []
        best = keras.models.load_model(out / model["checkpoint"], compile=False)
        predicted = best.predict(x_test.astype("float32"), verbose=0).argmax(axis=1)
        assert per_class["confusion_matrix"] == confusion_matrix(y_test, predicted, len(CLASSES)).tolist()
        assert (out / CONFUSION_FILES[model["role"]]).read_bytes()[:8] == PNG
    original, converted = (m["per_class"] for m in report["models"])
    assert report["class_f1_drops"] == f1_drops(original, converted)
    markdown = (out / "report.md").read_text()
    assert "## Per-class results (test split)" in markdown
    assert f"| red | {original['classes'][0]['support']} | {100 * original['classes'][0]['precision']:.1f}% |" \
        in markdown
    assert all(f"]({name})" in markdown for name in CONFUSION_FILES.values())


def test_report_regeneration_keeps_per_class_results_and_reads_older_reports(run, tmp_path):
    out, report, _, _, _ = run
    regenerate(out / "report.json", tmp_path)
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert all((tmp_path / name).read_bytes()[:8] == PNG for name in CONFUSION_FILES.values())
    assert (tmp_path / "heatmaps.png").read_bytes() == (out / "heatmaps.png").read_bytes()

    older = tmp_path / "older"
    older.mkdir()
    old = json.loads((out / "report.json").read_text())
    for key in ("class_f1_drops", "heatmaps"):
        old.pop(key)
    for model in old["models"]:
        model.pop("per_class")
    (older / "report.json").write_text(json.dumps(old))
    written = {p.name for p in regenerate(older / "report.json")}
    assert not written & set(CONFUSION_FILES.values())
    markdown = (older / "report.md").read_text()
    assert "Per-class" not in markdown and "Heatmaps" not in markdown and "## Per-layer plan" in markdown
    shutil.rmtree(older)
