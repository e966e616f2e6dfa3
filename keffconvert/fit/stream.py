"""The calibration walk: the original network (and the converted one beside it) over every
calibration batch, with memory that does not grow with the number of images.

A fit needs the second moments of its chain's input over all calibration images before the
converted network can go past that chain (the fitted weights decide what it computes next). So
the `Schedule` is cut into segments at the chains that are fitted (`syncs`), and each segment runs
batch by batch:

* its layers, for both networks, run as one compiled function of the batch (`compiled`), which
  also computes, in the same graph, the moments the next fit needs (`[x, 1]^T [x, 1]` of the
  chain's input in the converted network, its product with the original's, and the original's
  own; over a regular subsample of at most `MAX_PIXELS` pixels per chain);
* the values a later segment reads (a residual block's input, the activations an SE gate will
  scale) go into a `ValueStore`, in memory up to its limit and on disk past it, and are dropped
  once their last reader has run.

Each layer therefore runs once per network and batch, the images are read once, and what is held
is a few batches, the moments, and the store's memory limit. A walk with no syncs (the original
alone, for `keffconvert.target`) is one segment: one compiled pass that measures every chain.
"""

import math
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from keffconvert.fit.compiled import compiled

ORIG, CONV = "o", "c"
# Pixels of one chain's input whose statistics are accumulated: a (C+1)^2 second-moment matrix
# is estimated well from far fewer rows than 512 images at 112x112 give (6.4M), so larger inputs
# are subsampled to about this many (every k-th pixel, in the order batch, row, column).
MAX_PIXELS = 1_000_000


@dataclass
class Request:
    """Moments of one chain's input, measured in `segment`."""

    step: int  # the chain's step
    key: str  # the value key of its input
    channels: int
    stride: int
    segment: int


class Walk:
    """Run `schedule` over `source` segment by segment; call `on_sync(step index, moments)` at
    each sync, before the segment that starts with that chain.

    Args:
        schedule: the model's `Schedule`.
        source: the calibration images (`keffconvert.data.batches`): `len()` images, `batches(n)`.
        requests: the chain steps whose input moments to measure.
        syncs: the chain steps that end a segment (each must also be in `requests`).
        conv_side: run the converted network too, with `clones` ({id(original layer): copy})
            and `replacements` ({id(chain conv): Replacement}); moments are then pairs
            (converted, cross, original). Without it, the original's moments of even and odd
            images (`halves`).
        store: the `ValueStore` for values that cross a segment.
    """

    def __init__(self, schedule, source, requests, *, store, syncs=(), conv_side=False, clones=None,
                 replacements=None, batch_size=32):
        self.schedule = schedule
        self.source = source
        self.store = store
        self.conv_side = conv_side
        self.clones = clones or {}
        self.replacements = replacements or {}
        self.batch_size = int(batch_size)
        self.sides = (ORIG, CONV) if conv_side else (ORIG,)
        self.bounds = [0, *sorted(syncs), len(schedule.steps)]
        segment_of = np.searchsorted(self.bounds, np.arange(len(schedule.steps)), side="right") - 1
        self.segment_of = [int(s) for s in segment_of]
        images = len(source)
        self.requests = []
        for step in sorted(requests):
            segment = self.segment_of[step] - (1 if step in syncs else 0)
            tensor = schedule.steps[step].node.input_tensors[0]
            pixels = math.prod(d for d in tensor.shape[1:-1] if d) or 1
            self.requests.append(Request(step, schedule.steps[step].inputs[0], int(tensor.shape[-1]),
                                         max(1, math.ceil(images * pixels / MAX_PIXELS)), segment))
        self._liveness()

    # -- which values cross which segments -------------------------------------------------------

    def _liveness(self):
        produced, consumed = {}, {}
        for key in self.schedule.inputs:
            for side in self.sides:
                produced[f"{side}|{key}"] = 0
        for index, step in enumerate(self.schedule.steps):
            segment = self.segment_of[index]
            for side in self.sides:
                reads, writes = self._io(step, side)
                for key in reads:
                    consumed.setdefault(key, set()).add(segment)
                for key in writes:
                    produced[key] = segment
        for request in self.requests:
            for side in self.sides:
                consumed.setdefault(f"{side}|{request.key}", set()).add(request.segment)
        self.produced, self.consumed = produced, consumed

    def _io(self, step, side):
        """(value keys read, value keys written) by `step` on `side`."""
        if side == ORIG:
            return [f"o|{k}" for k in step.inputs], [f"o|{k}" for k in step.outputs]
        if step.absorbed:
            return [], []
        if step.chain is not None:
            return [f"c|{step.inputs[0]}"], [f"c|{step.chain_output}"]
        return [f"c|{k}" for k in step.inputs], [f"c|{k}" for k in step.outputs]

    def _loads(self, segment):
        return sorted(k for k, used in self.consumed.items() if segment in used and self.produced[k] < segment)

    def _stores(self, segment):
        return sorted(k for k, used in self.consumed.items()
                      if self.produced.get(k) == segment and max(used) > segment)

    def _last_use(self, segment):
        return [k for k, used in self.consumed.items() if max(used) == segment and self.produced[k] < segment]

    # -- running ---------------------------------------------------------------------------------

    def run(self, on_sync=None):
        """Walk every segment; returns {step: accumulated moments (numpy float64)}."""
        totals = {}
        segments = len(self.bounds) - 1
        for segment in range(segments):
            if segment > 0 and on_sync is not None:
                sync = self.bounds[segment]
                on_sync(sync, totals.get(sync))
            self._run_segment(segment, totals)
        return totals

    def _run_segment(self, segment, totals):
        loads, stores = self._loads(segment), self._stores(segment)
        requests = [r for r in self.requests if r.segment == segment]
        function = self._segment_function(segment, loads, stores, requests)
        if self._has_spatial_work(segment):
            function = compiled(function)  # tracing costs ~0.1 s: not worth it for 1x1 (SE) segments
        batches = self.source.batches(self.batch_size) if segment == 0 else range(self._batch_count)
        count = 0
        for index, batch in enumerate(batches):
            inputs = {}
            for key in loads:
                inputs[key] = self.store.get(key, index)
            if segment == 0:
                for key in self.schedule.inputs:
                    for side in self.sides:
                        inputs[f"{side}|{key}"] = batch
            written, moments = function(inputs)
            for key, value in written.items():
                self.store.put(key, index, value)
            for step, parts in moments.items():
                parts = [ops.convert_to_numpy(p).astype("float64") for p in parts]
                if step in totals:
                    totals[step] = [t + p for t, p in zip(totals[step], parts)]
                else:
                    totals[step] = parts
            count = index + 1
        if segment == 0:
            self._batch_count = count
        for key in self._last_use(segment):
            self.store.drop(key)

    def _has_spatial_work(self, segment):
        """Whether any layer of the segment reads or writes more than one pixel an image."""
        for index in range(self.bounds[segment], self.bounds[segment + 1]):
            node = self.schedule.steps[index].node
            for tensor in [*node.input_tensors, *node.outputs]:
                if len(tensor.shape) > 2 and math.prod(d or 2 for d in tensor.shape[1:-1]) > 1:
                    return True
        return False

    def _segment_function(self, segment, loads, stores, requests):
        steps = range(self.bounds[segment], self.bounds[segment + 1])
        schedule = self.schedule

        def run(inputs):
            values = dict(inputs)
            moments = {}
            waiting = list(requests)

            def measure():
                for request in list(waiting):
                    keys = [f"{side}|{request.key}" for side in self.sides]
                    if all(k in values for k in keys):
                        moments[request.step] = self._moments(request, [values[k] for k in keys])
                        waiting.remove(request)

            measure()
            for index in steps:
                step = schedule.steps[index]
                for side in self.sides:
                    self._run_step(step, side, values)
                measure()
            return {key: values[key] for key in stores}, moments

        return run

    def _run_step(self, step, side, values):
        reads, writes = self._io(step, side)
        if not writes:
            return
        if side == CONV and step.chain is not None:
            values[writes[0]] = self.replacements[id(step.chain.conv)](values[reads[0]])
            return
        layer = step.layer if side == ORIG else self.clones.get(id(step.layer), step.layer)
        args, kwargs = step.node.arguments.fill_in(dict(zip(step.tensor_ids, (values[k] for k in reads))))
        values.update(zip(writes, keras.tree.flatten(layer(*args, **kwargs))))

    def _moments(self, request, parts):
        """Pairs: ([xc,1]^T [xc,1], [xc,1]^T [xo,1], [xo,1]^T [xo,1]); halves: the original's
        [x,1]^T [x,1] over the batch's even and odd images."""
        if self.conv_side:
            orig, conv = (_rows(p, request) for p in parts)
            return [_gram(conv, conv), _gram(conv, orig), _gram(orig, orig)]
        (value,) = parts
        halves = [_rows(value[start::2], request) for start in (0, 1)]
        return [_gram(h, h) for h in halves]


def _rows(value, request):
    """The value's pixels as rows [x, 1] (float32), every `stride`-th one."""
    rows = ops.reshape(ops.cast(value, "float32"), (-1, request.channels))
    if request.stride > 1:
        rows = rows[::request.stride]
    return ops.concatenate([rows, ops.ones_like(rows[:, :1])], axis=1)


def _gram(left, right):
    return ops.matmul(ops.transpose(left), right)
