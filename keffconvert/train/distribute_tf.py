"""Training on several GPUs or machines with `tf.distribute`: the strategy, TF_CONFIG, who writes.

TensorFlow-only (tf.distribute), so kept apart from `keffconvert.train`, which runs on any Keras
backend otherwise. Three strategies (`STRATEGIES`):

* ``default``: one device;
* ``mirrored``: `tf.distribute.MirroredStrategy`, every GPU of this machine;
* ``multiworker``: `tf.distribute.MultiWorkerMirroredStrategy` over several machines (workers),
  configured the standard way by the `TF_CONFIG` environment variable, e.g. on the second of two
  machines ``{"cluster": {"worker": ["a:2222", "b:2222"]}, "task": {"type": "worker", "index": 1}}``.
  Every worker runs the same command with its own TF_CONFIG.

Multi-worker rules this module carries out (TensorFlow's multi-worker Keras tutorial):

* the strategy is created before TensorFlow runs anything else (collective ops are configured at
  program start), so `start_strategy` is the first thing `train` does;
* every worker executes the same saves in the same order (saving reads synchronised variables,
  which is a collective operation), but only the chief (task ``chief``, else ``worker`` 0) writes
  the run folder: the others write into a temporary folder of their own (`worker_run_dir`),
  deleted when they finish;
* to resume, a non-chief worker starts from a copy of what the chief committed (the run folder
  must be readable by every worker, as TensorFlow's BackupAndRestore expects), and the workers
  compare their progress before each model (`same_progress`) so that a worker that sees another
  state stops with one line instead of waiting forever on the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from keffconvert.errors import OutputError, UsageConflict

STRATEGIES = ("default", "mirrored", "multiworker")
JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains with ("evaluator" is not supported)
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")
_COMMITTED = re.compile(r"^epoch-(\d+)$")
# Gradients are all-reduced in packs of about this size rather than one collective per variable
# (TensorFlow's default, 0): a small model has dozens of variables, each a network round trip a step.
PACK_BYTES = 32 << 20
_started = {}  # the one MultiWorkerMirroredStrategy a process may create


@dataclass(frozen=True)
class Worker:
    """This process's place in the cluster named by TF_CONFIG."""

    task_type: str
    index: int
    workers: int  # chief and workers together
    has_chief_job: bool = False  # without a "chief" job, worker 0 is the chief
    address: str = ""  # this worker's host:port in the cluster

    @property
    def is_chief(self):
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0 and not self.has_chief_job)

    def describe(self):
        return f"{self.task_type} {self.index} of {self.workers} workers"


def read_tf_config(environ=None):
    """The `Worker` TF_CONFIG describes; UsageConflict (one line, exit 2) when it is missing or wrong."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        raise UsageConflict("--strategy multiworker needs the TF_CONFIG environment variable: the cluster and "
                            "this worker's task, e.g. {\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, "
                            "\"task\": {\"type\": \"worker\", \"index\": 0}}")
    try:
        config = json.loads(text)
    except ValueError as error:
        raise UsageConflict(f"TF_CONFIG is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) \
            or not isinstance(config.get("task"), dict):
        raise UsageConflict("TF_CONFIG needs a \"cluster\" object (job name -> list of host:port) and a \"task\" "
                            "object (type and index of this worker)")
    cluster, task = config["cluster"], config["task"]
    unknown = sorted(set(cluster) - set(JOBS))
    if unknown:
        raise UsageConflict(f"TF_CONFIG cluster has job(s) {', '.join(map(repr, unknown))}; multi-worker training "
                            f"uses only {' and '.join(JOBS)}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise UsageConflict(f"TF_CONFIG cluster job {job!r} must be a non-empty list of host:port addresses")
        for address in addresses:
            match = _ADDRESS.match(address) if isinstance(address, str) else None
            if match is None or not 0 < int(match.group(2)) < 65536:
                raise UsageConflict(f"TF_CONFIG cluster job {job!r} has address {address!r}; expected host:port")
    if len(cluster.get("chief", [])) > 1:
        raise UsageConflict(f"TF_CONFIG cluster has {len(cluster['chief'])} chiefs; at most one")
    everyone = [a for job in JOBS for a in cluster.get(job, [])]
    if len(set(everyone)) != len(everyone):
        raise UsageConflict("TF_CONFIG cluster names the same host:port twice")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise UsageConflict(f"TF_CONFIG task type {task_type!r} is not a job of the cluster "
                            f"({', '.join(sorted(cluster))})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise UsageConflict(f"TF_CONFIG task index {index!r} is not one of the cluster's {task_type!r} "
                            f"tasks (0..{len(cluster[task_type]) - 1})")
    return Worker(task_type, index, len(everyone), has_chief_job="chief" in cluster,
                  address=cluster[task_type][index])


def start_strategy(name, environ=None):
    """(strategy, worker): the `tf.distribute` strategy `name` names and, for multiworker, this
    process's `Worker` (None otherwise). Call it before anything else runs TensorFlow."""
    if name not in STRATEGIES:
        raise UsageConflict(f"strategy must be one of {', '.join(STRATEGIES)} (got {name!r})")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(), None
    if name != "multiworker":
        return tf.distribute.get_strategy(), None
    worker = read_tf_config(environ)
    if _started.get("multiworker") is not None:  # a second run in the same process (sweep)
        return _started["multiworker"], worker
    from keffconvert.graph.keras_compat import fix_multiworker_fit

    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver(),
            communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=PACK_BYTES))
    except tf.errors.OpError as error:  # this worker's port is taken, or the address is not this machine's
        raise UsageConflict(f"cannot start multi-worker training as {worker.describe()} at {worker.address} "
                            f"({_first_line(error.message)}): is the port free, and is TF_CONFIG's task this "
                            "machine?") from None
    except (RuntimeError, ValueError) as error:  # TensorFlow already running; cluster refused
        raise UsageConflict(f"cannot start multi-worker training ({_first_line(str(error))}); run it in a fresh "
                            "process, before anything else uses TensorFlow") from None
    fix_multiworker_fit()
    _started["multiworker"] = strategy
    return strategy, worker


def _first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else "no reason given"


def is_multiworker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


class WorkerRunDir:
    """Where this worker writes the run: the run folder itself for the chief (and without workers);
    for another worker a temporary folder, prepared with a copy of what the chief committed (so it
    resumes where the chief does) and deleted by `cleanup`."""

    def __init__(self, out, worker, force):
        self.out = Path(out)
        self._temporary = None
        if worker is None or worker.is_chief:
            self.path = self.out
            return
        self._temporary = tempfile.TemporaryDirectory(prefix=f"keffconvert-{worker.task_type}{worker.index}-")
        self.path = Path(self._temporary.name) / (self.out.name or "run")
        self.path.mkdir()
        if not force:
            _copy_committed(self.out, self.path)

    def cleanup(self):
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


def _copy_committed(source, target, model_dirs=("original", "converted")):
    """Copy the run files and every committed epoch backup of `source` into `target` (never the
    partial backups the chief may be clearing while this runs). The history and best checkpoint
    are copied as they are; restoring the backup puts back those of the committed epoch."""
    if not source.is_dir():
        return
    for name in ("run.json", "report.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    for model in model_dirs:
        if not (source / model).is_dir():
            continue
        (target / model).mkdir()
        for name in ("result.json", "initial.json", "history.json", "best.json", "best.keras"):
            if (source / model / name).is_file():
                shutil.copy2(source / model / name, target / model / name)
        backups = source / model / "backup"
        if backups.is_dir():
            for entry in backups.iterdir():
                if entry.is_dir() and _COMMITTED.match(entry.name):
                    shutil.copytree(entry, target / model / "backup" / entry.name)


def progress(folder):
    """How far the model in `folder` is: -1 when finished (result.json), else its newest committed epoch."""
    folder = Path(folder)
    if (folder / "result.json").exists():
        return -1
    backups = folder / "backup"
    epochs = [int(m.group(1)) for e in (backups.iterdir() if backups.is_dir() else ())
              if (m := _COMMITTED.match(e.name)) and e.is_dir()]
    return max(epochs, default=0)


def same_progress(strategy, folder, label):
    """With several workers: stop (OutputError, one line) unless every worker finds the model in
    `folder` equally far; a collective, so every worker calls it at the same point."""
    if not is_multiworker(strategy):
        return
    mine = progress(folder)
    local = tf.constant([float(mine)])
    values = strategy.experimental_distribute_values_from_function(lambda context: local)
    everyone = sorted({int(v) for v in strategy.gather(values, axis=0).numpy().tolist()})
    if len(everyone) > 1:
        def say(v):
            return "finished" if v == -1 else f"{v} epochs done"

        raise OutputError(f"{label}: the workers find different progress in the run folder "
                          f"({', '.join(say(v) for v in everyone)}); resuming needs the run folder on storage every "
                          "worker can read, or pass --force to start over")
