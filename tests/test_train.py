"""`keffconvert train`: the report agrees with the plan and the saved checkpoints, runs resume."""

import json
import os
import shutil
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
from keffconvert.data.sources import load_dataset
from keffconvert.errors import OutputError
from keffconvert.train.distill import Distiller
from keffconvert.train.precision import rebuild
from keffconvert.train.recipe import Recipe
from keffconvert.train import train


def tiny_model(size=16, classes=10, name="tiny", dropout=0.0):
    """A small functional CNN with convertible 1x1 convs (32 -> 64 -> 32 channels); `dropout` > 0
    puts a Dropout of that rate before the head."""
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
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
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
    y_pred = distiller(x, training=True)  # the distillation term is added to the losses here
    loss = float(distiller.compute_loss(x=x, y=y, y_pred=y_pred, training=True))
    p_t = teacher.predict(x, verbose=0).astype("float64") ** (1 / 2.0)
    p_t /= p_t.sum(axis=1, keepdims=True)
    p_s = np.asarray(y_pred, "float64") ** (1 / 2.0)
    p_s /= p_s.sum(axis=1, keepdims=True)
    expected = 4.0 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    assert loss == pytest.approx(expected, rel=1e-3, abs=1e-5)
    expected_ce = float(np.mean(-np.log(np.asarray(y_pred)[np.arange(4), y])))
    distiller(x, training=False)  # as evaluation runs it: no distillation term added
    validation = float(distiller.compute_loss(x=x, y=y, y_pred=y_pred, training=False))
    assert validation == pytest.approx(expected_ce, rel=1e-4)  # validation loss: plain cross-entropy
    distiller.weight = 0.25
    distiller(x, training=True)
    mixed = float(distiller.compute_loss(x=x, y=y, y_pred=y_pred, training=True))
    assert mixed == pytest.approx(0.75 * expected_ce + 0.25 * expected, rel=1e-3)


def test_finetune_with_distillation_under_mirrored_strategy(tmp_path, monkeypatch):
    import tensorflow as tf

    fits, real_fit = [], keras.Model.fit

    def spy(self, *args, **kwargs):  # what the model is trained under, seen from inside fit
        fits.append((type(self), self.distribute_strategy, self.student.trainable_variables[0].value))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    model = tiny_model()
    recipe = Recipe(epochs=1, distill_weight=0.5, strategy="mirrored")
    report = train(model, "digits", mode="finetune", out=tmp_path / "ft", recipe=recipe)
    original, converted = report["models"]
    assert original["reference"] and not original["trained"], "fine-tuning uses the original as it is"
    assert converted["distilled"] and "distillation" in report["mode_description"]
    assert [kind for kind, _, _ in fits] == [Distiller]  # one fit, of the distiller
    _, strategy, variable = fits[0]
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert isinstance(variable, tf.distribute.DistributedValues)  # weights created as mirrored variables
    environment = report["environment"]
    assert environment["strategy"] == "mirrored"
    assert environment["replicas"] == strategy.num_replicas_in_sync >= 1
    # The reported accuracy is a real evaluation: the saved best student on the test split.
    data = load_dataset("digits", (16, 16), 3, val_split=0.1, test_split=0.2, seed=0)
    best = keras.models.load_model(tmp_path / "ft" / converted["checkpoint"], compile=False)
    predicted = best.predict(data.x_test.astype("float32"), batch_size=64, verbose=0).argmax(axis=1)
    assert converted["test_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_test)), abs=1e-6)
    assert converted["epochs"] == 1 and [e["epoch"] for e in converted["history"]] == [1]
    predicted = model.predict(data.x_test.astype("float32"), batch_size=64, verbose=0).argmax(axis=1)
    assert original["test_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_test)), abs=1e-6)
    assert "used as it is" in (tmp_path / "ft" / "report.md").read_text()


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


def test_a_run_from_before_a_recipe_field_existed_resumes_unless_the_field_changes_what_it_does(tmp_path):
    from dataclasses import asdict

    from keffconvert.train.run_dir import check_run_dir, start_run_dir

    def settings(recipe):
        return {"model": "m.keras", "mode": "finetune", "recipe": asdict(recipe)}

    older = settings(Recipe(epochs=3))
    del older["recipe"]["ema"], older["recipe"]["split_seed"]  # written before these fields existed
    start_run_dir(tmp_path, older, force=False, resumed=False)
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "history.json").write_text("[]")
    assert check_run_dir(tmp_path, settings(Recipe(epochs=3)), force=False) is True
    with pytest.raises(OutputError, match=r"other settings \(recipe\)"):
        check_run_dir(tmp_path, settings(Recipe(epochs=3, ema=0.9)), force=False)


def test_option_conflicts_are_usage_errors(tmp_path):
    result = CliRunner().invoke(cli, ["train", "efficientnetb0", "--distill-weight", "0.5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "distillation needs --mode finetune" in result.stderr


# ---------------------------------------------------------------------------------------------
# Killed and interrupted runs resume

# Runs `keffconvert train` with probes: every epoch started (with the optimizer's step count), the
# history and best state each model starts from, each best checkpoint saved (its hash), and
# optionally a SIGKILL at a named point of an epoch's end: KEFF_TEST_KILL=point@epoch (1-based),
# point one of history-written, best-written (a save forced that epoch), or the checkpoint's
# own steps weights-saved, staged (complete, before the commit), committed (before older
# backups are dropped). KEFF_TEST_PAUSE=model@epoch holds the run at that epoch's start.
DRIVER = r"""
import hashlib, json, os, signal, sys, time
from keffconvert.train import backup, callbacks

# A test suite started from a background job inherits SIGINT as ignored, and Python then
# installs no KeyboardInterrupt handler: this process sets its own, so Ctrl-C reaches it.
signal.signal(signal.SIGINT, signal.default_int_handler)

LOG = os.environ["KEFF_TEST_LOG"]
POINT, _, EPOCH = os.environ.get("KEFF_TEST_KILL", "").partition("@")
EPOCH = int(EPOCH or 0)
# "MODEL@N": hold the run at the start of MODEL's epoch N until a signal ends it, so a test
# signals a run at a known point whatever the machine's load.
PAUSE = os.environ.get("KEFF_TEST_PAUSE", "")


def record(**event):
    with open(LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def kill(point, epoch):
    if (point, epoch) == (POINT, EPOCH):
        record(event="killed", point=point, epoch=epoch)
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(cls, name, before=None, after=None):
    real = getattr(cls, name)

    def method(self, *args, **kwargs):
        if before:
            before(self, *args)
        result = real(self, *args, **kwargs)
        if after:
            after(self, *args)
        return result

    setattr(cls, name, method)


def epoch_begins(self, epoch, logs=None):
    record(event="epoch", model=self.path.parent.name, epoch=epoch + 1,
           steps_done=int(self.model.optimizer.iterations.numpy()))
    if PAUSE == f"{self.path.parent.name}@{epoch + 1}":
        record(event="paused", model=self.path.parent.name, epoch=epoch + 1)
        while True:
            time.sleep(0.05)


def best_begins(self, epoch, logs=None):
    if (POINT, EPOCH) == ("best-written", epoch + 1):
        self.state = None  # force a save, so the kill lands between a new best and the backup


def best_ends(self, epoch, logs=None):
    if self.improved:
        record(event="best-saved", model=self.path.parent.name, epoch=epoch + 1, hash=digest(self.path))
    kill("best-written", epoch + 1)


wrap(callbacks.EpochLog, "__init__", after=lambda self, path: record(
    event="history-loaded", model=self.path.parent.name, epochs=sorted(e + 1 for e in self.epochs)))
wrap(callbacks.EpochLog, "on_epoch_begin", before=epoch_begins)
wrap(callbacks.EpochLog, "on_epoch_end", after=lambda self, epoch, logs=None: kill("history-written", epoch + 1))
wrap(callbacks.BestCheckpoint, "__init__", after=lambda self, target, folder: record(
    event="best-loaded", model=self.path.parent.name, state=self.state, hash=digest(self.path)))
wrap(callbacks.BestCheckpoint, "on_epoch_end", before=best_begins, after=best_ends)
backup.AtomicBackupAndRestore._reached = lambda self, point: kill(point, self._current_epoch)

from keffconvert.cli import main

main()
"""


def stacks_of_hung(process, timeout):
    """The process's output once it exits; if it does not within `timeout` s, fail with the stack
    of every thread it had (faulthandler prints them on SIGABRT)."""
    try:
        return process.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        output = process.communicate(timeout=60)[0].decode(errors="replace")
        pytest.fail(f"no exit {timeout} s after the interrupt; its threads:\n{output[-6000:]}")


class Runs:
    """Start the driver on one run folder; read back what each process recorded."""

    def __init__(self, tmp_path, args):
        self.driver, self.log = tmp_path / "driver.py", tmp_path / "events.jsonl"
        self.driver.write_text(DRIVER)
        self.command = [sys.executable, str(self.driver), "train", *args]

    def env(self, kill=None, pause=None):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KEFF_TEST_LOG": str(self.log),
               "PYTHONFAULTHANDLER": "1"}  # SIGABRT prints every thread's stack (`stacks_of_hung`)
        env.pop("KEFF_TEST_KILL", None)
        env.pop("KEFF_TEST_PAUSE", None)
        if kill:
            env["KEFF_TEST_KILL"] = "{}@{}".format(*kill)
        if pause:
            env["KEFF_TEST_PAUSE"] = "{}@{}".format(*pause)
        return env

    def start(self, kill=None, pause=None):
        return subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self.env(kill, pause))

    def run(self, kill=None):
        process = self.start(kill)
        output = process.communicate(timeout=300)[0].decode(errors="replace")
        return process.returncode, output, process.pid

    def events(self, pid=None, event=None, model="converted"):
        rows = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        return [r for r in rows if (pid is None or r["pid"] == pid) and (event is None or r["event"] == event)
                and r.get("model", model) == model]

    def epochs_run(self, pid, model="converted"):
        return [r["epoch"] for r in self.events(pid, "epoch", model)]


def committed_epochs(folder):
    """The epochs of the complete backups in a model folder (what a resume would restore)."""
    backup = folder / "backup"
    return sorted(int(p.name[6:]) for p in backup.glob("epoch-*") if p.is_dir() and p.name[6:].isdigit()) \
        if backup.is_dir() else []


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


@pytest.mark.slow
def test_sigkill_and_ctrl_c_resume_to_exactly_the_requested_epochs(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_model(size=32).save(model_path)
    out = tmp_path / "run"
    runs = Runs(tmp_path, [str(model_path), "--data", "digits", "--epochs", "5", "--with-original", "--out", str(out)])

    # 1. SIGKILL while the converted model's second epoch starts: its first epoch is backed up.
    first = runs.start(pause=("converted", 2))
    _wait_for(lambda: runs.events(first.pid, "paused"), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists() and not (out / "converted" / "result.json").exists()
    assert committed_epochs(out / "converted") == [1]
    assert runs.epochs_run(first.pid, "original") == [1, 2, 3, 4, 5]
    original_done = (out / "original" / "result.json").stat().st_mtime_ns
    other = CliRunner().invoke(cli, ["train", str(model_path), "--data", "digits", "--epochs", "6",
                                     "--with-original", "--out", str(out)])
    assert other.exit_code == 5 and "unfinished run with other settings (recipe)" in other.stderr

    # 2. The same command resumes after the backed-up epoch, training neither the finished
    # original nor a finished epoch again; Ctrl-C (held at epoch 4's start) stops it cleanly.
    second = runs.start(pause=("converted", 4))
    _wait_for(lambda: runs.events(second.pid, "paused"), second)
    second.send_signal(signal.SIGINT)
    # A hang guard, not a speed check: a process that does not exit fails with its thread stacks.
    # (The hang once seen here was a suite started from a background job: SIGINT arrived ignored,
    # so it was dropped; the driver now sets its own handler.)
    output = stacks_of_hung(second, timeout=120)
    assert second.returncode == 130, output
    assert "interrupted" in output and "resuming after epoch 1 of 5" in output and "not retraining" in output
    assert not (out / "report.json").exists()
    assert runs.epochs_run(second.pid) == [2, 3, 4]
    assert runs.epochs_run(second.pid, "original") == []
    assert committed_epochs(out / "converted")[-1] == 3
    done = 3

    # 3. The same command again runs only the remaining epochs and ends with exactly five.
    rc, output, pid = runs.run()
    assert rc == 0, output
    assert f"resuming after epoch {done} of 5" in output
    assert runs.epochs_run(pid) == list(range(done + 1, 6)) and runs.epochs_run(pid, "original") == []
    report = json.loads((out / "report.json").read_text())
    for entry in report["models"]:
        assert entry["epochs"] == 5 and [e["epoch"] for e in entry["history"]] == [1, 2, 3, 4, 5]
    assert (out / "original" / "result.json").stat().st_mtime_ns == original_done
    assert not (out / "converted" / "backup").exists()


# (point, epoch) of each kill, in order, on one run of 7 epochs; each resume is checked. (A kill
# before the first commit is checked by the next test: the stale run files go.)
KILLS = [("history-written", 2), ("best-written", 3), ("weights-saved", 4), ("staged", 5), ("committed", 6)]


@pytest.mark.slow
def test_a_kill_at_any_step_of_a_checkpoint_resumes_from_one_whole_epoch(tmp_path):
    import math

    model_path = tmp_path / "tiny.keras"
    tiny_model().save(model_path)
    out, folder, epochs = tmp_path / "run", tmp_path / "run" / "converted", 7
    runs = Runs(tmp_path, [str(model_path), "--data", "digits", "--epochs", str(epochs), "--out", str(out)])
    steps = math.ceil(len(load_dataset("digits", (16, 16), 3, val_split=0.1, test_split=0.2).y_train) / 64)
    done, pids = 0, []  # epochs committed before each process
    for point, epoch in [*KILLS, (None, None)]:
        rc, output, pid = runs.run((point, epoch) if point else None)
        pids.append((pid, done))
        # It starts from the last committed epoch, with that epoch's history, best checkpoint and
        # optimizer state (steps done), and trains every later epoch, none before.
        assert (f"resuming after epoch {done} of {epochs}" if done else f"training {epochs} epochs") in output, output
        loaded = runs.events(pid, "history-loaded")[0]["epochs"]
        assert loaded == list(range(1, done + 1))
        best = runs.events(pid, "best-loaded")[0]
        if done == 0:
            assert best["state"] is None and best["hash"] is None
        else:
            assert best["state"]["epoch"] <= done
            saved = [e["hash"] for e in runs.events(event="best-saved") if e["epoch"] == best["state"]["epoch"]
                     and e["pid"] in [p for p, _ in pids[:-1]]]
            assert best["hash"] == saved[-1]  # the committed epoch's file, not a later epoch's
        started = runs.events(pid, "epoch")
        assert [e["epoch"] for e in started] == list(range(done + 1, (epoch or epochs) + 1))
        assert [e["steps_done"] for e in started] == [steps * (e["epoch"] - 1) for e in started]
        if point is None:
            assert rc == 0, output
            break
        assert rc == -signal.SIGKILL, output
        assert runs.events(pid, "killed") == [{"pid": pid, "event": "killed", "point": point, "epoch": epoch}]
        done = epoch if point == "committed" else epoch - 1
        assert committed_epochs(folder)[-1:] == ([done] if done else [])
        if point in ("history-written", "best-written"):  # the files are ahead of the backup
            assert _epochs_logged(folder / "history.json") == epoch
        if point == "best-written":
            assert json.loads((folder / "best.json").read_text())["epoch"] == epoch

    report = json.loads((out / "report.json").read_text())
    (result,) = [m for m in report["models"] if m["trained"]]
    history = result["history"]
    assert result["epochs"] == epochs and [e["epoch"] for e in history] == list(range(1, epochs + 1))
    assert [e["learning_rate"] for e in history] == pytest.approx([0.003 * 0.99 ** e for e in range(epochs)])
    # Each best state loaded on a resume agrees with the final history of the epochs before it,
    # and the final best checkpoint with the whole history.
    for pid, before in pids[1:]:
        state = runs.events(pid, "best-loaded")[0]["state"]
        if before:
            assert state["val_accuracy"] == max(e["val_accuracy"] for e in history[:before])
            assert (state["val_accuracy"], state["val_loss"]) == \
                (history[state["epoch"] - 1]["val_accuracy"], history[state["epoch"] - 1]["val_loss"])
    assert result["best_val_accuracy"] == max(e["val_accuracy"] for e in history)
    assert history[result["best_epoch"] - 1]["val_accuracy"] == result["best_val_accuracy"]
    data = load_dataset("digits", (16, 16), 3, val_split=0.1, test_split=0.2, seed=0)
    best = keras.models.load_model(out / result["checkpoint"], compile=False)
    predicted = best.predict(data.x_test.astype("float32"), batch_size=64, verbose=0).argmax(axis=1)
    assert result["test_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_test)), abs=1e-6)
    assert not (folder / "backup").exists()


def test_the_backup_restores_one_whole_epoch_and_falls_back_when_the_newest_is_unreadable(tmp_path):
    from keffconvert.errors import KeffError
    from keffconvert.outputs import write_text
    from keffconvert.train.backup import AtomicBackupAndRestore

    x = np.random.default_rng(0).random((32, 4)).astype("float32")
    y = (x.sum(axis=1) > 2).astype("int32")
    note = tmp_path / "note.txt"

    def build():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model

    class Snapshot(keras.callbacks.Callback):  # the weights after each epoch, and a run file per epoch
        weights = {}

        def on_epoch_end(self, epoch, logs=None):
            self.weights[epoch + 1] = self.model.get_weights()
            write_text(note, f"epoch {epoch + 1}", force=True)

    def backup(double=True):
        return AtomicBackupAndRestore(str(tmp_path / "backup"), files=[note], double_checkpoint=double,
                                      delete_checkpoint=False)

    build().fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[Snapshot(), backup()])
    assert committed_epochs(tmp_path) == [2, 3]  # the newest and, with double_checkpoint, the one before

    # A kill while staging epoch 4 leaves a partial folder and a run file ahead of the backup.
    (tmp_path / "backup" / "epoch-0004.partial").mkdir()
    note.write_text("epoch 4")  # in place: the backup holds its own copy
    model = build()
    assert backup().restore(model) == 3 and model._initial_epoch == 3
    assert note.read_text() == "epoch 3"
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), Snapshot.weights[3]))
    assert int(model.optimizer.iterations.numpy()) == 3 * 4  # the optimizer state of the same epoch
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["epoch-0002", "epoch-0003"]

    # An unreadable newest epoch: the previous one is restored whole; without it, a clear error.
    (tmp_path / "backup" / "epoch-0003" / "latest.weights.h5").write_bytes(b"not hdf5")
    model = build()
    assert backup().restore(model) == 2 and note.read_text() == "epoch 2"
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), Snapshot.weights[2]))
    assert int(model.optimizer.iterations.numpy()) == 2 * 4
    assert committed_epochs(tmp_path) == [2]
    (tmp_path / "backup" / "epoch-0002" / "latest.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(KeffError, match="cannot be restored"):
        backup().restore(build())

    # No complete epoch: the run files belong to an epoch that never committed and go.
    shutil.rmtree(tmp_path / "backup")
    assert backup().restore(build()) == 0 and not note.exists()


@pytest.mark.slow
def test_efficientnet_b0_trains_and_reports_the_papers_parameter_count(tmp_path):
    from keffconvert.data.digits import load_digits_arrays

    x, y = load_digits_arrays()
    np.savez(tmp_path / "small.npz", x_train=x[:256], y_train=y[:256], x_test=x[256:320], y_test=y[256:320])
    report = train("efficientnetb0", str(tmp_path / "small.npz"), image_size=32, out=tmp_path / "b0",
                   recipe=Recipe(epochs=1))
    original, converted = report["models"]
    assert original["trainable_params"] == 4_020_358
    assert converted["trainable_params"] == 639_702 and round(converted["reduction_pct"], 2) == 84.09
    assert converted["epochs"] == 1
    data = load_dataset(str(tmp_path / "small.npz"), (32, 32), 3, val_split=0.1, test_split=0.2, seed=0)
    assert len(data.y_test) == 64
    best = keras.models.load_model(tmp_path / "b0" / converted["checkpoint"], compile=False)
    predicted = best.predict(data.x_test.astype("float32"), batch_size=64, verbose=0).argmax(axis=1)
    assert converted["test_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_test)), abs=1e-6)
