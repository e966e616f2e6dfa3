"""Training across workers (`--strategy multiworker`, TF_CONFIG) and in mixed precision."""

import json
import math
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keffconvert.cli import cli
from keffconvert.data.sources import load_dataset
from keffconvert.train.distribute_tf import read_tf_config
from keffconvert.errors import UsageConflict
from keffconvert.train.distill import Distiller
from keffconvert.train.precision import dtype_policy, precision_policy, rebuild


def tiny_model(size=8, classes=10, name="tiny"):
    """A small functional CNN with two convertible 1x1 convs, ending in a softmax Dense."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_act")(x)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.Activation("relu", name="expand_act")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="head")(x), name=name)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(addresses, index):
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


@pytest.mark.slow
def test_two_workers_train_together_in_mixed_precision_and_only_the_chief_writes(tmp_path):
    """Two workers on 127.0.0.1 train the converted model with `--strategy multiworker`; the same
    short run is the CPU mixed-precision check (`--mixed-precision on`: bfloat16, float32 output)."""
    model_path = tmp_path / "tiny.keras"
    tiny_model().save(model_path)
    out = tmp_path / "run"
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    for index in range(2):
        home = tmp_path / f"worker{index}"  # each worker's own current folder and temporary folder
        (home / "tmp").mkdir(parents=True)
        env = {**os.environ, "TF_CONFIG": tf_config(addresses, index), "TMPDIR": str(home / "tmp"),
               "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}  # one core each
        command = [sys.executable, "-m", "keffconvert.cli", "train", str(model_path), "--data", "digits",
                   "--epochs", "2", "--batch-size", "128", "--no-augment", "--heatmaps", "0",
                   "--strategy", "multiworker", "--mixed-precision", "on", "--out", str(out)]
        workers.append(subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=240)[0])
        finally:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    assert "the chief writes the report" in outputs[1] and f"wrote {out}/report.md" in outputs[0]
    epochs = [re.findall(r"epoch \d+/2: (loss .*?)\s+\(\d", output) for output in outputs]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]  # the same steps on both workers: same losses

    # Only the chief wrote: the run folder, nothing in the other worker's folders (its temporary
    # run folder is gone), and the report counts both workers.
    for index in range(2):
        left = [p.name for p in (tmp_path / f"worker{index}").rglob("*") if "keffconvert" in p.name]
        assert left == [], left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.keras", "worker0", "worker1"]
    assert [p.name for p in (tmp_path / "worker1").iterdir()] == ["tmp"]
    report = json.loads((out / "report.json").read_text())
    environment = report["environment"]
    assert (environment["strategy"], environment["workers"], environment["replicas"]) == ("multiworker", 2, 2)
    assert environment["worker"] == "worker:0" and environment["chief"] is True
    assert not (out / "converted" / "backup").exists()

    # The reported accuracy is the best checkpoint evaluated on the whole test split.
    converted = report["models"][-1]
    data = load_dataset("digits", (8, 8), 3, val_split=0.1, test_split=0.2, seed=0)
    best = keras.models.load_model(out / converted["checkpoint"])
    predicted = best.predict(data.x_test.astype("float32"), batch_size=128, verbose=0).argmax(axis=1)
    assert converted["test_accuracy"] == pytest.approx(float(np.mean(predicted == data.y_test)), abs=1e-6)
    history = converted["history"]
    assert [e["epoch"] for e in history] == [1, 2] and all(math.isfinite(e["loss"]) for e in history)
    assert converted["best_val_accuracy"] == pytest.approx(max(e["val_accuracy"] for e in history))

    # Mixed precision on the CPU: bfloat16 compute, the output layer in float32, finite losses.
    assert environment["precision"] == precision_policy("on", gpu=False) == "mixed_bfloat16"
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["val_loss"]) for e in history)
    assert math.isfinite(converted["test_loss"])
    policies = {layer.name: layer.dtype_policy.name for layer in best.layers}
    assert policies["head"] == "float32" and policies["stem"] == policies["expand_k"] == "mixed_bfloat16"
    assert best.get_layer("expand_k").compute_dtype == "bfloat16"
    assert best(data.x_test[:2].astype("float32")).dtype == "float32"


@pytest.mark.parametrize("config, message", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "needs a \"cluster\" object"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "task index 1"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief'"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "expected host:port"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "'ps'"),
    ("", "needs the TF_CONFIG environment variable"),
])
def test_a_wrong_tf_config_is_one_usage_error(config, message):
    with pytest.raises(UsageConflict, match=message.replace("(", r"\(")) as caught:
        read_tf_config({"TF_CONFIG": config})
    assert "\n" not in str(caught.value)


def test_the_chief_is_the_chief_task_or_else_worker_0():
    two = ["a:1", "b:1"]
    assert read_tf_config({"TF_CONFIG": tf_config(two, 0)}).is_chief
    assert not read_tf_config({"TF_CONFIG": tf_config(two, 1)}).is_chief
    with_chief = {"cluster": {"chief": ["c:1"], "worker": two}, "task": {"type": "worker", "index": 0}}
    worker = read_tf_config({"TF_CONFIG": json.dumps(with_chief)})
    assert not worker.is_chief and worker.workers == 3


def test_bad_tf_config_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_model().save(model_path)
    before = model_path.read_bytes()
    result = CliRunner().invoke(cli, ["train", str(model_path), "--strategy", "multiworker", "--out",
                                      str(tmp_path / "run")], env={"TF_CONFIG": '{"cluster": '})
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "TF_CONFIG is not valid JSON" in result.stderr
    assert not (tmp_path / "run").exists() and model_path.read_bytes() == before


def test_float16_scales_the_loss_and_distils_in_float32():
    """What a GPU run gets (mixed_float16): a LossScaleOptimizer, a float32 output and a float32
    distillation loss, even for a model that was itself built in mixed precision (checked on the
    CPU, whose kernels run float16 too)."""
    with dtype_policy("mixed_float16"):
        saved_mixed = tiny_model(name="student")  # every layer mixed_float16, the output too
    assert saved_mixed.get_layer("head").compute_dtype == "float16"
    x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    with dtype_policy("mixed_float16"):
        student = rebuild(saved_mixed, dtype="mixed_float16")
        trainer = Distiller(student, rebuild(tiny_model(name="teacher"), dtype="mixed_float16"), weight=0.5)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy())
        loss = trainer.compute_loss(x, np.arange(16) % 10, trainer(x, training=True), training=True)
    assert precision_policy("auto", gpu=False) == "float32" and precision_policy("auto", gpu=True) == "mixed_float16"
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert student.get_layer("head").compute_dtype == "float32" and student.get_layer("stem").compute_dtype == "float16"
    assert student(x).dtype == "float32" and loss.dtype == "float32" and math.isfinite(float(loss))
    assert trainer.distillation_loss(student(x), trainer.teacher(x)).dtype == "float32"
    # --mixed-precision off trains that same saved model in float32 throughout.
    assert {layer.compute_dtype for layer in rebuild(saved_mixed).layers[1:]} == {"float32"}


def test_a_non_chief_worker_resumes_from_a_copy_of_what_the_chief_committed(tmp_path):
    from keffconvert.train.distribute_tf import Worker, WorkerRunDir, progress

    out = tmp_path / "run"
    for name in ("epoch-0002", "epoch-0003", "epoch-0004.partial"):
        (out / "converted" / "backup" / name).mkdir(parents=True)
        (out / "converted" / "backup" / name / "latest.weights.h5").write_text(name)
    (out / "run.json").write_text("{}")
    (out / "converted" / "history.json").write_text("{}")
    (out / "original").mkdir()
    (out / "original" / "result.json").write_text("{}")

    private = WorkerRunDir(out, Worker("worker", 1, 2), force=False)
    assert private.path != out and (private.path / "run.json").is_file()
    assert sorted(p.name for p in (private.path / "converted" / "backup").iterdir()) == ["epoch-0002", "epoch-0003"]
    assert (progress(private.path / "converted"), progress(private.path / "original")) == (3, -1)
    assert (progress(out / "converted"), progress(out / "original")) == (3, -1)
    private.cleanup()
    assert not private.path.exists() and (out / "converted" / "backup" / "epoch-0004.partial").is_dir()

    fresh = WorkerRunDir(out, Worker("worker", 1, 2), force=True)  # --force: starts over, copies nothing
    assert list(fresh.path.iterdir()) == []
    fresh.cleanup()
    assert WorkerRunDir(out, Worker("worker", 0, 2), force=False).path == out  # the chief writes the run itself
