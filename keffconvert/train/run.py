"""Train the converted model (and optionally the original beside it), then report.

    from keffconvert.train import Recipe, train

    report = train("efficientnetb0", data="digits", image_size=32, with_original=True,
                   recipe=Recipe(epochs=20), out="runs/b0")
    report["models"][1]["test_accuracy"]

Two modes. `scratch` (the paper's protocol, the default) rebuilds every model from its config,
so no weight is transferred: only the architecture is compared. `finetune` starts from the
weights the converter transferred (the original keeps its own) and can distil from the original:
its outputs (`Recipe.distill_weight > 0`) and its residual block outputs
(`Recipe.feature_distill_weight > 0`, `keffconvert.feature_distill`).

The recipe defaults are the paper's: RMSprop, learning rate 0.003 * 0.99**epoch, batch 64,
augmentation, best checkpoint by validation accuracy (restored before testing), mixed precision
on a GPU. The test split is only evaluated once, on the best checkpoint.

The run folder survives being killed: each model has its own subfolder with the best checkpoint
(`best.keras`), the per-epoch history, a backup committed atomically after every epoch (weights,
optimizer state, epoch count and a copy of that history and best checkpoint, in one folder renamed
into place: `AtomicBackupAndRestore`) and, once the model is done, `result.json`; running the
same command again resumes after the last committed epoch and skips finished models, and ends with
the requested number of epochs. A finished run (`report.json`) is never overwritten without `force`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import keras

from keffconvert.data.pixels import guess_input_scale
from keffconvert.errors import UnsupportedModelError, UsageConflict
from keffconvert.graph.model_info import ends_in_softmax
from keffconvert.loading import is_model_path
from keffconvert.train.inputs import calibration_sample, load_model_and_data, recalibration_images
from keffconvert.train.one_model import reference_result, sayer, train_one
from keffconvert.train.precision import precision_policy
from keffconvert.train.recipe import MODES, recipe_from_options
from keffconvert.train.run_dir import check_run_dir, default_out, source_name, start_run_dir

FIDELITY_IMAGES = 2048  # test images the agreement before fine-tuning is measured on (at most)


def train(model, data="digits", *, mode="scratch", with_original=False, out=None, recipe=None,
          channels_per_group=16, include=None, exclude=None, image_size=None, input_scale="auto",
          calibration="train", calibration_samples=512, force=False, unsafe=False, console=None, command=None,
          heatmap_images=4, variant="2021"):
    """Convert `model`, train the converted model (and the original if `with_original`), report.

    Args:
        model: a `keras.Model`, a model file (.keras/.h5) or a built-in name (`efficientnetb0`).
        data: 'digits', an .npz file or an image folder (see `keffconvert.data`).
        mode: 'scratch' (every weight re-initialised; the paper's protocol) or 'finetune'.
        with_original: also train the unconverted model, for the accuracy comparison.
        out: the run folder (default `runs/<model>-<mode>`).
        recipe: a `Recipe`; defaults are the paper's.
        channels_per_group, include, exclude, variant: as for `keffconvert.convert`.
        image_size: square input side for a built-in name (default 224) or a model without a
            fixed input size.
        input_scale: pixels fed to the model: 'raw' 0..255, 'unit' 0..1, 'symmetric' -1..1, or
            'auto' ('raw' when the model starts by rescaling, as Keras EfficientNets do).
        calibration: finetune only: the images the data-aware conversion fits on before training:
            'train' (default: `calibration_samples` of the training images), another data
            source ('digits', an .npz, an image folder), or 'none' (the plain block-diagonal
            slices).
        calibration_samples: how many calibration images.
        force: start over in a folder holding a finished (or different) run.
        heatmap_images: Grad-CAM heatmaps of this many test images in the report (0: none).
        console: a `rich.console.Console` for progress; None prints nothing.
        command: the command line, recorded in the report.

    Returns:
        The report (the dict written to `report.json`).
    """
    from keffconvert.converter import convert
    from keffconvert.data.stream import data_errors
    from keffconvert.data.images_tf import gpu_available
    from keffconvert.train.distribute_tf import WorkerRunDir, start_strategy
    from keffconvert.data.pixels import INPUT_SCALES

    recipe = recipe or recipe_from_options(mode)
    if mode not in MODES:
        raise UsageConflict(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    recipe.validate(mode)
    strategy, worker = start_strategy(recipe.strategy)  # multiworker: before anything else runs TensorFlow
    if input_scale not in ("auto", *INPUT_SCALES):
        raise UsageConflict(f"input scale must be auto or one of {', '.join(INPUT_SCALES)}")
    name = source_name(model)
    out = Path(out) if out else default_out(model, mode)
    settings = json.loads(json.dumps({
        "model": name if isinstance(model, keras.Model) else os.fspath(model),
        "data": os.fspath(data), "mode": mode, "with_original": bool(with_original),
        "channels_per_group": int(channels_per_group), "include": list(include or []),
        "exclude": list(exclude or []), "image_size": image_size, "input_scale": input_scale,
        "recipe": asdict(recipe),
        "calibration": (os.fspath(calibration) if mode == "finetune" else None),
        "calibration_samples": int(calibration_samples),
        **({"variant": str(variant)} if str(variant) != "2021" else {}),  # runs from before --variant still resume
    }))
    run_dir = WorkerRunDir(out, worker, force)  # only the chief writes `out`; other workers a temporary copy
    out = run_dir.path
    resumed = check_run_dir(out, settings, force)
    say = sayer(console)
    if worker is not None:
        say(f"multi-worker training: this is {worker.describe()}"
            + ("" if worker.is_chief else f"; the chief writes {run_dir.out}"), highlight=False)

    source, dataset = load_model_and_data(model, data, image_size=image_size, recipe=recipe, unsafe=unsafe)
    scale = guess_input_scale(source) if input_scale == "auto" else input_scale
    from_logits = not ends_in_softmax(source)
    images = calibration_sample(calibration, calibration_samples, source, dataset, scale, recipe) \
        if mode == "finetune" else None
    if images is not None:
        say(f"fitting the conversion to the original on {len(images)} images", highlight=False)
    converted, plan = convert(source, channels_per_group, include=list(include or []),
                              exclude=list(exclude or []), transfer_weights=(mode == "finetune"), calibration=images,
                              variant=variant)
    if not plan.converted:
        raise UnsupportedModelError(f"{name}: no Conv2D is an eligible 1x1 convolution; nothing to train")
    if mode == "finetune" and isinstance(model, str) and not is_model_path(model):
        say(f"note: {name} is a built-in name without trained weights, so fine-tuning starts from "
            "random weights", highlight=False)

    start_run_dir(out, settings, force, resumed)
    if resumed:
        say(f"resuming the unfinished run in {out}", highlight=False)

    gpu = gpu_available()
    policy = precision_policy(recipe.mixed_precision, gpu)
    environment = _environment(policy, recipe.strategy, strategy, gpu)
    if worker is not None:
        environment.update(workers=worker.workers, worker=f"{worker.task_type}:{worker.index}",
                           chief=worker.is_chief)
    augment = None
    if recipe.augment:
        from keffconvert.data.images_tf import augmenter

        augment = augmenter(recipe.shift, recipe.zoom, recipe.flip, recipe.seed)
    global_batch = recipe.batch_size
    pipelines = {
        "train": dataset.pipeline("train", global_batch, scale=scale, training=True, augment=augment,
                                  seed=recipe.seed, repeat=recipe.steps_per_epoch is not None, cache=recipe.cache),
        "val": dataset.pipeline("val", global_batch, scale=scale, cache=recipe.cache),
        "test": dataset.pipeline("test", global_batch, scale=scale),
    }
    steps = recipe.steps_per_epoch or math.ceil(dataset.sizes["train"] / global_batch)

    jobs = ([("original", source, name)] if with_original else []) \
        + [("converted", converted, f"kEffNet-{name} (cpg {channels_per_group}"
                                    + (f", variant {variant})" if str(variant) != "2021" else ")"))]
    results = {}
    if mode == "finetune" and not with_original:
        with data_errors(dataset):
            results["original"] = reference_result(source, name, pipelines["test"],  # as it is, not retrained
                                             class_names=dataset.class_names, folder=out / "original")
    if mode == "finetune" and plan.fidelity is None:
        from keffconvert.report.fidelity import agreement
        from keffconvert.data.pixels import scale_pixels

        probe = scale_pixels(dataset.sample(("test",), FIDELITY_IMAGES), scale)
        plan.fidelity = dict(agreement(source, converted, probe), held_out=True)
        say(f"before training: top-1 agreement with the original {100 * plan.fidelity['top1_agreement']:.1f}% "
            f"on {plan.fidelity['samples']} test images", highlight=False)
    for key, template, label in jobs:
        teacher = source if (key == "converted" and mode == "finetune" and recipe.distills) else None
        try:
            with data_errors(dataset):  # an undecodable image: one line naming it; finished epochs kept
                results[key] = train_one(
                    key, template, label, out / key, recipe=recipe, mode=mode, policy=policy, strategy=strategy,
                    pipelines=pipelines, steps=steps, from_logits=from_logits, teacher=teacher, console=console,
                    recalibration_images=recalibration_images(recipe, dataset, scale),
                    num_classes=dataset.num_classes, class_names=dataset.class_names)
        except KeyboardInterrupt:
            say(f"stopped during {label}; finished epochs are saved in {out}: run the same command to resume",
                highlight=False)
            raise

    from keffconvert.report.training import build_report, write_report

    report = build_report(
        source=name, mode=mode, plan=plan, results=results, data=dataset.description, recipe=recipe,
        settings=settings, environment=environment, input_scale=scale, command=command, out=out)
    if worker is not None and not worker.is_chief:
        run_dir.cleanup()  # the chief writes the report
        return report
    if heatmap_images:
        report["heatmaps"] = _report_heatmaps(out, dataset, scale, heatmap_images, say)
    write_report(report, out)
    return report


def _report_heatmaps(out, dataset, scale, images, say):
    """Keep a sample of test images in the run folder and draw the report's Grad-CAM heatmaps of
    its first `images`; a model Grad-CAM cannot explain is noted, not an error."""
    from keffconvert.errors import UnsupportedModelError
    from keffconvert.report.heatmaps import HEATMAP_FILE, draw_heatmaps, load_models, model_paths, save_test_sample

    x, y = save_test_sample(out, dataset)
    try:
        return draw_heatmaps(load_models(model_paths(out)), x[:images], y[:images], dataset.class_names, scale,
                             out / HEATMAP_FILE)
    except UnsupportedModelError as error:
        say(f"no heatmaps: {error}", highlight=False)
        return {"skipped": str(error)}


def _environment(policy, strategy_name, strategy, gpu):
    import platform

    import tensorflow as tf

    return {
        "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
        "device": "gpu" if gpu else "cpu", "gpus": len(tf.config.list_physical_devices("GPU")),
        "precision": policy, "strategy": strategy_name, "replicas": int(strategy.num_replicas_in_sync),
    }
