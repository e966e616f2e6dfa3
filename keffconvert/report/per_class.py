"""Per-class results on the test split: confusion matrix, precision, recall, F1, support.

Overall accuracy hides where a smaller model pays: a conversion that costs one point may cost
ten on one class. Everything here is derived from the confusion matrix alone (rows: true class,
columns: predicted class), so the numbers in a report can be checked against it
(`check_consistency`) and redrawn from `report.json`. Pure numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_consistency", "confusion_matrix", "f1_drops", "per_class_results"]


def confusion_matrix(y_true, y_pred, num_classes):
    """counts[i, j]: test images of true class i predicted as class j."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def _ratio(a, b):
    """a / b, 0.0 where b is 0 (sklearn's zero_division=0: a class never predicted has precision 0)."""
    return float(a) / float(b) if b else 0.0


def _metrics_from(counts):
    """(precision, recall, f1, support) lists from a confusion matrix."""
    counts = np.asarray(counts, dtype=np.int64)
    hits = np.diag(counts)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    precision = [_ratio(h, p) for h, p in zip(hits, predicted)]
    recall = [_ratio(h, a) for h, a in zip(hits, actual)]
    f1 = [_ratio(2 * p * r, p + r) for p, r in zip(precision, recall)]
    return precision, recall, f1, [int(a) for a in actual]


def per_class_results(y_true, y_pred, class_names):
    """The JSON-ready per-class results of one model: its confusion matrix and, per class,
    precision, recall, F1 and support, with macro averages and accuracy."""
    names = [str(n) for n in class_names]
    counts = confusion_matrix(y_true, y_pred, len(names))
    precision, recall, f1, support = _metrics_from(counts)
    classes = [{"class": i, "name": names[i], "precision": precision[i], "recall": recall[i], "f1": f1[i],
                "support": support[i]} for i in range(len(names))]
    total = int(counts.sum())
    return {
        "class_names": names,
        "confusion_matrix": counts.tolist(),
        "classes": classes,
        "accuracy": _ratio(np.trace(counts), total),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "samples": total,
    }


def check_consistency(results, test_accuracy=None, tolerance=1e-6):
    """Problems (a list of lines, empty when none) where `results`' numbers do not follow from its
    confusion matrix, or its accuracy differs from the separately measured `test_accuracy`."""
    problems = []
    counts = np.asarray(results["confusion_matrix"], dtype=np.int64)
    names = results["class_names"]
    if counts.shape != (len(names), len(names)):
        return [f"confusion matrix of shape {counts.shape} for {len(names)} classes"]
    precision, recall, f1, support = _metrics_from(counts)
    for i, entry in enumerate(results["classes"]):
        for key, expected in (("precision", precision[i]), ("recall", recall[i]), ("f1", f1[i]),
                              ("support", support[i])):
            if abs(entry[key] - expected) > tolerance:
                problems.append(f"class {names[i]}: {key} {entry[key]} but the confusion matrix gives {expected}")
    accuracy = _ratio(np.trace(counts), counts.sum())
    if abs(results["accuracy"] - accuracy) > tolerance:
        problems.append(f"accuracy {results['accuracy']} but the confusion matrix gives {accuracy}")
    if test_accuracy is not None and abs(test_accuracy - accuracy) > 1e-4:
        problems.append(f"test accuracy {test_accuracy} but the confusion matrix gives {accuracy}")
    if int(counts.sum()) != results["samples"]:
        problems.append(f"{results['samples']} samples but the confusion matrix holds {int(counts.sum())}")
    return problems


def f1_drops(original, converted, count=3):
    """The `count` classes whose F1 fell most from `original` to `converted` (largest drop first),
    each {class, name, original_f1, converted_f1, drop} with drop in F1 points (x100); only
    classes that lost something."""
    drops = []
    for before, after in zip(original["classes"], converted["classes"]):
        drop = 100 * (before["f1"] - after["f1"])
        if drop > 0:
            drops.append({"class": before["class"], "name": before["name"], "original_f1": before["f1"],
                          "converted_f1": after["f1"], "drop": round(drop, 4)})
    drops.sort(key=lambda d: (-d["drop"], d["class"]))
    return drops[:count]
