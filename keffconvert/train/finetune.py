"""What fine-tuning a converted model needs beyond the from-scratch recipe.

Fine-tuning starts from a model that already computes (nearly) the original's function, the
data-aware conversion's fit. The paper's from-scratch recipe (RMSprop at lr 0.003, batch norms
in training mode) throws that start away: its first steps are large, and on a small data set the
batch norms' moving statistics lag the weights, so the model that is evaluated is not the model
that was learned. Fine-tuning therefore has its own defaults (`FINETUNE_DEFAULTS`, chosen by
`benchmarks/bench_finetune.py`) and three ways to treat batch norms (`BN_MODES`):

* ``frozen``: every batch norm runs in inference mode with its statistics kept, as keras.io's
  EfficientNet fine-tuning recipe does; what is trained is what is evaluated;
* ``recalibrate``: batch norms train as usual, and their moving statistics are re-estimated on
  training images (with the current weights) before each evaluation;
* ``train``: the plain recipe.

Dropout is off while a fitted start is fine-tuned (`DropoutOff`): the student is distilled
towards the original's deterministic outputs in a few steps, and dropping units only adds noise.

It also records the converted model's accuracy before any training (epoch 0), can track test
accuracy per epoch for curves (never for model selection), and warns when validation accuracy
sits at chance while training accuracy climbs, the sign of lagging statistics.
"""

from contextlib import contextmanager

import keras
import numpy as np

from keffconvert.graph.model_info import leaf_layers

BN_MODES = ("train", "frozen", "recalibrate")
# Layers that drop (or scale) activations at random with probability `rate` while training, and
# skip it at rate 0 (SpatialDropout subclasses Dropout).
DROPOUT_LAYERS = (keras.layers.Dropout, keras.layers.AlphaDropout, keras.layers.GaussianDropout)

# Recipe values that replace the paper's from-scratch ones in --mode finetune, unless given.
# lr 1e-4 without warm-up: at 3e-4, alone or with a one-epoch warm-up, epoch 1 fell below the
# fitted start more often, and with weight averaging two of three B0 runs collapsed below 90%
# (docs/results.md, "What a conversion does"). Matching the block outputs too (`--feature-distill-weight`)
# stays off: over six B0 seeds it ended 0.2 points higher on average, with as many dips. Dropout
# off: see `DropoutOff`.
FINETUNE_DEFAULTS = {"epochs": 3, "optimizer": "adam", "lr": 1e-4, "lr_decay": 1.0, "distill_weight": 0.5,
                     "bn_mode": "frozen", "dropout": False}


def freeze_batch_norms(model):
    """Every BatchNormalization of `model` (nested ones too) in inference mode, statistics kept."""
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


class DropoutOff:
    """Every dropout layer of a model (`DROPOUT_LAYERS`, nested ones and EfficientNet's
    drop-connect included) passes its input through while it trains; the model's own rates come
    back for saving.

    A fitted start is distilled towards the original's deterministic outputs: dropout in the
    student only adds noise to the few steps fine-tuning takes (on a fitted B0 over six seeds, off
    ended 3 epochs 1.3 points higher on average, and one run fell below its start instead of four:
    docs/results.md, "What a conversion does"). The rate is read when a step is traced (TensorFlow, JAX)
    or run (PyTorch), so it is 0 whenever a step runs; `restored` puts the rates back while a
    checkpoint is written, so a saved model has the architecture the user gave."""

    def __init__(self, model):
        self.rates = [(layer, layer.rate) for layer in leaf_layers(model)
                      if isinstance(layer, DROPOUT_LAYERS) and layer.rate > 0]
        self._set(0.0)

    def _set(self, rate=None):
        for layer, own in self.rates:
            layer.rate = own if rate is None else rate

    @contextmanager
    def restored(self):
        self._set()
        try:
            yield
        finally:
            self._set(0.0)


def recalibrate_batch_norms(model, images, batch_size=64):
    """Re-estimate the moving mean and variance of `model`'s trainable batch norms on `images`.

    Each batch norm's momentum is set so that its moving statistics become the running average
    over the batches (momentum (k-1)/k at batch k); the weights do not change.
    """
    norms = [layer for layer in leaf_layers(model)
             if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    saved = [layer.momentum for layer in norms]
    try:
        for k, start in enumerate(range(0, len(images), batch_size), 1):
            for layer in norms:
                layer.momentum = (k - 1) / k
            model(images[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(norms, saved):
            layer.momentum = momentum


class BatchNormRecalibration(keras.callbacks.Callback):
    """Before every evaluation (validation included), re-estimate the student's batch-norm statistics."""

    def __init__(self, model, images):
        super().__init__()
        self.net = model
        self.images = images

    def on_test_begin(self, logs=None):
        recalibrate_batch_norms(self.net, self.images)


class LinearWarmUp(keras.callbacks.Callback):
    """The first `steps` optimizer steps ramp the learning rate linearly up to the epoch's rate.

    A fitted start sits close to a good solution; Adam's first updates, taken while its moment
    estimates are young, move it away (the epoch-1 dip `benchmarks/bench_finetune.py` measured).
    Counted in optimizer steps, so a resumed run continues the ramp where it stopped."""

    def __init__(self, schedule, steps):
        super().__init__()
        self.schedule = schedule
        self.steps = steps
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        if step <= self.steps:
            self.model.optimizer.learning_rate = self.schedule(self.epoch) * min(1.0, (step + 1) / self.steps)


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Keras' SwapEMAWeights(swap_on_epoch=True), made to survive a resume.

    Every evaluation, and every callback after it in an epoch's end (checkpoints, the backup),
    sees the optimizer's moving average of the weights (Polyak averaging) rather than the last
    step's weights. (On digits it neither lifted nor steadied fine-tuning of a fitted B0: docs/results.md,
    "What a conversion does"; it is an option, off by default.) Each epoch therefore ends, and is
    backed up, with the average in the model and the trained weights in the optimizer's average
    slots; a run restored from such a backup (`resumed`) starts in that state, so its first
    epoch swaps back before training as an uninterrupted run does."""

    def __init__(self, resumed=False):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = bool(resumed)


class TestEveryEpoch(keras.callbacks.Callback):
    """Adds `test_accuracy` (of the model as it is after the epoch) to the epoch's logs, for curves."""

    def __init__(self, model, test):
        super().__init__()
        self.net = model
        self.test = test

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # batch norms were recalibrated for this epoch's validation already
            logs["test_accuracy"] = evaluate_accuracy(self.net, self.test)


class ChanceWarning(keras.callbacks.Callback):
    """Warns once when validation accuracy stays at chance while training accuracy climbs."""

    def __init__(self, num_classes, say):
        super().__init__()
        self.chance = 1.0 / num_classes
        self.say = say
        self.warning = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        val, train = logs.get("val_accuracy"), logs.get("accuracy")
        if self.warning or val is None or train is None:
            return
        if val <= 1.5 * self.chance and train >= min(0.9, 3 * self.chance):
            self.warning = (f"epoch {epoch + 1}: validation accuracy {100 * val:.1f}% is at chance while training "
                            f"accuracy is {100 * train:.1f}%: batch-norm moving statistics lag the weights; "
                            "try --bn-mode frozen or --bn-mode recalibrate")
            self.say(f"warning: {self.warning}")


def evaluate_accuracy(model, dataset):
    """Top-1 accuracy of `model` on a batched (x, y) dataset."""
    correct = total = 0
    for x, y in dataset:
        predictions = keras.ops.convert_to_numpy(model(x, training=False))
        correct += int(np.sum(predictions.argmax(-1) == np.asarray(y)))
        total += len(predictions)
    return correct / max(total, 1)
