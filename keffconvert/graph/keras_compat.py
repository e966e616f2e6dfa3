"""Every use keffconvert makes of Keras internals, one small named function each.

Keras 3 has no public API for these: the graph behind a Functional or Sequential model, the
layer that produced a symbolic tensor, turning safe mode off for one block, the epoch `fit`
resumes from. Private names can move in any Keras release, so nothing else in keffconvert
touches `keras.src` or an underscore attribute of a Keras object; when Keras is upgraded this
module is the one to check. Each function says the Keras version it was checked on (the one
CI installs, see pyproject.toml) and where the name lives there; every one of them is also in
3.14.0, the lower bound there.

Not here, because they cannot be a function: `train.AtomicBackupAndRestore` overrides the hooks
of `keras.callbacks.BackupAndRestore` (`_save_model`, `_load_model`, `_current_epoch`; checked on
3.15.1, keras/src/callbacks/backup_and_restore.py).
"""

from contextlib import contextmanager

# Checked on Keras 3.15.1: keras/src/models/functional.py. `keras.Model(inputs, outputs)` returns
# an instance of this class; a subclassed `keras.Model` is not one.
from keras.src.models.functional import Functional

__all__ = ["fix_multiworker_fit", "is_functional", "nodes_by_depth", "producing_layer", "safe_mode_off",
           "sequential_graph", "set_initial_epoch"]


def is_functional(obj):
    """Whether `obj` is a Functional model (`keras.Model(inputs, outputs)`), which has a layer graph.

    Checked on Keras 3.15.1 (`keras.src.models.functional.Functional`).
    """
    return isinstance(obj, Functional)


def nodes_by_depth(model):
    """{depth: [Node, ...]} of a Functional model's graph; the inputs are at the greatest depth.

    Checked on Keras 3.15.1 (`Function._nodes_by_depth`, keras/src/ops/function.py).
    """
    return model._nodes_by_depth


def sequential_graph(model):
    """The Functional model a built Sequential keeps for its layer graph, or None while unbuilt.

    Checked on Keras 3.15.1 (`Sequential._functional`, keras/src/models/sequential.py).
    """
    return getattr(model, "_functional", None)


def producing_layer(tensor):
    """The layer (operation) whose call produced the symbolic tensor `tensor`.

    Checked on Keras 3.15.1 (`KerasTensor._keras_history`, a `KerasHistory(operation, node_index,
    tensor_index)` set in keras/src/ops/node.py).
    """
    return tensor._keras_history[0]


@contextmanager
def safe_mode_off():
    """Deserialize without safe mode inside the block only (a Lambda's code may be rebuilt).

    `keras.config.enable_unsafe_deserialization()` is the public switch, but it is global and
    cannot be undone; the scope restores the previous setting. Checked on Keras 3.15.1
    (`keras.src.saving.serialization_lib.SafeModeScope`).
    """
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        yield


def set_initial_epoch(model, epoch):
    """Make the next `model.fit` start at `epoch` (what `BackupAndRestore` does after a restore).

    Checked on Keras 3.15.1 (`Trainer._initial_epoch`, read by `fit` in
    keras/src/backend/tensorflow/trainer.py).
    """
    model._initial_epoch = epoch


def fix_multiworker_fit():
    """Let `Model.fit`/`evaluate` run under `tf.distribute.MultiWorkerMirroredStrategy` (TensorFlow
    backend only; called by `keffconvert.distribute_tf` once that strategy exists).

    Keras 3 fails there in two places (keras-team/keras#20585, open): the symbolic build before the
    first step all-reduces the first batch as a whole structure, which the collective ops refuse
    (take this worker's first replica's batch instead: it only fixes shapes and dtypes), and the
    step's metrics are averaged across workers with `axis=0`, which fails for scalars (average
    them element-wise, `axis=None`). Both changes act only under that strategy in multi-worker
    mode. Checked on Keras 3.15.1 only (`TensorFlowTrainer._maybe_symbolic_build` and the module
    functions `reduce_per_replica` and `_collective_all_reduce_multi_worker`, all in
    keras/src/backend/tensorflow/trainer.py); `tests/test_distribute.py` fails if they move.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_keffconvert_multiworker_fix", False):
        return
    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and data_batch is None and strategy is not None \
                and trainer._collective_all_reduce_multi_worker(strategy):
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
            iterator = None
        return build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    trainer._keffconvert_multiworker_fix = True
