"""The two option groups of `keffconvert.convert`: the data-aware fit and a parameter budget.

Each group is one small, documented, validated object, so `convert(model, channels_per_group=16)`
stays the one-liner and the rarer settings travel together:

    keffconvert.convert(model, calibration=images)                        # fit on images
    keffconvert.convert(model, calibration=Calibration(images, rounds=5))
    keffconvert.convert(model, target=Target(reduction=80))               # choose each conv's cpg
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from keffconvert.errors import BudgetConfigError, UsageConflict
from keffconvert.fit.store import DEFAULT_MEMORY_LIMIT

TARGET_METHODS = ("lagrangian", "greedy")
TARGET_CHOICES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Calibration:
    """Fit every replacement so the converted model reproduces the original on `images`.

    Args:
        images: images as the model takes them (already scaled), any number of them: an array
            (N, H, W, C), or a batch source (`keffconvert.data.batches`: `__len__` and
            `batches(batch_size)`), which the fit reads once per pass, so it must be re-readable
            (a generator is refused).
        rounds: K/L alternations of the fit for linear chains with an L (`keffconvert.fit.solve`).
        batch_size: images per layer call while walking the networks (bounds one call's memory).
        progress: called with (layer name, relative error) after each fitted layer.
        memory_limit: bytes of activations the walk holds in memory (those a later part of the
            network needs); past it they go to files in `spill_folder` (default: the system's
            temporary folder), so memory stays flat in the number of images.
    """

    images: object
    rounds: int = 3
    batch_size: int = 32
    progress: Callable | None = None
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    spill_folder: str | None = None

    def __post_init__(self):
        if self.images is None:
            raise UsageConflict("Calibration needs images")
        if int(self.rounds) < 1 or int(self.batch_size) < 1 or int(self.memory_limit) < 0:
            raise UsageConflict(f"Calibration needs rounds >= 1, batch_size >= 1 and memory_limit >= 0. Received: "
                                f"rounds={self.rounds}, batch_size={self.batch_size}, memory_limit={self.memory_limit}")

    @classmethod
    def of(cls, value):
        """`value` as a Calibration: None stays None, images become `Calibration(images)`."""
        if value is None or isinstance(value, cls):
            return value
        return cls(value)


@dataclass(frozen=True)
class Target:
    """A parameter budget instead of one cpg: which convs convert, and at which cpg, is chosen at the
    least sensitivity (`keffconvert.target`; from the fit to the calibration images when given).

    Args:
        params: at most this many trainable parameters; or
        reduction: this percentage of the trainable parameters removed (exactly one of the two).
        method: "lagrangian" (error + lambda * parameters per conv, lambda bisected) or "greedy"
            (AIMET's common error threshold).
        choices: the channels-per-group values a conv may take (or it stays as it is).
    """

    params: int | None = None
    reduction: float | None = None
    method: str = "lagrangian"
    choices: tuple = TARGET_CHOICES

    def __post_init__(self):
        if (self.params is None) == (self.reduction is None):
            raise BudgetConfigError("give exactly one of params and reduction")
        if self.method not in TARGET_METHODS:
            raise BudgetConfigError(f"method must be one of {', '.join(TARGET_METHODS)}, got {self.method!r}")
        choices = tuple(sorted({int(c) for c in self.choices}))
        if not choices or choices[0] < 1:
            raise BudgetConfigError(f"channels-per-group choices must be >= 1, got {list(self.choices)}")
        object.__setattr__(self, "choices", choices)
