"""`keffconvert train`: the report agrees with the plan and the saved checkpoints, runs resume."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keffconvert
from keffconvert.cli import cli
from keffconvert.data import load_dataset
from keffconvert.errors import OutputError
from keffconvert.train import Distiller, Recipe, rebuild, train


def tiny_model(size=16, classes=10, name="tiny"):
    """A small functional CNN with convertible 1x1 convs (32 -> 64 -> 32 channels)."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = keras.layers.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0], name="norm")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_act")(x)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name=name)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch scratch run of the tiny model and its original, through the Python API."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    model = tiny_model()
    report = train(model, "digits", with_original=True, out=out, recipe=Recipe(epochs=2, seed=1))
    return model, out, report


def test_report_numbers_agree_with_the_plan_and_the_checkpoints(finished_run):
    model, out, report = finished_run
    _, plan = keffconvert.convert(model, 16, dry_run=True)
    original, converted = report["models"]
    assert (original["trainable_params"], converted["trainable_params"]) == \
        (plan.trainable_params_before, plan.trainable_params_after)
    assert (original["total_params"], converted["total_params"]) == (plan.total_params_before, plan.total_params_after)
    assert converted["reduction_pct"] == pytest.approx(plan.reduction_pct, abs=1e-3)
    assert report["plan"]["layers"] == plan.to_dict()["layers"]

    data = load_dataset("digits", (16, 16), 3, val_split=0.1, test_split=0.2, seed=1)
    assert report["data"]["test"] == len(data.y_test)
    for entry in (original, converted):
        best = keras.models.load_model(out / entry["checkpoint"])
        assert sum(int(np.prod(w.shape)) for w in best.trainable_weights) == entry["trainable_params"]
        predicted = best.predict(data.x_test.astype("float32"), batch_size=64, verbose=0).argmax(axis=1)
        assert entry["test_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_test)), abs=1e-6)
        assert entry["epochs"] == 2 and [e["epoch"] for e in entry["history"]] == [1, 2]
        assert [e["learning_rate"] for e in entry["history"]] == pytest.approx([0.003, 0.003 * 0.99])
        best_val = max(e["val_accuracy"] for e in entry["history"])
        assert entry["best_val_accuracy"] == pytest.approx(best_val)
        assert entry["history"][entry["best_epoch"] - 1]["val_accuracy"] == pytest.approx(best_val)
    assert report["accuracy_delta_points"] == pytest.approx(
        100 * (converted["test_accuracy"] - original["test_accuracy"]), abs=1e-3)
    markdown = (out / "report.md").read_text()
    assert f"| {converted['trainable_params']:,} | {-plan.reduction_pct:+.2f}% |" in markdown
    assert f"{100 * converted['test_accuracy']:.2f}%" in markdown
    for name in ("accuracy_vs_params.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_is_refused_without_force_and_the_report_command_rebuilds_it(finished_run, tmp_path):
    model, out, _ = finished_run
    with pytest.raises(OutputError, match="finished run"):
        train(model, "digits", with_original=True, out=out, recipe=Recipe(epochs=2, seed=1))
    result = CliRunner().invoke(cli, ["report", str(out / "report.json"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert (tmp_path / "training_curves.png").stat().st_size > 1000


def test_scratch_rebuild_reinitialises_and_finetune_rebuild_copies():
    source = tiny_model()
    for layer in source.layers:  # stand-in for trained weights
        if layer.name in ("stem", "expand", "head"):
            layer.set_weights([w + 0.5 for w in layer.get_weights()])
    fresh = rebuild(source, copy_weights=False)
    assert not np.allclose(fresh.get_layer("expand").get_weights()[0], source.get_layer("expand").get_weights()[0])
    for a, b in zip(fresh.get_layer("norm").get_weights(), source.get_layer("norm").get_weights()):
        assert np.array_equal(a, b)  # input preprocessing state is kept
    copied = rebuild(source, copy_weights=True)
    for a, b in zip(copied.get_weights(), source.get_weights()):
        assert np.array_equal(a, b)
    mixed = rebuild(source, dtype="mixed_float16")
    assert mixed.get_layer("expand").compute_dtype == "float16"
    assert mixed.get_layer("head").compute_dtype == "float32"  # the softmax stays float32


def test_distillation_loss_is_temperature_scaled_kl():
    student, teacher = tiny_model(name="s"), tiny_model(name="t")
    distiller = Distiller(student, teacher, temperature=2.0, weight=1.0)
    distiller.compile(loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32") * 255
    y = np.arange(4)
    y_pred = student(x, training=False)
    loss = float(distiller.compute_loss(x=x, y=y, y_pred=y_pred, training=True))
    p_t = teacher.predict(x, verbose=0).astype("float64") ** (1 / 2.0)
    p_t /= p_t.sum(axis=1, keepdims=True)
    p_s = np.asarray(y_pred, "float64") ** (1 / 2.0)
    p_s /= p_s.sum(axis=1, keepdims=True)
    expected = 4.0 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    assert loss == pytest.approx(expected, rel=1e-3, abs=1e-5)
    expected_ce = float(np.mean(-np.log(np.asarray(y_pred)[np.arange(4), y])))
    validation = float(distiller.compute_loss(x=x, y=y, y_pred=y_pred, training=False))
    assert validation == pytest.approx(expected_ce, rel=1e-4)  # validation loss: plain cross-entropy
    distiller.weight = 0.25
    mixed = float(distiller.compute_loss(x=x, y=y, y_pred=y_pred, training=True))
    assert mixed == pytest.approx(0.75 * expected_ce + 0.25 * expected, rel=1e-3)


def test_finetune_with_distillation_under_mirrored_strategy(tmp_path):
    model = tiny_model()
    recipe = Recipe(epochs=1, distill_weight=0.5, strategy="mirrored")
    report = train(model, "digits", mode="finetune", out=tmp_path / "ft", recipe=recipe)
    original, converted = report["models"]
    assert not original["trained"] and original["test_accuracy"] is None
    assert converted["distilled"] and report["environment"]["strategy"] == "mirrored"
    assert "distillation" in report["mode_description"]
    assert 0.0 <= converted["test_accuracy"] <= 1.0 and converted["epochs"] == 1
    assert "not trained" in (tmp_path / "ft" / "report.md").read_text()


def test_a_run_stopped_after_its_last_epoch_is_tested_without_training_again(tmp_path, monkeypatch):
    model, out = tiny_model(), tmp_path / "run"
    real_load = keras.models.load_model

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.models, "load_model", stopped)  # Ctrl-C right after the last epoch
    with pytest.raises(KeyboardInterrupt):
        train(model, "digits", out=out, recipe=Recipe(epochs=1))
    monkeypatch.setattr(keras.models, "load_model", real_load)
    best, history = out / "converted" / "best.keras", out / "converted" / "history.json"
    assert best.exists() and not (out / "converted" / "result.json").exists()
    before = (best.stat().st_mtime_ns, history.read_text())
    report = train(model, "digits", out=out, recipe=Recipe(epochs=1))
    assert report["models"][1]["epochs"] == 1
    assert (best.stat().st_mtime_ns, history.read_text()) == before  # no epoch ran again


def test_option_conflicts_are_usage_errors(tmp_path):
    result = CliRunner().invoke(cli, ["train", "efficientnetb0", "--distill-weight", "0.5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "distillation needs --mode finetune" in result.stderr


# ---------------------------------------------------------------------------------------------
# Killed and interrupted runs resume


def _wait_for(predicate, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace")
            raise AssertionError(f"the run ended (rc {process.returncode}) before the condition:\n{out}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("timed out")


def _epochs_logged(path):
    try:
        return len(json.loads(path.read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_and_ctrl_c_resume_to_exactly_the_requested_epochs(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_model(size=32).save(model_path)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "keffconvert.cli", "train", str(model_path), "--data", "digits",
               "--epochs", "5", "--with-original", "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start():
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    # 1. SIGKILL as soon as the converted model's first epoch is backed up: mid-epoch 2.
    first = start()
    backup = out / "converted" / "backup" / "training_metadata.json"
    _wait_for(backup.exists, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists() and not (out / "converted" / "result.json").exists()
    original_done = (out / "original" / "result.json").stat().st_mtime_ns
    other = CliRunner().invoke(cli, ["train", str(model_path), "--data", "digits", "--epochs", "6",
                                     "--with-original", "--out", str(out)])
    assert other.exit_code == 5 and "unfinished run with other settings (recipe)" in other.stderr

    # 2. The same command resumes (the finished original is not retrained); Ctrl-C stops it cleanly.
    second = start()
    history = out / "converted" / "history.json"
    _wait_for(lambda: _epochs_logged(history) >= 3, second)
    second.send_signal(signal.SIGINT)
    output = second.communicate(timeout=60)[0].decode(errors="replace")
    assert second.returncode == 130, output
    assert "interrupted" in output and "resuming after epoch" in output and "not retraining" in output
    assert not (out / "report.json").exists()

    # 3. The same command again finishes with exactly the requested epochs.
    third = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=300)
    output = third.stdout.decode(errors="replace")
    assert third.returncode == 0, output
    assert "resuming after epoch" in output
    report = json.loads((out / "report.json").read_text())
    for entry in report["models"]:
        assert entry["epochs"] == 5 and [e["epoch"] for e in entry["history"]] == [1, 2, 3, 4, 5]
    assert (out / "original" / "result.json").stat().st_mtime_ns == original_done
    assert not (out / "converted" / "backup").exists()


@pytest.mark.slow
def test_efficientnet_b0_trains_and_reports_the_papers_parameter_count(tmp_path):
    from keffconvert.digits import load_digits_arrays

    x, y = load_digits_arrays()
    np.savez(tmp_path / "small.npz", x_train=x[:256], y_train=y[:256], x_test=x[256:320], y_test=y[256:320])
    report = train("efficientnetb0", str(tmp_path / "small.npz"), image_size=32, out=tmp_path / "b0",
                   recipe=Recipe(epochs=1))
    original, converted = report["models"]
    assert original["trainable_params"] == 4_020_358
    assert converted["trainable_params"] == 639_702 and round(converted["reduction_pct"], 2) == 84.09
    assert converted["epochs"] == 1 and 0.0 <= converted["test_accuracy"] <= 1.0
