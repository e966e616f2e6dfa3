"""Grad-CAM heatmaps of a run's original and converted model on the same test images (paper 4.2).

A finished run folder holds all this needs: the models (`original/best.keras` when the original
was trained, `original/reference.keras` when fine-tuning used it as it is, `converted/best.keras`),
the pixel scale (`report.json`) and a small sample of its test images (`test_sample.npz`, 32
images taken in turn from each class, written by `train`), so the heatmaps can be drawn anywhere
the folder is copied, without the data. An older run folder without the sample gets its test
split rebuilt from the data and seed its report records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keffconvert.errors import DataError, InputError, UsageConflict
from keffconvert.outputs import atomic_path, check_writable
from keffconvert.report.run_files import HEATMAP_FILE, SAMPLE_FILE

__all__ = ["HEATMAP_FILE", "SAMPLE_FILE", "draw_heatmaps", "run_heatmaps", "load_test_sample", "save_test_sample"]

SAMPLE_SIZE = 32
MODEL_FILES = {"original": ("original/best.keras", "original/reference.keras"), "converted": ("converted/best.keras",)}


def sample_indices(labels, count=SAMPLE_SIZE):
    """Indices of `count` test images taken in turn from each class (class 0's first, class 1's
    first, ..., then each class's second), so a few images already show several classes."""
    labels = np.asarray(labels)
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked = []
    while len(picked) < min(count, len(labels)):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(int(queue.pop(0)))
    return np.array(picked, dtype=np.int64)


def save_test_sample(run_dir, dataset, count=SAMPLE_SIZE):
    """Write `test_sample.npz` (uint8 images, labels, their test-split indices, class names) and
    return (images, labels). Works on an in-memory dataset and on a streamed one (only the sample
    is decoded)."""
    x, y, picked = _sample_of(dataset, count)
    path = Path(run_dir) / SAMPLE_FILE
    with atomic_path(path, force=True) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, x=x, y=y, index=picked, class_names=np.array(dataset.class_names, dtype=str))
    return x, y


def _sample_of(dataset, count=SAMPLE_SIZE):
    """(images, labels, test-split indices) of the test sample, in `sample_indices` order."""
    if getattr(dataset, "x_test", None) is not None:
        picked = sample_indices(dataset.y_test, count)
        return dataset.x_test[picked], np.asarray(dataset.y_test)[picked], picked
    labels = np.asarray(dataset.labels("test"))
    positions = np.sort(sample_indices(labels, count))  # a stream reads its records in order
    x = np.concatenate([np.asarray(batch) for batch, _ in dataset.images("test", positions).batch(256)])
    order = sample_indices(labels[positions], count)
    return x[order], labels[positions][order], positions[order]


def load_test_sample(run_dir, report):
    """(uint8 images, labels, class names) of the run's test sample; rebuilt from the recorded data
    spec and seed when the run folder has no `test_sample.npz`."""
    path = Path(run_dir) / SAMPLE_FILE
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as sample:
                return sample["x"], sample["y"], [str(n) for n in sample["class_names"]]
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"{path}: not a readable test sample ({error})") from None
    from keffconvert.data.sources import load_dataset

    settings, recipe = report.get("settings") or {}, report.get("recipe") or {}
    size = (report.get("data") or {}).get("image_size")
    if not settings.get("data") or not size:
        raise InputError(f"{run_dir} has no {SAMPLE_FILE} and its report does not record the data")
    try:
        dataset = load_dataset(settings["data"], size[:2], size[2], val_split=recipe.get("val_split", 0.1),
                               test_split=recipe.get("test_split", 0.2), seed=recipe.get("seed", 0))
    except DataError as error:
        raise DataError(f"{run_dir} has no {SAMPLE_FILE}, and its data cannot be loaded again: {error}") from None
    x, y, _ = _sample_of(dataset)
    return x, y, dataset.class_names


def model_paths(run_dir):
    """{'original': path or None, 'converted': path} of the run's models; InputError without the
    converted one."""
    run_dir = Path(run_dir)
    found = {}
    for role, candidates in MODEL_FILES.items():
        found[role] = next((run_dir / c for c in candidates if (run_dir / c).is_file()), None)
    if found["converted"] is None:
        raise InputError(f"{run_dir} holds no {MODEL_FILES['converted'][0]}: not a finished keffconvert run folder")
    return found


def draw_heatmaps(models, images, labels, class_names, scale, path, *, title_extra=""):
    """Grad-CAM of each model in `models` ([(heading, keras model)]) on `images` (uint8), drawn side
    by side into `path`; returns what the report records: per model the layer, the feature-map
    size, its predictions and confidences."""
    from keffconvert.report.gradcam_tf import grad_cam
    from keffconvert.data.pixels import scale_pixels
    from keffconvert.report.plots import plot_heatmaps

    x = scale_pixels(images, scale)
    columns, record = [], []
    for heading, model in models:
        cam = grad_cam(model, x)
        columns.append((heading, cam))
        record.append({"model": heading, "layer": cam.layer, "feature_map": list(cam.feature_size),
                       "predicted": [int(p) for p in cam.predicted],
                       "confidence": [round(float(c), 4) for c in cam.confidence]})
    layers = "; ".join(f"{r['model']}: {r['layer']} {r['feature_map'][0]}x{r['feature_map'][1]}" for r in record)
    plot_heatmaps(images, labels, class_names, columns, path,
                  title=f"Grad-CAM of the predicted class, last conv feature map ({layers}){title_extra}")
    return {"file": Path(path).name, "images": len(images), "labels": [int(v) for v in labels], "models": record}


def load_models(paths):
    """[(heading, model)] for the run's models, original first."""
    import keras

    import keffconvert  # noqa: F401  (registers the converted model's layers)

    loaded = []
    for role in ("original", "converted"):
        if paths.get(role) is None:
            continue
        try:
            loaded.append((role, keras.models.load_model(paths[role], compile=False)))
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise InputError(f"{paths[role]}: cannot load the model ({str(error).splitlines()[0]})") from None
    return loaded


def run_heatmaps(run_dir, *, images=8, out=None, force=False):
    """Heatmaps of a finished run folder into `out` (default RUN_DIR/heatmaps.png); the record."""
    from keffconvert.report.training import load_report

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    if images < 1:
        raise UsageConflict(f"--images must be at least 1 (got {images})")
    report = load_report(run_dir / "report.json")
    out = Path(out) if out is not None else run_dir / HEATMAP_FILE
    check_writable(out, force)
    paths = model_paths(run_dir)
    x, y, names = load_test_sample(run_dir, report)
    if images > len(x):
        raise UsageConflict(f"--images {images}: the run folder holds {len(x)} test images for heatmaps")
    scale = (report.get("recipe") or {}).get("input_scale", "raw")
    return draw_heatmaps(load_models(paths), x[:images], y[:images], names, scale, out)
