"""Fine-tuning a converted model: its own defaults, batch-norm handling, epoch 0 and the data-aware start."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from test_train import tiny_model

from keffconvert.cli import cli
from keffconvert.train.finetune import (FINETUNE_DEFAULTS, ChanceWarning, DropoutOff, LinearWarmUp, freeze_batch_norms,
                                  recalibrate_batch_norms)
from keffconvert.train.recipe import Recipe, recipe_from_options
from keffconvert.train import train


def test_finetune_defaults_replace_the_papers_recipe_unless_given():
    scratch, finetune = recipe_from_options("scratch"), recipe_from_options("finetune")
    assert (scratch.optimizer, scratch.lr, scratch.epochs, scratch.bn_mode) == ("rmsprop", 0.003, 50, "train")
    for key, value in FINETUNE_DEFAULTS.items():
        assert getattr(finetune, key) == value
    assert recipe_from_options("finetune", lr=0.01, epochs=None).lr == 0.01
    assert recipe_from_options("finetune", epochs=None).epochs == FINETUNE_DEFAULTS["epochs"]


class _SeenRates(keras.callbacks.Callback):
    """The learning rate each batch ran with (after every other callback set it)."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_warm_up_ramps_linearly_to_each_epochs_rate_and_continues_after_a_resume():
    recipe = Recipe(lr=0.01, lr_decay=0.5, warmup_epochs=1.5)
    x = np.zeros((8, 2), "float32")
    y = np.zeros((8, 1), "float32")

    def compiled():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(), "mse")
        return model

    def fit(epochs, model, initial_epoch=0):
        seen = _SeenRates()
        model.fit(x, y, batch_size=2, epochs=epochs, initial_epoch=initial_epoch, verbose=0, shuffle=False,
                  callbacks=[keras.callbacks.LearningRateScheduler(recipe.learning_rate),
                             LinearWarmUp(recipe.learning_rate, steps=6), seen])
        return model, seen.rates

    _, rates = fit(3, compiled())  # 4 steps an epoch: 6 warm-up steps end in epoch 2
    expected = [0.01 * k / 6 for k in (1, 2, 3, 4)] + [0.005 * k / 6 for k in (5, 6)] + [0.005] * 2 + [0.0025] * 4
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    # a run that stopped after epoch 1 (4 steps done) goes on with step 5 of the ramp
    resumed = compiled()
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.optimizer.iterations.assign(4)
    _, rates = fit(2, resumed, initial_epoch=1)
    np.testing.assert_allclose(rates, expected[4:8], rtol=1e-6)


def test_warm_up_is_asked_for_and_named_in_the_recipe_text():
    assert recipe_from_options("finetune").warmup_epochs == recipe_from_options("scratch").warmup_epochs == 0
    assert recipe_from_options("finetune", warmup_epochs=0.5).warmup_epochs == 0.5
    assert "linear warm-up over 1 epochs" in Recipe(warmup_epochs=1).describe()
    with pytest.raises(Exception, match="warm-up epochs must be at least 0"):
        Recipe(warmup_epochs=-1).validate("finetune")


def test_split_seed_keeps_the_test_images_while_the_seed_varies():
    from keffconvert.train.inputs import load_model_and_data

    def test_images(**seeds):
        _, data = load_model_and_data(tiny_model(), "digits", image_size=None, recipe=Recipe(**seeds), unsafe=False)
        return data.x_test, data.x_val

    original_split = test_images(seed=0)
    for x, y in zip(test_images(seed=3, split_seed=0), original_split):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(test_images(seed=3)[0], original_split[0]), "without it, --seed moves the split"
    assert "seed 3, split seed 0" in Recipe(seed=3, split_seed=0).describe()
    assert "split seed" not in Recipe(seed=3).describe()


def test_averaged_weights_are_what_is_evaluated_and_a_resume_continues_the_average(tmp_path):
    from keffconvert.train.finetune import AveragedWeights
    from keffconvert.train.backup import AtomicBackupAndRestore

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")

    class Seen(keras.callbacks.Callback):  # the weights each epoch's end hands to later callbacks
        def __init__(self):
            super().__init__()
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append(self.model.get_weights()[0].copy())

    def model():
        keras.utils.set_random_seed(1)
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        net.compile(keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5), "mse")
        return net

    def fit(net, epochs, callbacks):
        net.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)

    whole, seen, trained = model(), Seen(), []
    trained_weights = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, l: trained.append(
        keras.ops.convert_to_numpy(whole.optimizer._model_variables_moving_average[0]).copy()))
    fit(whole, 2, [AveragedWeights(), seen, trained_weights])
    assert not np.allclose(seen.weights[0], trained[0]), "the average is not the last weights"
    np.testing.assert_allclose(whole.get_weights()[0], seen.weights[-1])  # the run ends with the average

    first = model()  # the same run, stopped after epoch 1 is backed up
    backup = AtomicBackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)  # as `train` keeps it
    stop = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, l: setattr(first, "stop_training", True))
    fit(first, 2, [AveragedWeights(), backup, stop])
    resumed = model()
    resumed.optimizer.build(resumed.trainable_variables)
    assert AtomicBackupAndRestore(str(tmp_path / "backup")).restore(resumed) == 1
    seen_resumed = Seen()
    fit(resumed, 2, [AveragedWeights(resumed=True), seen_resumed])
    np.testing.assert_allclose(seen_resumed.weights[0], seen.weights[1], rtol=1e-6, atol=1e-7)


def test_weight_averaging_is_checked_and_named_in_the_recipe_text():
    assert "weights averaged (EMA momentum 0.9)" in Recipe(ema=0.9).describe()
    assert "averaged" not in Recipe().describe()
    with pytest.raises(Exception, match="need 0 <= ema < 1"):
        Recipe(ema=1.0).validate("finetune")


def bn_model():
    inp = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(8, 1, name="conv")(inp)
    out = keras.layers.BatchNormalization(name="bn", momentum=0.99)(x)
    return keras.Model(inp, out), keras.Model(inp, x)


def test_recalibration_sets_the_average_of_the_batch_statistics():
    model, features = bn_model()
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(64, 4, 4, 3)).astype("float32")
    recalibrate_batch_norms(model, x, batch_size=16)
    bn = model.get_layer("bn")
    f = features.predict(x, verbose=0)
    batches = f.reshape(4, -1, 8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), batches.mean(axis=1).mean(axis=0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), batches.var(axis=1).mean(axis=0),
                               rtol=1e-3, atol=1e-3)
    assert bn.momentum == 0.99, "the layer's own momentum is put back"


def test_frozen_batch_norms_compute_the_same_in_training_mode():
    model, _ = bn_model()
    model.get_layer("bn").set_weights([np.full(8, 2.0), np.ones(8), np.full(8, 0.5), np.full(8, 4.0)])
    freeze_batch_norms(model)
    x = np.random.default_rng(1).normal(size=(8, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=True)),
                               keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-6)
    assert model.trainable_weights == [w for w in model.get_layer("conv").trainable_weights]


def test_chance_warning_names_the_lag_once():
    said = []
    warning = ChanceWarning(10, said.append)
    warning.on_epoch_end(0, {"accuracy": 0.5, "val_accuracy": 0.30})
    assert warning.warning is None
    warning.on_epoch_end(1, {"accuracy": 0.8, "val_accuracy": 0.10})
    warning.on_epoch_end(2, {"accuracy": 0.9, "val_accuracy": 0.09})
    assert len(said) == 1 and "at chance" in said[0] and "--bn-mode" in said[0]


def train_tiny(folder, **model_options):
    """A tiny model (`tiny_model(**model_options)`) trained for a few epochs on digits at 16x16,
    saved in `folder` as the user's original."""
    from keffconvert.data.sources import load_dataset

    keras.utils.set_random_seed(0)
    model = tiny_model(**model_options)
    data = load_dataset("digits", (16, 16), 3, seed=0)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x_train = data.x_train.astype("float32")
    model.fit(x_train, data.y_train, epochs=8, batch_size=64, verbose=0)
    # 8 epochs of ~18 steps leave the batch norms' moving statistics far behind the weights (the
    # model is at chance in inference mode): re-estimate them, so the original has learned something
    recalibrate_batch_norms(model, x_train)
    path = folder / "tiny.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("original"))


def finetune(original, out, calibration):
    recipe = recipe_from_options("finetune", epochs=1, track_test=True)
    return train(str(original), "digits", mode="finetune", recipe=recipe, calibration=calibration, out=out)


@pytest.mark.slow
def test_finetune_starts_from_the_data_aware_fit_and_reports_epoch_zero(trained_tiny, tmp_path):
    plain = finetune(trained_tiny, tmp_path / "plain", "none")
    fitted = finetune(trained_tiny, tmp_path / "fitted", "train")
    for report in (plain, fitted):
        original, converted = report["models"]
        assert original.get("reference") and not original["trained"], "fine-tuning does not retrain the original"
        assert 0 < original["test_accuracy"] <= 1
        assert set(converted["initial"]) == {"val_accuracy", "test_accuracy"}
        assert len(converted["history"]) == 1 and "test_accuracy" in converted["history"][0]
        assert report["recipe"]["bn_mode"] == "frozen" and report["recipe"]["optimizer"] == "adam"
    assert plain["plan"]["calibration"] is None
    assert fitted["plan"]["calibration"]["samples"] == 512
    assert all(layer["reconstruction_error"] is not None for layer in fitted["plan"]["layers"] if layer["converted"])
    before, after = plain["plan"]["fidelity"], fitted["plan"]["fidelity"]
    assert after["mean_abs_diff"] < before["mean_abs_diff"] and after["correlation"] > before["correlation"]
    assert after["top1_agreement"] >= before["top1_agreement"]
    markdown = (tmp_path / "fitted" / "report.md").read_text()
    assert "before training (epoch 0)" in markdown and "used as it is" in markdown


def test_finetune_with_averaged_weights_keeps_what_each_epoch_evaluated(trained_tiny, tmp_path):
    recipe = recipe_from_options("finetune", epochs=2, track_test=True, ema=0.5, lr=3e-3)
    report = train(str(trained_tiny), "digits", mode="finetune", recipe=recipe, calibration="none",
                   out=tmp_path / "run", heatmap_images=0)
    converted = report["models"][1]
    assert report["recipe"]["ema"] == 0.5 and "weights averaged" in report["recipe"]["description"]
    assert converted["distilled"]
    epoch = converted["history"][converted["best_epoch"] - 1]
    assert converted["test_accuracy"] == pytest.approx(epoch["test_accuracy"], abs=1e-6)
    # validation (where Keras swaps the average in) saw the weights the checkpoint holds
    from keffconvert.train.inputs import load_model_and_data

    _, data = load_model_and_data(str(trained_tiny), "digits", image_size=None, recipe=recipe, unsafe=False)
    best = keras.models.load_model(tmp_path / "run" / "converted" / "best.keras", compile=False)
    best.compile(loss="sparse_categorical_crossentropy")
    val_loss = best.evaluate(data.pipeline("val", 64, scale=report["recipe"]["input_scale"]), verbose=0)
    assert val_loss == pytest.approx(epoch["val_loss"], rel=1e-4)


def test_cli_convert_with_calibration_reports_the_fit_and_held_out_agreement(trained_tiny, tmp_path):
    out, report = tmp_path / "small.keras", tmp_path / "plan.json"
    result = CliRunner().invoke(cli, [str(trained_tiny), "-c", "8", "-o", str(out), "--report", str(report),
                                      "--calibration", "digits", "--calibration-samples", "64"])
    assert result.exit_code == 0, result.output
    assert "calibration: 64 calibration images from the training images of digits, 359 held-out" in result.output
    assert "held-out images the fit did not see" in result.output
    plan = json.loads(report.read_text())["plan"]
    assert plan["calibration"]["samples"] == 64
    converted = [layer for layer in plan["layers"] if layer["converted"]]
    assert converted and all(layer["reconstruction_error"] <= layer["slices_error"] for layer in converted)
    assert plan["fidelity"]["samples"] == 359  # digits' test split: never the calibration images
    assert keras.models.load_model(out).count_params() > 0


def test_cli_calibration_needs_the_weights(trained_tiny, tmp_path):
    result = CliRunner().invoke(cli, [str(trained_tiny), "--calibration", "digits", "--no-weights",
                                      "-o", str(tmp_path / "x.keras")])
    assert result.exit_code == 2 and "--no-weights" in result.output


def dropout_model():
    """Dropout at the top level and, with a SpatialDropout and a rate-0 Dropout, in a nested model."""
    inp = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(8, 1, name="conv")(inp)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    inner = keras.Sequential([keras.Input((4, 4, 8)), keras.layers.SpatialDropout2D(0.3, name="spatial"),
                              keras.layers.Dropout(0.0, name="idle")], name="inner")
    return keras.Model(inp, inner(x))


def _rates(model):
    return [model.get_layer("drop").rate, model.get_layer("inner").get_layer("spatial").rate,
            model.get_layer("inner").get_layer("idle").rate]


def test_dropout_off_trains_without_noise_and_gives_the_rates_back_for_saving(tmp_path):
    model = dropout_model()
    x = np.random.default_rng(0).normal(size=(16, 4, 4, 3)).astype("float32")
    inference = keras.ops.convert_to_numpy(model(x, training=False))
    assert not np.allclose(keras.ops.convert_to_numpy(model(x, training=True)), inference)
    off = DropoutOff(model)
    assert len(off.rates) == 2 and _rates(model) == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=True)), inference, atol=1e-6)
    with off.restored():
        assert _rates(model) == [0.5, 0.3, 0.0]
        model.save(tmp_path / "saved.keras")
    assert _rates(model) == [0.0, 0.0, 0.0]
    assert _rates(keras.models.load_model(tmp_path / "saved.keras")) == [0.5, 0.3, 0.0]


@pytest.mark.parametrize("dropout", [False, True])
def test_finetune_trains_with_dropout_off_by_default_and_saves_the_models_rate(dropout, tmp_path):
    """At a learning rate of 1e-9 (weights unchanged) and without augmentation, the training
    accuracy Keras logs is the model's own accuracy on the training images only if no unit was
    dropped while it trained (the head's dropout rate is 0.5). `--dropout` keeps it on."""
    from keffconvert.train.inputs import load_model_and_data

    original, run = train_tiny(tmp_path, dropout=0.5), tmp_path / "run"
    if dropout:
        result = CliRunner().invoke(cli, ["train", str(original), "--data", "digits", "--mode", "finetune", "--epochs",
                                          "1", "--lr", "1e-9", "--no-augment", "--distill-weight", "0", "--dropout",
                                          "--quiet", "--out", str(run)])
        assert result.exit_code == 0, result.output
        report = json.loads((run / "report.json").read_text())
        assert report["recipe"]["dropout"] is True
    else:
        recipe = recipe_from_options("finetune", epochs=1, lr=1e-9, augment=False, distill_weight=0.0)
        report = train(str(original), "digits", mode="finetune", recipe=recipe, out=run, heatmap_images=0)
    assert ("dropout off" in report["recipe"]["description"]) is not dropout
    best = keras.models.load_model(run / "converted" / "best.keras", compile=False)
    assert best.get_layer("head_dropout").rate == 0.5, "the saved model keeps the original's rate"
    best.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, data = load_model_and_data(str(original), "digits", image_size=None, recipe=recipe_from_options("finetune"),
                                  unsafe=False)
    _, accuracy = best.evaluate(data.pipeline("train", 64, scale=report["recipe"]["input_scale"]), verbose=0)
    logged = report["models"][1]["history"][0]["accuracy"]
    assert accuracy > 0.5, "the fitted start has learned something to lose"
    if dropout:
        assert logged < accuracy - 0.05
    else:
        assert logged == pytest.approx(accuracy, abs=0.005)


def test_bn_mode_is_checked():
    with pytest.raises(Exception, match="bn mode"):
        Recipe(bn_mode="sometimes").validate("finetune")
