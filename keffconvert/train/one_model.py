"""Train one model in its own folder (resuming there), then test its best checkpoint."""

import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import keras
import numpy as np

from keffconvert.errors import OutputError
from keffconvert.graph.model_info import count_params
from keffconvert.outputs import save_model, write_json
from keffconvert.train.backup import AtomicBackupAndRestore
from keffconvert.train.callbacks import BestCheckpoint, EpochLog, EpochProgress
from keffconvert.train.distill import Distiller
from keffconvert.train.finetune import (AveragedWeights, BatchNormRecalibration, ChanceWarning, DropoutOff,
                                        LinearWarmUp, TestEveryEpoch, freeze_batch_norms)
from keffconvert.train.precision import dtype_policy, rebuild
from keffconvert.train.recipe import make_optimizer


def sayer(console):
    """console.print for whole lines (no wrapping, no highlighting), or nothing without a console."""
    if console is None:
        return lambda *args, **kwargs: None
    return lambda text, **kwargs: console.print(text, highlight=False, soft_wrap=True)


def train_one(key, template, label, folder, *, recipe, mode, policy, strategy, pipelines, steps,
               from_logits, teacher, console, recalibration_images=None, num_classes=None, class_names=None):
    """Train one model in `folder` (resuming there), test its best checkpoint; result dict."""
    from keffconvert.train.distribute_tf import is_multiworker, same_progress

    done = folder / "result.json"
    say = sayer(console)
    same_progress(strategy, folder, label)  # several workers: all resume from the same epoch, or stop
    if done.exists():
        say(f"{label}: already trained in an earlier run ({done}); not retraining", highlight=False)
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(recipe.seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    with dtype_policy(policy), strategy.scope():
        net = rebuild(template, dtype=policy, copy_weights=(mode == "finetune"))
        if recipe.bn_mode == "frozen":
            freeze_batch_norms(net)
        saving = nullcontext if recipe.dropout else DropoutOff(net).restored  # BestCheckpoint's saves
        trainer = net
        if teacher is not None:
            frozen = rebuild(teacher, dtype=policy, copy_weights=True)
            trainer = Distiller(net, frozen, recipe.distill_temperature, recipe.distill_weight, from_logits,
                                feature_weight=recipe.feature_distill_weight, name=f"{net.name}_distiller")
            trainer(np.zeros((1, *net.inputs[0].shape[1:]), dtype="float32"))  # build before restoring
            if recipe.feature_distill_weight > 0:
                points = trainer.feature_points
                say(f"{label}: matching the original's {len(points)} residual block outputs" if points else
                    f"{label}: no residual block outputs to match (an Add both models have, in the original's "
                    "channel order): distilling the outputs only", highlight=False)
        trainer.compile(optimizer=make_optimizer(recipe), loss=loss,
                        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    trainable, total = count_params(net)
    # The backup is the one record of which epochs are done: restoring it also puts back the
    # history and best checkpoint of that epoch (dropping any written by an epoch that never
    # committed), so it runs before EpochLog and BestCheckpoint read them. Kept until result.json
    # is written: a run killed in between resumes with zero epochs left.
    backup = AtomicBackupAndRestore(
        str(folder / "backup"), files=[folder / "history.json", folder / "best.json", folder / "best.keras"],
        double_checkpoint=True, delete_checkpoint=False)
    with dtype_policy(policy), strategy.scope():
        finished = backup.restore(trainer)
    log = EpochLog(folder / "history.json")
    best = BestCheckpoint(net, folder, saving=saving)
    initial = initial_accuracy(folder, net, pipelines, mode)
    chance = ChanceWarning(num_classes or 2, say)
    callbacks = [
        keras.callbacks.LearningRateScheduler(recipe.learning_rate),
        *([LinearWarmUp(recipe.learning_rate, max(1, round(recipe.warmup_epochs * steps)))]
          if recipe.warmup_epochs else []),
        # before every callback that evaluates or saves the model: they see the averaged weights
        *([AveragedWeights(resumed=finished > 0)] if recipe.ema else []),
        *([BatchNormRecalibration(net, recalibration_images)] if recalibration_images is not None else []),
        *([TestEveryEpoch(net, pipelines["test"])] if recipe.track_test else []),
        chance,
        log, best,
        EpochProgress(label, steps, recipe.epochs, console, best),
        backup,  # last: it snapshots what the callbacks above wrote for the epoch
    ]
    say(f"{label}: {trainable:,} trainable parameters, "
        + (f"resuming after epoch {finished} of {recipe.epochs}" if finished else f"training {recipe.epochs} epochs"),
        highlight=False)
    with dtype_policy(policy):
        trainer.fit(pipelines["train"], validation_data=pipelines["val"], epochs=recipe.epochs, verbose=0,
                    steps_per_epoch=recipe.steps_per_epoch, shuffle=False,
                    callbacks=callbacks)  # the pipeline shuffles itself
    history = log.ordered(recipe.epochs)
    if len(history) != recipe.epochs or not best.path.exists():
        raise OutputError(f"{label}: training ended after {len(history)} of {recipe.epochs} epochs recorded in "
                          f"{folder} (was the run folder changed while training?); pass --force to start over")

    start = time.time()
    # Several workers: each tests the whole test split on its own (outside the strategy, which
    # would average per-worker accuracies of unequal shards), so the figure is exact.
    with dtype_policy(policy), (nullcontext() if is_multiworker(strategy) else strategy.scope()):
        model = keras.models.load_model(best.path, compile=False)
        model.compile(loss=loss, metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    test_loss, test_acc = model.evaluate(pipelines["test"], verbose=0)
    result = {
        "key": key, "name": label, "model_name": net.name,
        "trainable_params": trainable, "total_params": total,
        "test_accuracy": float(test_acc), "test_loss": float(test_loss),
        "best_epoch": best.state["epoch"], "best_val_accuracy": best.state["val_accuracy"],
        "best_val_loss": best.state["val_loss"], "epochs": len(history),
        "train_time_s": round(sum(e["time_s"] for e in history), 3),
        "test_time_s": round(time.time() - start, 3),
        "checkpoint": f"{key}/best.keras", "history": history,
        "distilled": teacher is not None, "initial": initial,
        "matched_block_outputs": list(getattr(trainer, "feature_points", [])),
        "warnings": [chance.warning] if chance.warning else [],
    }
    if class_names is not None:
        result["per_class"] = per_class_of(model, pipelines["test"], class_names)
    say(f"{label}: test accuracy {100 * test_acc:.2f}%  loss {test_loss:.4f}  "
        f"(best epoch {result['best_epoch']} of {recipe.epochs})", highlight=False)
    write_json(done, result, force=True)
    shutil.rmtree(folder / "backup", ignore_errors=True)
    return result


def initial_accuracy(folder, net, pipelines, mode):
    """Validation and test accuracy before any training (fine-tuning starts from a fitted model),
    measured once and kept in the run folder so a resumed run reports the same."""
    if mode != "finetune":
        return None
    path = folder / "initial.json"
    if path.exists():
        return json.loads(path.read_text())
    from keffconvert.train.finetune import evaluate_accuracy

    initial = {"val_accuracy": evaluate_accuracy(net, pipelines["val"]),
               "test_accuracy": evaluate_accuracy(net, pipelines["test"])}
    write_json(path, initial, force=True)
    return initial


def reference_result(source, name, test, class_names=None, folder=None):
    """The original as it is (fine-tuning does not retrain it): its test accuracy, for comparison;
    saved as `folder/reference.keras` so the run folder holds both models (heatmaps)."""
    from keffconvert.train.finetune import evaluate_accuracy

    trainable, total = count_params(source)
    result = {"key": "original", "name": name, "model_name": source.name, "trainable_params": trainable,
              "total_params": total, "test_accuracy": evaluate_accuracy(source, test), "test_loss": None,
              "epochs": 0, "train_time_s": 0.0, "test_time_s": 0.0, "history": [], "reference": True}
    if class_names is not None:
        result["per_class"] = per_class_of(source, test, class_names)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_model(source, Path(folder) / "reference.keras", force=True)
    return result


def per_class_of(model, test, class_names):
    """Per-class precision, recall, F1 and the confusion matrix of `model` on the test pipeline."""
    from keffconvert.report.per_class import per_class_results

    labels, predicted = [], []
    for x, y in test:  # called directly: no predict function to trace for one pass
        labels.append(np.asarray(y))
        predicted.append(np.asarray(model(x, training=False)).argmax(axis=-1))
    return per_class_results(np.concatenate(labels), np.concatenate(predicted), class_names)
