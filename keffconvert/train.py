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
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import keras
import numpy as np
from keras import ops

from keffconvert.errors import DataError, OutputError, UnsupportedModelError, UsageConflict
from keffconvert.feature_distill import feature_loss, matching_layers, tapped
from keffconvert.finetune import (BN_MODES, FINETUNE_DEFAULTS, AveragedWeights, BatchNormRecalibration,
                                  ChanceWarning, DropoutOff, LinearWarmUp, TestEveryEpoch, freeze_batch_norms)
from keffconvert.keras_compat import producing_layer, set_initial_epoch
from keffconvert.loading import MODEL_SUFFIXES, is_model_path
from keffconvert.model_info import count_params, input_shape, leaf_layers
from keffconvert.outputs import save_model, write_json

__all__ = ["AtomicBackupAndRestore", "BestCheckpoint", "Distiller", "EpochLog", "Recipe", "ends_in_softmax",
           "guess_input_scale", "rebuild", "recipe_from_options", "train"]

RUN_FORMAT = "keffconvert-run/1"
MODES = ("scratch", "finetune")
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
RUN_FILES = ("report.json", "report.md", "run.json")
MODEL_DIRS = ("original", "converted")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # layers whose precision --mixed-precision sets
FIDELITY_IMAGES = 2048  # test images the agreement before fine-tuning is measured on (at most)


@dataclass
class Recipe:
    """How to train. The defaults are the paper's (METHOD.md, "Training recipe").

    On a small data set such as digits at 32x32 (21 steps an epoch), validation accuracy stays
    near chance for many epochs and then swings from one epoch to the next, because batch-norm
    moving statistics lag the weights. So the best-checkpoint selection is what makes the result
    usable, and a run needs enough epochs for the comparison between the original and the
    converted model to be more than noise; a lower learning rate was no steadier, so the defaults
    stay the paper's and only the epochs (default 50, the paper's CIFAR-10 figure) need choosing.
    The measured figures behind this (accuracies per epoch count and seed) come from `make main`
    (`runs/main/report.md`) and are kept in one place, README.md, "Train and report".
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.003
    lr_decay: float = 0.99
    warmup_epochs: float = 0.0  # the learning rate ramps up linearly over this many epochs' steps
    ema: float = 0.0  # > 0: evaluate and keep an average of the weights with this momentum per step
    optimizer: str = "rmsprop"
    seed: int = 0
    # The validation and test hold-outs' seed (None: `seed`). Fixed while `seed` varies, repeated
    # runs differ only in initialisation, calibration draw, shuffling and augmentation, and a
    # fine-tuned model is tested on the images its original was tested on (not ones it trained on).
    split_seed: int | None = None
    val_split: float = 0.1
    test_split: float = 0.2
    augment: bool = True
    shift: float = 0.1
    zoom: float = 0.1
    flip: bool = False
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    feature_distill_weight: float = 0.0  # weight of matching the original's block outputs (finetune)
    dropout: bool = True  # False: the model's dropout layers pass inputs through while it trains
    mixed_precision: str = "auto"  # auto: on when a GPU is visible; "on"; "off" (see precision_policy)
    strategy: str = "default"  # "mirrored" (local GPUs), "multiworker" (TF_CONFIG): keffconvert.distribute_tf
    bn_mode: str = "train"  # or "frozen", "recalibrate": see keffconvert.finetune
    track_test: bool = False  # also evaluate the test split after every epoch (curves only)
    # How the data is read (keffconvert.data_stream): None runs each epoch over the training split
    # once; N runs N batches an epoch over an endless stream (as Model.fit's steps_per_epoch).
    steps_per_epoch: int | None = None
    cache: str | None = None  # streamed data: keep decoded images, "memory" or a file prefix
    image_key: str = "image/encoded"  # TFRecord feature keys
    label_key: str = "image/class/label"

    @property
    def distills(self):
        """Whether training needs the original as a teacher (its outputs, its block outputs, or both)."""
        return self.distill_weight > 0 or self.feature_distill_weight > 0

    def learning_rate(self, epoch):
        """The learning rate of `epoch` (0-based): lr * lr_decay ** epoch."""
        return float(self.lr * self.lr_decay ** epoch)

    def validate(self, mode):
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            problems.append(f"steps per epoch must be at least 1 (got {self.steps_per_epoch})")
        if self.warmup_epochs < 0:
            problems.append(f"warm-up epochs must be at least 0 (got {self.warmup_epochs})")
        if not 0 <= self.ema < 1:
            problems.append(f"need 0 <= ema < 1 (got {self.ema})")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            problems.append(f"need lr > 0 and 0 < lr-decay <= 1 (got {self.lr}, {self.lr_decay})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.distill_weight <= 1 or not self.distill_temperature > 0:
            problems.append("need 0 <= distill-weight <= 1 and distill-temperature > 0")
        if self.distill_weight > 0 and mode != "finetune":
            problems.append("distillation needs --mode finetune (the teacher is the original's trained weights)")
        if self.feature_distill_weight < 0:
            problems.append(f"feature-distill-weight must be at least 0 (got {self.feature_distill_weight})")
        if self.feature_distill_weight > 0 and mode != "finetune":
            problems.append("feature distillation needs --mode finetune (the teacher is the original's trained weights)")
        if self.mixed_precision not in ("auto", "on", "off"):
            problems.append(f"mixed precision must be auto, on or off (got {self.mixed_precision!r})")
        if self.bn_mode not in BN_MODES:
            problems.append(f"bn mode must be one of {', '.join(BN_MODES)} (got {self.bn_mode!r})")
        if self.strategy not in ("default", "mirrored", "multiworker"):
            problems.append(f"strategy must be default, mirrored or multiworker (got {self.strategy!r})")
        if problems:
            raise UsageConflict("; ".join(problems))

    def describe(self):
        text = (f"{self.optimizer} lr {self.lr:g} * {self.lr_decay:g}**epoch, batch {self.batch_size}, "
                f"{self.epochs} epochs"
                + (f" of {self.steps_per_epoch} steps" if self.steps_per_epoch else "")
                + (f", linear warm-up over {self.warmup_epochs:g} epochs" if self.warmup_epochs else "")
                + (f", weights averaged (EMA momentum {self.ema:g})" if self.ema else "")
                + f", seed {self.seed}"
                + (f", split seed {self.split_seed}" if self.split_seed is not None else "") + ", ")
        if self.augment:
            parts = [f"shift {self.shift:g}" if self.shift else "", f"zoom {self.zoom:g}" if self.zoom else "",
                     "horizontal flip" if self.flip else ""]
            text += "augmentation: " + ", ".join(p for p in parts if p)
        else:
            text += "no augmentation"
        if self.distill_weight > 0:
            text += f", distillation weight {self.distill_weight:g} at temperature {self.distill_temperature:g}"
        if self.feature_distill_weight > 0:
            text += f", block outputs matched with weight {self.feature_distill_weight:g}"
        if self.bn_mode != "train":
            text += f", batch norms {self.bn_mode}"
        if not self.dropout:
            text += ", dropout off"
        return text


# ---------------------------------------------------------------------------------------------
# Models


def output_layer(model):
    """The (innermost) layer producing `model`'s first output."""
    layer = producing_layer(model.outputs[0])
    while isinstance(layer, keras.Model):
        layer = producing_layer(layer.outputs[0])
    return layer


def ends_in_softmax(model):
    """True when the model outputs probabilities (a softmax), so the loss is not from logits."""
    layer = output_layer(model)
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", "") == "softmax"


def guess_input_scale(model):
    """'raw' (0..255) when the model rescales its own input (Keras EfficientNet), else 'unit'."""
    for layer in leaf_layers(model)[:4]:
        if isinstance(layer, keras.layers.Rescaling):
            return "raw"
    return "unit"


def rebuild(model, *, dtype="float32", copy_weights=False):
    """A fresh copy of `model` built from its layers' configs (so freshly initialised).

    `dtype` (float32, mixed_float16, mixed_bfloat16) becomes the policy of every floating-point
    layer, whatever policy the model was saved with, except the output layer, which is float32 so
    the softmax and the loss are computed in full precision. `copy_weights` copies every weight
    over (fine-tuning); otherwise nothing is transferred except the state of `Normalization`
    layers, which is input preprocessing rather than something training learns.
    """
    keep = {output_layer(model).name}

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config and getattr(layer, "compute_dtype", None) in FLOAT_DTYPES:
            config["dtype"] = "float32" if layer.name in keep else dtype
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    if copy_weights:
        new.set_weights(model.get_weights())
    else:
        fresh = {layer.name: layer for layer in leaf_layers(new)}
        for layer in leaf_layers(model):
            if isinstance(layer, keras.layers.Normalization) and layer.name in fresh and layer.weights:
                fresh[layer.name].set_weights(layer.get_weights())
    return new


@contextmanager
def dtype_policy(name):
    """Set Keras' global dtype policy for the block (Keras wraps the optimizer for loss scaling)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def precision_policy(setting, gpu):
    """The Keras dtype policy for `--mixed-precision` `setting` ('auto', 'on', 'off').

    On a GPU, mixed_float16 (what the paper trained in): Keras wraps the optimizer in a
    `LossScaleOptimizer` so small float16 gradients do not underflow. On a CPU ('on' only; 'auto'
    stays float32 there), mixed_bfloat16: TensorFlow's CPU kernels run every layer keffconvert
    trains in both, but bfloat16 has float32's exponent range, so it needs no loss scaling, and it
    is the half format CPUs accelerate (AVX512-BF16, AMX). Either way `rebuild` keeps the output
    layer in float32, and the losses (the distillation term too) are computed in float32.
    """
    if setting == "off" or (setting == "auto" and not gpu):
        return "float32"
    return "mixed_float16" if gpu else "mixed_bfloat16"


@keras.saving.register_keras_serializable(package="keffconvert")
class Distiller(keras.Model):
    """Trains `student` on (1 - weight) * cross-entropy + weight * T**2 * KL(teacher_T || student_T),
    plus feature_weight * the relative error of its block outputs (`keffconvert.feature_distill`).

    The teacher (the original model, frozen) is run in inference mode on the same augmented batch.
    Outputs may be probabilities (softmax) or logits: probabilities are turned into logits by a
    log, which a softmax undoes exactly. Validation loss is the plain cross-entropy, so it is
    comparable with a model trained without distillation.
    """

    def __init__(self, student, teacher, temperature=4.0, weight=0.5, from_logits=False, feature_weight=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.from_logits = bool(from_logits)
        self.feature_weight = float(feature_weight)
        self.feature_points = matching_layers(student, teacher) if self.feature_weight > 0 else []
        if self.feature_points:
            self._student_taps = tapped(student, self.feature_points)
            self._teacher_taps = tapped(teacher, self.feature_points)

    def call(self, inputs, training=None):
        """The student's outputs; in training, the distillation terms are added as losses (one
        pass of each network serves both)."""
        if not training or (self.weight == 0 and not self.feature_points):
            return self.student(inputs, training=training)
        if self.feature_points:
            student, *student_features = self._student_taps(inputs, training=training)
            teacher, *teacher_features = self._teacher_taps(inputs, training=False)
            self.add_loss(self.feature_weight * feature_loss(student_features, teacher_features))
        else:
            student, teacher = self.student(inputs, training=training), self.teacher(inputs, training=False)
        if self.weight > 0:
            self.add_loss(self.weight * self.distillation_loss(student, teacher))
        return student

    def _logits(self, outputs):
        outputs = ops.cast(outputs, "float32")
        return outputs if self.from_logits else ops.log(ops.clip(outputs, 1e-7, 1.0))

    def distillation_loss(self, student_outputs, teacher_outputs):
        t = self.temperature
        teacher_p = ops.softmax(self._logits(teacher_outputs) / t, axis=-1)
        student_logp = ops.log_softmax(self._logits(student_outputs) / t, axis=-1)
        teacher_logp = ops.log(ops.maximum(teacher_p, 1e-12))
        kl = ops.sum(teacher_p * (teacher_logp - student_logp), axis=-1)
        return ops.mean(kl) * (t * t)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Keras adds the losses added in `call` (the distillation terms, regularisers) to the
        # cross-entropy; only the cross-entropy is scaled by (1 - weight).
        total = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        if not training or self.weight == 0:
            return total
        added = ops.sum(ops.stack([ops.cast(loss, "float32") for loss in self.losses])) if self.losses else 0.0
        return (1.0 - self.weight) * (ops.cast(total, "float32") - added) + added


def make_optimizer(recipe):
    """The recipe's optimizer; with `recipe.ema` it also keeps the weights' moving average."""
    options = dict(learning_rate=recipe.learning_rate(0))
    if recipe.ema:
        options.update(use_ema=True, ema_momentum=recipe.ema)
    if recipe.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(**options)
    if recipe.optimizer == "adam":
        return keras.optimizers.Adam(**options)
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(**options)
    return keras.optimizers.SGD(momentum=0.9, **options)


# ---------------------------------------------------------------------------------------------
# Callbacks


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore where one epoch's checkpoint is one atomic step.

    After every epoch the whole training state goes into a new folder `epoch-NNNN.partial` in
    `backup_dir`: the weights (the model's and the optimizer's, `latest.weights.h5`), the
    metadata (`training_metadata.json`: the epoch count) and a private copy of `files`, the run
    files the other callbacks wrote for that epoch (the history and the best checkpoint; a file
    unchanged since the previous epoch's backup is hard-linked from it rather than copied).
    Everything is fsynced, then the folder is renamed to `epoch-NNNN`: that rename is the commit.
    Older epochs are dropped afterwards; with `double_checkpoint` the previous epoch is kept, and
    restored when the newest cannot be read.

    `restore` (called by `on_train_begin`, or earlier by the caller) loads the newest complete
    epoch and puts its copy of `files` back in place, replacing any written by an epoch that never
    committed; with no complete epoch it removes them all and training starts over. A kill at any
    point therefore leaves either epoch N or epoch N+1 restorable, never a mix.
    """

    WEIGHTS = "latest.weights.h5"
    METADATA = "training_metadata.json"

    def __init__(self, backup_dir, files=(), double_checkpoint=False, delete_checkpoint=True, save_freq="epoch"):
        if save_freq != "epoch":
            raise ValueError("AtomicBackupAndRestore only backs up at the end of an epoch (save_freq='epoch')")
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self.folder = Path(backup_dir)
        self.files = [Path(f) for f in files]
        if len({f.name for f in self.files}) != len(self.files):
            raise ValueError("the files to back up need distinct names")
        self.restored_epoch = None
        self._restored_model = None

    def _reached(self, point):
        """Called at each named step of the checkpoint (tests kill the process here)."""

    # -- saving --------------------------------------------------------------------------------

    def _committed(self):
        """{epoch: folder} of the complete backups."""
        found = {}
        if self.folder.is_dir():
            for entry in self.folder.iterdir():
                if entry.is_dir() and entry.name.startswith("epoch-") and entry.name[6:].isdigit():
                    found[int(entry.name[6:])] = entry
        return found

    def _drop(self, path):
        """Remove `path` (renamed first, so a half-deleted folder never looks complete)."""
        if path.is_dir() and not path.name.endswith(".drop"):
            doomed = path.with_name(path.name + ".drop")
            if doomed.exists():
                shutil.rmtree(doomed)
            os.rename(path, doomed)
            _fsync(self.folder)
            path = doomed
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def _save_model(self):
        epoch = self._current_epoch
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"epoch-{epoch:04d}"
        partial = self.folder / f"epoch-{epoch:04d}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        self.model.save_weights(str(partial / self.WEIGHTS), overwrite=True)
        self._reached("weights-saved")
        previous = self._newest_metadata(before=epoch)
        snapshot = []
        for path in self.files:
            if not path.exists():
                continue
            snapshot.append(path.name)
            before = previous[0] / path.name if previous else None
            if before is not None and _same_content(path, before):
                _link_or_copy(before, partial / path.name)  # unchanged since the previous epoch
            else:
                shutil.copy2(path, partial / path.name)
        (partial / self.METADATA).write_text(json.dumps({"epoch": epoch, "batch": 0, "files": snapshot}))
        for name in (self.WEIGHTS, self.METADATA, *snapshot):
            _fsync(partial / name)
        _fsync(partial)
        self._reached("staged")
        if final.exists():  # only after a restore fell back past it
            self._drop(final)
        os.rename(partial, final)
        _fsync(self.folder)
        self._reached("committed")
        keep = {epoch, max((e for e in self._committed() if e < epoch), default=None)} \
            if self.double_checkpoint else {epoch}
        for old, path in self._committed().items():
            if old not in keep:
                self._drop(path)

    def _newest_metadata(self, before):
        """(folder, metadata) of the newest complete backup before epoch `before`, or None."""
        for done, path in sorted(self._committed().items(), reverse=True):
            if done < before:
                try:
                    return path, json.loads((path / self.METADATA).read_text())
                except (OSError, ValueError):
                    return None
        return None

    # -- restoring -----------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self._restored_model is not self.model:
            self.restore(self.model)
        else:
            set_initial_epoch(self.model, self.restored_epoch)

    def _load_model(self):
        self.restore(self.model)

    def restore(self, model):
        """Restore `model` and the run files from the newest complete backup; the epochs done.

        Call it inside the distribution strategy's scope (it may build the optimizer).
        """
        if not model.built:
            raise ValueError("To use the BackupAndRestore callback, your model must be built before fit()")
        epoch, errors = 0, []
        committed = self._committed()
        for candidate in sorted(committed, reverse=True):
            path = committed[candidate]
            try:
                metadata = json.loads((path / self.METADATA).read_text())
                missing = [n for n in [self.WEIGHTS, *metadata["files"]] if not (path / n).is_file()]
                if missing or int(metadata["epoch"]) != candidate:
                    raise ValueError(f"incomplete (missing {', '.join(missing) or 'nothing'})")
                if model.optimizer is not None and not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                model.load_weights(str(path / self.WEIGHTS))
            except (OSError, ValueError, KeyError, TypeError) as error:
                errors.append(f"{path.name}: {error}")
                if not self.double_checkpoint:
                    break
                continue
            epoch = candidate
            snapshot = set(metadata["files"])
            for target in self.files:
                if target.name not in snapshot:
                    if target.exists():
                        target.unlink()
                elif not _same_content(path / target.name, target):
                    _copy_into_place(path / target.name, target)  # written after the commit
            break
        if errors and not epoch:
            raise OutputError(f"the backup in {self.folder} cannot be restored ({'; '.join(errors)}); "
                              "remove it (or pass --force) to start over")
        if not epoch:
            for target in self.files:  # written by an epoch that never committed
                if target.exists():
                    target.unlink()
        if self.folder.is_dir():
            keep = {path for done, path in committed.items() if done <= epoch}
            for entry in list(self.folder.iterdir()):  # partial, dropped, unreadable or older-format backups
                if entry not in keep:
                    self._drop(entry)
        set_initial_epoch(model, epoch)
        self.restored_epoch, self._restored_model = epoch, model
        return epoch


def _fsync(path):
    """Flush a file's (or a folder's) content to disk; a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_content(a, b):
    """True when the files `a` and `b` both exist and hold the same bytes."""
    try:
        if not (os.path.isfile(a) and os.path.isfile(b)) or os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                chunk = fa.read(1 << 20)
                if chunk != fb.read(1 << 20):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _copy_into_place(source, target):
    """Make `target` a copy of `source` with one rename."""
    tmp = target.with_name(f".{target.name}.restore")
    shutil.copy2(source, tmp)
    _fsync(tmp)
    os.replace(tmp, target)


class EpochLog(keras.callbacks.Callback):
    """Writes every finished epoch's metrics, learning rate and duration to `history.json`."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self.epochs = {}
        if self.path.exists():
            self.epochs = {int(k): v for k, v in json.loads(self.path.read_text())["epochs"].items()}
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch + 1}
        entry.update({k: float(v) for k, v in (logs or {}).items()})
        entry["time_s"] = round(time.time() - self._start, 3)
        self.epochs[epoch] = entry
        write_json(self.path, {"epochs": {str(k): self.epochs[k] for k in sorted(self.epochs)}}, force=True)

    def ordered(self, epochs):
        return [self.epochs[e] for e in range(epochs) if e in self.epochs]


class BestCheckpoint(keras.callbacks.Callback):
    """Saves `target` to `best.keras` whenever validation accuracy improves (ties: lower loss);
    `saving` is a context the save runs in (`DropoutOff.restored`)."""

    def __init__(self, target, folder, saving=nullcontext):
        super().__init__()
        self.target = target
        self.saving = saving
        self.path = Path(folder) / "best.keras"
        self.state_path = Path(folder) / "best.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else None
        self.improved = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        acc, loss = float(logs.get("val_accuracy", float("nan"))), float(logs.get("val_loss", float("inf")))
        best = self.state
        self.improved = (best is None or acc > best["val_accuracy"]
                         or (acc == best["val_accuracy"] and loss < best["val_loss"]))
        if self.improved:
            with self.saving():
                save_model(self.target, self.path, force=True)
            self.state = {"epoch": epoch + 1, "val_accuracy": acc, "val_loss": loss}
            write_json(self.state_path, self.state, force=True)


class EpochProgress(keras.callbacks.Callback):
    """A rich progress bar while an epoch runs (on a terminal) and one summary line per epoch."""

    def __init__(self, label, steps, epochs, console, best):
        super().__init__()
        self.label, self.steps, self.epochs, self.console, self.best = label, steps, epochs, console, best
        self.progress = self.task = None
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()
        if self.console is not None and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"),
                                     console=self.console, transient=True)
            self.task = self.progress.add_task(f"{self.label} epoch {epoch + 1}/{self.epochs}",
                                               total=self.steps, metrics="")
            self.progress.start()

    def on_train_batch_end(self, batch, logs=None):
        if self.progress is not None:
            logs = logs or {}
            metrics = "  ".join(f"{k} {float(logs[k]):.4f}" for k in ("loss", "accuracy") if k in logs)
            self.progress.update(self.task, completed=batch + 1, metrics=metrics)

    def on_epoch_end(self, epoch, logs=None):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.console is None:
            return
        logs = logs or {}
        parts = [f"{k} {float(logs[k]):.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs]
        if "learning_rate" in logs:
            parts.append(f"lr {float(logs['learning_rate']):.2e}")
        mark = "  best so far, saved" if self.best.improved else ""
        self.console.print(f"{self.label} epoch {epoch + 1}/{self.epochs}: " + "  ".join(parts)
                           + f"  ({time.time() - self._start:.1f} s){mark}", highlight=False, soft_wrap=True)

    def on_train_end(self, logs=None):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ---------------------------------------------------------------------------------------------
# The run folder


def check_run_dir(out, settings, force):
    """Refuse a finished run (without `force`) or an unfinished one with other settings.

    Returns True when `out` holds an unfinished run with the same settings (to resume). Writes
    nothing: the folder is only set up by `start_run_dir`, once model and data have loaded.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    report, run_file = out / "report.json", out / "run.json"
    if report.exists() and not force:
        raise OutputError(f"{out} holds a finished run ({report}); pass --force to start over, "
                          "or choose another --out")
    if force or not run_file.exists():
        return False
    try:
        previous = json.loads(run_file.read_text())["settings"]
    except (ValueError, KeyError, OSError) as error:
        raise OutputError(f"{run_file} is unreadable ({error}); pass --force to start over") from error
    progress = any((out / name / "history.json").exists() for name in MODEL_DIRS)
    if isinstance(previous.get("recipe"), dict):  # a recipe field added since: its default is what that run did
        previous["recipe"] = {**asdict(Recipe()), **previous["recipe"]}
    if previous != settings and progress:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise OutputError(f"{out} holds an unfinished run with other settings ({', '.join(changed)}); "
                          "run the same command to resume it, pass --force to start over, or choose another --out")
    return progress


def start_run_dir(out, settings, force, resumed):
    """Create the run folder (clearing an earlier run's files with `force`) and record the settings."""
    out = Path(out)
    if force or not resumed:
        clear_run(out)
    make_output_dir(out)
    write_json(out / "run.json", {"format": RUN_FORMAT, "settings": settings}, force=True)


def make_output_dir(out):
    """Create `out` (and its parents), or say in one line why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create {out}: {error.strerror or error}") from error
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")


def clear_run(out):
    """Remove what a previous run wrote in `out` (only the files and folders train creates)."""
    from keffconvert.heatmaps import HEATMAP_FILE, SAMPLE_FILE
    from keffconvert.report import CONFUSION_FILES, PLOT_FILES

    if not ((out / "run.json").is_file() or (out / "report.json").is_file()):
        return  # not a run folder: touch nothing
    for name in (*RUN_FILES, *PLOT_FILES.values(), *CONFUSION_FILES.values(), HEATMAP_FILE, SAMPLE_FILE):
        if (out / name).is_file():
            (out / name).unlink()
    for name in MODEL_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


# ---------------------------------------------------------------------------------------------
# Training


def _source_name(model):
    if isinstance(model, keras.Model):
        return model.name
    path = Path(os.fspath(model))
    return path.stem if path.suffix.lower() in MODEL_SUFFIXES else os.fspath(model).lower()


def default_out(model, mode):
    return Path("runs") / f"{_source_name(model).replace('/', '_')}-{mode}"


def _image_input_shape(model):
    """(height, width, channels) of `model`'s input, each possibly None; refuses non-image models."""
    shape = input_shape(model)
    if shape is None or len(shape) != 3:
        raise UnsupportedModelError(f"{model.name} takes input of shape {shape}; train needs images (H, W, C)")
    return shape


def load_model_and_data(model, data, *, image_size, recipe, unsafe):
    """(source model, data): the data at the model's input size, the model's classes checked.

    The data is a `data.Dataset` (digits, .npz: in memory) or a `data_stream.StreamDataset` (image
    folders, TFRecords: file lists only, decoded as training reads them).
    """
    from keffconvert.data import open_data as load_dataset

    split = dict(val_split=recipe.val_split, test_split=recipe.test_split,
                 seed=recipe.seed if recipe.split_seed is None else recipe.split_seed)
    if recipe.image_key != "image/encoded" or recipe.label_key != "image/class/label":
        split.update(image_key=recipe.image_key, label_key=recipe.label_key)
    if isinstance(model, str) and not is_model_path(model):
        from keffconvert.loading import load_model

        size = image_size or 224
        dataset = load_dataset(data, (size, size), 3, **split)
        source = load_model(model, unsafe=unsafe, classes=dataset.num_classes, input_size=size)
        return source, dataset
    if isinstance(model, keras.Model):
        source = model
    else:
        from keffconvert.loading import load_model

        source = load_model(model, unsafe=unsafe)
    height, width, channels = _image_input_shape(source)
    if height is None or width is None:
        height = width = image_size or 224
    elif image_size is not None and (image_size, image_size) != (height, width):
        raise UsageConflict(f"--image-size {image_size} contradicts the model's input {height}x{width}")
    dataset = load_dataset(data, (height, width), channels or 3, **split)
    units = source.outputs[0].shape[-1]
    if units != dataset.num_classes:
        raise DataError(f"the model has {units} outputs but the data has {dataset.num_classes} classes "
                        f"(labels 0..{dataset.num_classes - 1})")
    return source, dataset


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
    from keffconvert.convert import convert
    from keffconvert.data_stream import data_errors
    from keffconvert.data_tf import gpu_available
    from keffconvert.distribute_tf import WorkerRunDir, start_strategy
    from keffconvert.model_inputs import INPUT_SCALES

    recipe = recipe or recipe_from_options(mode)
    if mode not in MODES:
        raise UsageConflict(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    recipe.validate(mode)
    strategy, worker = start_strategy(recipe.strategy)  # multiworker: before anything else runs TensorFlow
    if input_scale not in ("auto", *INPUT_SCALES):
        raise UsageConflict(f"input scale must be auto or one of {', '.join(INPUT_SCALES)}")
    name = _source_name(model)
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
    say = _sayer(console)
    if worker is not None:
        say(f"multi-worker training: this is {worker.describe()}"
            + ("" if worker.is_chief else f"; the chief writes {run_dir.out}"), highlight=False)

    source, dataset = load_model_and_data(model, data, image_size=image_size, recipe=recipe, unsafe=unsafe)
    scale = guess_input_scale(source) if input_scale == "auto" else input_scale
    from_logits = not ends_in_softmax(source)
    images = _calibration(calibration, calibration_samples, source, dataset, scale, recipe) \
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
        from keffconvert.data_tf import augmenter

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
            results["original"] = _reference(source, name, pipelines["test"],  # as it is, not retrained
                                             class_names=dataset.class_names, folder=out / "original")
    if mode == "finetune" and plan.fidelity is None:
        from keffconvert.fidelity import agreement
        from keffconvert.model_inputs import scale_pixels

        probe = scale_pixels(dataset.sample(("test",), FIDELITY_IMAGES), scale)
        plan.fidelity = dict(agreement(source, converted, probe), held_out=True)
        say(f"before training: top-1 agreement with the original {100 * plan.fidelity['top1_agreement']:.1f}% "
            f"on {plan.fidelity['samples']} test images", highlight=False)
    for key, template, label in jobs:
        teacher = source if (key == "converted" and mode == "finetune" and recipe.distills) else None
        try:
            with data_errors(dataset):  # an undecodable image: one line naming it; finished epochs kept
                results[key] = _train_one(
                    key, template, label, out / key, recipe=recipe, mode=mode, policy=policy, strategy=strategy,
                    pipelines=pipelines, steps=steps, from_logits=from_logits, teacher=teacher, console=console,
                    recalibration_images=_recalibration_images(recipe, dataset, scale),
                    num_classes=dataset.num_classes, class_names=dataset.class_names)
        except KeyboardInterrupt:
            say(f"stopped during {label}; finished epochs are saved in {out}: run the same command to resume",
                highlight=False)
            raise

    from keffconvert.report import build_report, write_report

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
    from keffconvert.heatmaps import HEATMAP_FILE, draw_heatmaps, load_models, model_paths, save_test_sample

    x, y = save_test_sample(out, dataset)
    try:
        return draw_heatmaps(load_models(model_paths(out)), x[:images], y[:images], dataset.class_names, scale,
                             out / HEATMAP_FILE)
    except UnsupportedModelError as error:
        say(f"no heatmaps: {error}", highlight=False)
        return {"skipped": str(error)}


def _calibration(spec, samples, source, dataset, scale, recipe):
    """Calibration images for the data-aware conversion, or None for the plain slices."""
    from keffconvert.model_inputs import calibration_images

    if spec is None or os.fspath(spec) == "none":
        return None
    if os.fspath(spec) == "train":
        return _training_sample(dataset, scale, samples, recipe.seed)
    return calibration_images(spec, source, samples=samples, seed=recipe.seed, scale=scale,
                              image_key=recipe.image_key, label_key=recipe.label_key).calibration


def _recalibration_images(recipe, dataset, scale, samples=512):
    return _training_sample(dataset, scale, samples, recipe.seed + 1) if recipe.bn_mode == "recalibrate" else None


def _training_sample(dataset, scale, samples, seed):
    """`samples` training images (a seeded draw, in their original order), scaled for the model."""
    from keffconvert.model_inputs import scale_pixels

    return scale_pixels(dataset.sample(("train",), samples, seed), scale)


def _reference(source, name, test, class_names=None, folder=None):
    """The original as it is (fine-tuning does not retrain it): its test accuracy, for comparison;
    saved as `folder/reference.keras` so the run folder holds both models (heatmaps)."""
    from keffconvert.finetune import evaluate_accuracy

    trainable, total = count_params(source)
    result = {"key": "original", "name": name, "model_name": source.name, "trainable_params": trainable,
              "total_params": total, "test_accuracy": evaluate_accuracy(source, test), "test_loss": None,
              "epochs": 0, "train_time_s": 0.0, "test_time_s": 0.0, "history": [], "reference": True}
    if class_names is not None:
        result["per_class"] = _per_class(source, test, class_names)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_model(source, Path(folder) / "reference.keras", force=True)
    return result


def _per_class(model, test, class_names):
    """Per-class precision, recall, F1 and the confusion matrix of `model` on the test pipeline."""
    from keffconvert.per_class import per_class_results

    labels, predicted = [], []
    for x, y in test:  # called directly: no predict function to trace for one pass
        labels.append(np.asarray(y))
        predicted.append(np.asarray(model(x, training=False)).argmax(axis=-1))
    return per_class_results(np.concatenate(labels), np.concatenate(predicted), class_names)


def _sayer(console):
    """console.print for whole lines (no wrapping, no highlighting), or nothing without a console."""
    if console is None:
        return lambda *args, **kwargs: None
    return lambda text, **kwargs: console.print(text, highlight=False, soft_wrap=True)


def _environment(policy, strategy_name, strategy, gpu):
    import platform

    import tensorflow as tf

    return {
        "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
        "device": "gpu" if gpu else "cpu", "gpus": len(tf.config.list_physical_devices("GPU")),
        "precision": policy, "strategy": strategy_name, "replicas": int(strategy.num_replicas_in_sync),
    }


def _train_one(key, template, label, folder, *, recipe, mode, policy, strategy, pipelines, steps,
               from_logits, teacher, console, recalibration_images=None, num_classes=None, class_names=None):
    """Train one model in `folder` (resuming there), test its best checkpoint; result dict."""
    from keffconvert.distribute_tf import is_multiworker, same_progress

    done = folder / "result.json"
    say = _sayer(console)
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
    initial = _initial_accuracy(folder, net, pipelines, mode)
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
        result["per_class"] = _per_class(model, pipelines["test"], class_names)
    say(f"{label}: test accuracy {100 * test_acc:.2f}%  loss {test_loss:.4f}  "
        f"(best epoch {result['best_epoch']} of {recipe.epochs})", highlight=False)
    write_json(done, result, force=True)
    shutil.rmtree(folder / "backup", ignore_errors=True)
    return result


def _initial_accuracy(folder, net, pipelines, mode):
    """Validation and test accuracy before any training (fine-tuning starts from a fitted model),
    measured once and kept in the run folder so a resumed run reports the same."""
    if mode != "finetune":
        return None
    path = folder / "initial.json"
    if path.exists():
        return json.loads(path.read_text())
    from keffconvert.finetune import evaluate_accuracy

    initial = {"val_accuracy": evaluate_accuracy(net, pipelines["val"]),
               "test_accuracy": evaluate_accuracy(net, pipelines["test"])}
    write_json(path, initial, force=True)
    return initial


def recipe_from_options(mode="scratch", **options):
    """A `Recipe` from keyword options, ignoring those that are None (CLI defaults): the paper's
    values for `scratch`, `FINETUNE_DEFAULTS` over them for `finetune`."""
    known = {f.name for f in fields(Recipe)}
    given = {k: v for k, v in options.items() if k in known and v is not None}
    if mode == "finetune":
        given = {**FINETUNE_DEFAULTS, **given}
    return Recipe(**given)

