"""Per-epoch records of a training run: the history file, the best checkpoint, the progress lines."""

import json
import time
from contextlib import nullcontext
from pathlib import Path

import keras

from keffconvert.outputs import save_model, write_json


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
