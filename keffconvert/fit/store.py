"""Where the calibration walk keeps the activations that cross a fit: memory, then disk.

The walk (`keffconvert.fit.stream`) runs the network segment by segment, each over every
calibration batch, and a value that a later segment reads must wait for it. Held in memory,
those values grow with the number of images (at 224x224, megabytes per image); so past
`memory_limit` bytes the store writes further batches to files in a temporary folder, in
float16 when that holds them (finite, within float16's range: 3 significant digits, well
within what second-moment statistics need), else in float32. Memory then stays flat in the
number of images, and disk takes the rest; each file is removed as soon as its value's last
reader has run.
"""

import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
from keras import ops

DEFAULT_MEMORY_LIMIT = 1 << 30  # bytes of activations held in memory before the store spills to disk
FLOAT16_MAX = 65000.0  # below float16's largest finite value (65504): these values round-trip in float16


class ValueStore:
    """Batches of named values: `put(key, index, array)`, `get(key, index)`, `drop(key)`."""

    def __init__(self, memory_limit=DEFAULT_MEMORY_LIMIT, folder=None):
        self.memory_limit = int(memory_limit)
        self._parent = folder
        self._folder = None
        self._memory = {}  # (key, index) -> array
        self._files = {}  # (key, index) -> path
        self.in_memory = 0  # bytes held now
        self.peak_in_memory = 0
        self.spilled = 0  # bytes written to disk in all
        self._written = 0  # files written (their names)

    def put(self, key, index, value):
        """Keep a batch (a backend tensor, held as it is while it fits in memory)."""
        size = _nbytes(value)
        if self.in_memory + size <= self.memory_limit:
            self._memory[(key, index)] = value
            self.in_memory += size
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            return
        path = self._spill_folder() / f"{self._written}.npy"
        self._written += 1
        np.save(path, _compact(value), allow_pickle=False)
        self._files[(key, index)] = path
        self.spilled += path.stat().st_size

    def get(self, key, index):
        """The batch as it was put (from disk: float32, up to float16 rounding)."""
        found = self._memory.get((key, index))
        if found is not None:
            return found
        stored = np.load(self._files[(key, index)], allow_pickle=False)
        return ops.cast(ops.convert_to_tensor(stored), "float32")  # the cast on the backend: many threads

    def drop(self, key):
        """Forget every batch of `key` (its last reader has run)."""
        for slot in [s for s in self._memory if s[0] == key]:
            self.in_memory -= _nbytes(self._memory.pop(slot))
        for slot in [s for s in self._files if s[0] == key]:
            self._files.pop(slot).unlink(missing_ok=True)

    def close(self):
        self._memory.clear()
        self._files.clear()
        self.in_memory = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spill_folder(self):
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="keffconvert-calibration-", dir=self._parent))
        return self._folder


def _nbytes(value):
    return int(np.prod(value.shape)) * np.dtype(keras.backend.standardize_dtype(value.dtype)).itemsize


def _compact(value):
    """A numpy copy of `value`: float16 when every value survives the cast to it, else float32.
    The check and the cast run on the backend (many threads), so half the bytes are copied."""
    value = ops.cast(value, "float32")
    largest = float(ops.convert_to_numpy(ops.max(ops.abs(value)))) if int(np.prod(value.shape)) else 0.0
    if np.isfinite(largest) and largest < FLOAT16_MAX:
        return ops.convert_to_numpy(ops.cast(value, "float16"))
    return ops.convert_to_numpy(value)
