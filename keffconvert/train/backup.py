"""A training run that survives being killed: one atomic backup per epoch, restored on resume."""

import json
import os
import shutil
from pathlib import Path

import keras

from keffconvert.errors import OutputError
from keffconvert.graph.keras_compat import set_initial_epoch


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
