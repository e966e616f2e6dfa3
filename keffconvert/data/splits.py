"""Validation and test hold-outs: stratified, seeded, computed from the labels alone."""

import numpy as np

from keffconvert.errors import DataError


def stratified_split(labels, fraction, seed):
    """(kept indices, held-out indices): `fraction` of each class held out, by a seeded shuffle.

    Each class keeps at least one image. Indices come back sorted, so the split depends only on
    the labels, `fraction` and `seed`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held.append(members[:count])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held


def hold_out(x, y, fraction, seed, what):
    """Split (x, y) into (x, y) kept and (x, y) held out; refuse when nothing can be held out."""
    kept, held = stratified_split(y, fraction, seed)
    if len(held) == 0:
        raise DataError(f"too few images ({len(y)}) to hold out a {what} split of {fraction:.0%}")
    return x[kept], y[kept], x[held], y[held]
