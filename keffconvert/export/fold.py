"""Inference export, the framework-neutral part: a model that predicts what the source predicts
with fewer, cheaper layers, built with Keras layers and NumPy only.

`inference_model` rebuilds a (converted or any other) Functional/Sequential model and folds,
in this order:

1. Linear residual blocks into one dense 1x1 Conv2D. The kEffNet replacement of a projection
   conv without activation (EfficientNet's `*project_conv`, C >= F) computes
   `K(x) + L(interleave(K(x)))` with K, its BN, the interleave, L and its BN all linear per
   pixel, so the whole block is `x @ W + b` with `W = A (P B + I)` (A: K with its BN, P: the
   interleave's permutation matrix, B: L with its BN): exact, and one layer instead of six. Done
   when W is small (at most `max_dense_weights` weights) or, for the Keras target, when K and L
   run as dense block-diagonal matmuls anyway (`layers.choose_implementation`); otherwise only
   the residual part `P B + I` (F x F) is merged, under the same rule.
2. BatchNormalization into the Conv2D, DepthwiseConv2D or GroupedPointwiseConv2D before it, when
   that layer has no activation of its own, the BN is the only consumer of its output and both
   are called once. At inference a BN is the per-channel map `y = x*s + (beta - mean*s)` with
   `s = gamma / sqrt(variance + epsilon)`, so the conv's kernel columns are scaled by `s` and it
   gets the bias `(b - mean)*s + beta`. Exact up to float rounding (about 1e-6 relative).
3. InterleaveChannels into weights, where that is exact (keffconvert/layers.py shows why it is
   never exact into the next grouped conv as a grouped conv). With `perm` its permutation:
   * into the next layer, when that is its only consumer and mixes all channels: a Conv2D with
     groups=1 or a Dense takes the interleave by reordering its kernel's input rows. Always done:
     it costs nothing.
   * into the next GroupedPointwiseConv2D L: `L(interleave(x))` is a dense 1x1 convolution whose
     kernel is L's block-diagonal kernel with its rows reordered. Exact, with g times L's
     weights, so done under the rule of 1 (small, or already run densely on the Keras target).
   * back into the conv K that produced the interleave's input (the expansion case, C < F),
     through per-channel layers (a BN, an element-wise activation) that each feed only the next:
     K's output columns (and the BN's parameters) are reordered, K becoming dense if it was
     grouped, under the same rule.
4. `target="tflite"`: the GroupedPointwiseConv2D layers left become `Conv2D(groups=g)`, whose
   kernel layout is the same, because TFLite runs a grouped CONV_2D natively (XNNPACK included);
   `target="keras"` keeps them (their `auto` kernels are the fast ones on the Keras backends).

Layers called more than once, nested models' boundaries and channels_first layers are never
folded across. The result is for inference only: its BN statistics are gone, and its dense
kernels make it hold more parameters than the converted model (fewer than the original).

As in the conversion, the folds are matched first, on each level's `graph.Graph` (`_LevelPlan`),
then applied by the one rebuild walk, `transform.rebuild` (`_Folder`). `export.formats` writes the
result (`export.tflite` converts it to TFLite); `export.check` checks that an export predicts
what its source predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keffconvert.graph.view import Graph, is_graph_model
from keffconvert.graph.layer_kinds import (is_elementwise, is_elementwise_activation_layer, is_plain_batch_norm,
                                     is_plain_conv2d)
from keffconvert.layers.grouped import GroupedPointwiseConv2D, InterleaveChannels
from keffconvert.layers.kernels import choose_implementation, interleave_permutation
from keffconvert.layers.padded import PaddedGroupedPointwiseConv2D, padded_dense_kernel
from keffconvert.graph.transform import Transform, clone_layer, rebuild
from keffconvert.rewrite.weights import bn_affine, grouped_to_dense

__all__ = ["DEFAULT_MAX_DENSE_WEIGHTS", "FoldReport", "TARGETS", "inference_model"]

TARGETS = ("keras", "tflite")
DEFAULT_MAX_DENSE_WEIGHTS = 16384


@dataclass
class FoldReport:
    """What `inference_model` folded, for printing and tests."""

    batch_norms: list = field(default_factory=list)  # "bn -> conv"
    interleaves: list = field(default_factory=list)  # "interleave -> layer (how)"
    kept_interleaves: list = field(default_factory=list)
    merges: list = field(default_factory=list)  # residual blocks merged into one dense conv
    grouped_to_conv: list = field(default_factory=list)  # GroupedPointwiseConv2D -> Conv2D(groups)
    params_before: int = 0
    params_after: int = 0

    def summary(self):
        return (f"folded {len(self.batch_norms)} BatchNormalization and {len(self.interleaves)} interleave layer(s) "
                f"({len(self.kept_interleaves)} interleave(s) kept), merged {len(self.merges)} linear residual "
                f"block(s); parameters {self.params_before:,} -> {self.params_after:,}")


def inference_model(model, *, target="keras", fold_batchnorm=True, fold_interleave=True,
                    max_dense_weights=DEFAULT_MAX_DENSE_WEIGHTS, batch_size=None, report=None):
    """A new model for inference with the same predictions as `model`, see the module docstring.

    Args:
        model: a Functional or Sequential Keras model (nested models are folded inside).
        target: "keras" (keep GroupedPointwiseConv2D) or "tflite" (GroupedPointwiseConv2D ->
            Conv2D(groups)).
        fold_batchnorm: fold BatchNormalization into the conv before it.
        fold_interleave: fold InterleaveChannels into weights where exact.
        max_dense_weights: the most weights a grouped conv may have once made dense to absorb an
            interleave; 0 never makes a grouped conv dense.
        batch_size: fix the inputs' batch dimension (TFLite export uses 1: every shape is then
            static, so no shape-computing ops split the XNNPACK delegate); None keeps it free.
        report: a `FoldReport` to fill in (optional).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}. Received: target={target!r}")
    if not is_graph_model(model):
        from keffconvert.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{type(model).__name__} is a subclassed model: it has no layer graph to fold")
    report = report if report is not None else FoldReport()
    folder = _Folder(target, fold_batchnorm, fold_interleave, max_dense_weights, report)
    new_model = rebuild(model, folder, batch_size=batch_size)
    folder.assign_weights()
    report.params_before = model.count_params()
    report.params_after = new_model.count_params()
    return new_model


# ---------------------------------------------------------------------------------------------
# What to do with each layer of one model level


@dataclass
class _ConvFold:
    """How one conv-like layer changes: a BN folded in, permuted inputs or outputs, made dense."""

    layer: keras.layers.Layer
    bn: keras.layers.BatchNormalization | None = None
    in_perm: np.ndarray | None = None  # the interleave in front of it: its input o is x[in_perm[o]]
    out_perm: np.ndarray | None = None  # its output o must be the old output out_perm[o]
    dense: bool = False  # a grouped conv that becomes a dense Conv2D


@dataclass
class _Merge:
    """A linear pointwise chain and the residual sum around it, as one dense 1x1 Conv2D."""

    name: str
    kernel: np.ndarray  # (C, F)
    bias: np.ndarray  # (F,)
    dtype: object = None


class _LevelPlan:
    """The folds of one Functional level, decided from its `Graph` before anything is built."""

    def __init__(self, model, fold_batchnorm, fold_interleave, max_dense_weights, report, target="keras"):
        self.graph = Graph.of(model)
        self.max_dense_weights = max_dense_weights
        self.target = target
        self.report = report
        self.convs = {}  # id(layer) -> _ConvFold
        self.merges = {}  # id(first layer of a merged residual block) -> _Merge
        self.passthrough = {}  # id(layer) -> None (its call returns its input) or i (input i of a list)
        self.permuted_bn = {}  # id(bn) -> perm (a BN that sits between K and a folded interleave)
        if fold_batchnorm and fold_interleave:
            for node in self.graph.nodes:
                if isinstance(node.operation, keras.layers.Add):
                    self._plan_residual_merge(node)
        if fold_batchnorm:
            for node in self.graph.nodes:
                if isinstance(node.operation, keras.layers.BatchNormalization):
                    self._plan_bn(node)
        if fold_interleave:
            for node in self.graph.nodes:
                if isinstance(node.operation, InterleaveChannels):
                    self._plan_interleave(node)

    # -- helpers ------------------------------------------------------------------------------

    def _once(self, layer):
        return self.graph.called_once(layer)

    def _taken(self, layer):
        """Already part of a merge or passed through."""
        return id(layer) in self.passthrough or id(layer) in self.merges

    def _fold(self, layer):
        return self.convs.setdefault(id(layer), _ConvFold(layer))

    # -- residual blocks: Add(L(interleave(K(x))), K(x)) with nothing non-linear inside --------

    def _plan_residual_merge(self, node):
        """The kEffNet C >= F replacement without an activation (EfficientNet's project convs):
        K, its BN, the interleave, L and its BN are all linear and so is the sum, so
        `x -> sum` is one dense 1x1 convolution, exact. Merged only while its kernel has at most
        `max_dense_weights` weights (else just the residual part `b -> sum`, F x F, if that fits)."""
        add = node.operation
        if not self._once(add) or len(node.input_tensors) != 2:
            return
        for index in (0, 1):
            a, b = node.input_tensors[index], node.input_tensors[1 - index]
            chain = self._linear_chain(a, b, node)
            if not chain or not any(_is_pointwise_conv(n.operation) for n in chain):
                continue
            if sorted(map(id, self.graph.consumers(b))) != sorted([id(chain[0]), id(node)]):
                continue
            channels = b.shape[-1]
            prefix = self._linear_prefix(b)
            in_channels = prefix[0].input_tensors[0].shape[-1] if prefix else None
            if prefix and in_channels is not None and self._merge_fits(prefix, chain, in_channels, channels):
                first, rest = prefix[0], prefix[1:] + chain
            elif self._merge_fits([], chain, channels, channels):
                first, rest, prefix = chain[0], chain[1:], []
            else:
                continue
            kernel, bias = _compose(prefix, in_channels if prefix else channels)
            residual, residual_bias = _compose(chain, channels)
            residual = residual + np.eye(channels)
            kernel, bias = kernel @ residual, bias @ residual + residual_bias
            self.merges[id(first.operation)] = _Merge(add.name, kernel, bias, _dtype_of(first.operation))
            for n in rest:
                self.passthrough[id(n.operation)] = None
            self.passthrough[id(add)] = index
            names = [n.operation.name for n in prefix + chain]
            self.report.merges.append(f"{' + '.join(names)} + {add.name} -> {add.name} (dense {kernel.shape[0]}x"
                                      f"{kernel.shape[1]})")
            return

    def _linear_chain(self, a, b, add_node):
        """Nodes from b's consumer to a's producer when a = chain(b) through linear per-pixel
        layers that each feed only the next; else None."""
        chain, tensor, consumer = [], a, add_node
        for _ in range(16):
            node = self.graph.producer(tensor)
            if node is None or len(node.input_tensors) != 1 or not _is_linear_pointwise(node.operation) \
                    or not self._once(node.operation) or self._taken(node.operation):
                return None
            if self.graph.only_consumer(tensor) is not consumer:
                return None
            chain.insert(0, node)
            tensor, consumer = node.input_tensors[0], node
            if tensor is b:
                return chain
        return None

    def _linear_prefix(self, b):
        """[K node, BN node...] producing b, K a linear pointwise conv; [] if b comes otherwise."""
        prefix, tensor = [], b
        for _ in range(4):
            node = self.graph.producer(tensor)
            if node is None or len(node.input_tensors) != 1 or not self._once(node.operation) \
                    or self._taken(node.operation):
                return []
            layer = node.operation
            if prefix and self.graph.only_consumer(tensor) is not prefix[0]:
                return []
            if isinstance(layer, keras.layers.BatchNormalization) and _is_linear_pointwise(layer):
                prefix.insert(0, node)
            elif _is_pointwise_conv(layer):
                prefix.insert(0, node)
                return prefix
            else:
                return []
            tensor = node.input_tensors[0]
        return []

    # -- BatchNormalization -------------------------------------------------------------------

    def _plan_bn(self, node):
        bn = node.operation
        rank = len(node.input_tensors[0].shape) if len(node.input_tensors) == 1 else 0
        if not self._once(bn) or not is_plain_batch_norm(bn, rank) or self._taken(bn):
            return
        producer = self.graph.input_producer(node)
        if producer is None or not self.graph.feeds_only(producer, node):
            return
        conv = producer.operation
        if not _bn_foldable_into(conv) or not self._once(conv) or self._taken(conv):
            return
        self._fold(conv).bn = bn
        self.passthrough[id(bn)] = None
        self.report.batch_norms.append(f"{bn.name} -> {conv.name}")

    # -- InterleaveChannels -------------------------------------------------------------------

    def _plan_interleave(self, node):
        layer = node.operation
        if self._taken(layer):
            return None
        channels = node.input_tensors[0].shape[-1] if len(node.input_tensors) == 1 else None
        if not self._once(layer) or channels is None:
            return self._keep(layer)
        perm = interleave_permutation(channels, layer.step_size)
        consumer = self.graph.sole_consumer(node)
        if consumer is not None and self._once(consumer.operation) and not self._taken(consumer.operation):
            target = consumer.operation
            if _is_dense_conv(target) or isinstance(target, keras.layers.Dense):
                return self._fold_forward(layer, target, perm, "its input rows reordered")
            if isinstance(target, GroupedPointwiseConv2D) and not self._planned_perm(target, "in_perm") \
                    and self._dense_fits(target, channels):
                return self._fold_forward(layer, target, perm, "made dense, input rows reordered", dense=True)
        chain = self._backward_chain(node)
        if chain is not None:
            conv, between = chain
            dense = isinstance(conv, GroupedPointwiseConv2D)
            in_channels = conv.kernel.shape[-2] * (conv.groups if dense else 1)
            if not dense or self._dense_fits(conv, in_channels):
                fold = self._fold(conv)
                fold.out_perm, fold.dense = perm, fold.dense or dense
                for bn in between:
                    if id(bn) not in self.passthrough:
                        self.permuted_bn[id(bn)] = perm
                self.passthrough[id(layer)] = None
                how = "made dense, output columns reordered" if dense else "output columns reordered"
                self.report.interleaves.append(f"{layer.name} -> {conv.name} ({how})")
                return None
        return self._keep(layer)

    def _keep(self, layer):
        self.report.kept_interleaves.append(layer.name)

    def _fold_forward(self, interleave, target, perm, how, dense=False):
        fold = self._fold(target)
        fold.in_perm, fold.dense = perm, fold.dense or dense
        self.passthrough[id(interleave)] = None
        self.report.interleaves.append(f"{interleave.name} -> {target.name} ({how})")

    def _planned_perm(self, layer, attribute):
        fold = self.convs.get(id(layer))
        return fold is not None and getattr(fold, attribute) is not None

    def _dense_fits(self, grouped, in_channels):
        """Whether grouped conv `grouped` may become dense: its dense kernel is small, or (Keras
        target) its `auto` kernel is the dense block-diagonal matmul anyway, so a dense kernel
        with reordered rows or columns costs nothing more at run time."""
        if in_channels * grouped.filters <= self.max_dense_weights:
            return True
        return self._runs_dense(grouped, in_channels)

    def _runs_dense(self, layer, in_channels):
        return (self.target == "keras" and self.max_dense_weights > 0 and isinstance(layer, GroupedPointwiseConv2D)
                and choose_implementation(in_channels, layer.filters, layer.groups) == "blockdiag")

    def _merge_fits(self, prefix, chain, in_channels, channels):
        """A merged residual block may be one dense (in_channels, channels) kernel: it is small, or
        (Keras target) every conv it replaces already runs as a dense matmul."""
        if in_channels * channels <= self.max_dense_weights:
            return True
        convs = [n for n in prefix + chain if _is_pointwise_conv(n.operation)]
        return bool(convs) and all(self._runs_dense(n.operation, n.input_tensors[0].shape[-1]) for n in convs)

    def _backward_chain(self, node):
        """(K, per-channel layers between) when the interleave's input comes from conv K through
        BNs and element-wise activations that each feed only the next; else None."""
        between = []
        current = node
        while True:
            producer = self.graph.input_producer(current)
            if producer is None or not self.graph.feeds_only(producer, current) or not self._once(producer.operation) \
                    or self._taken(producer.operation) and id(producer.operation) not in self.passthrough:
                return None
            layer = producer.operation
            if id(layer) in self.passthrough and not isinstance(layer, keras.layers.BatchNormalization):
                return None
            if isinstance(layer, keras.layers.BatchNormalization):
                if not is_plain_batch_norm(layer, len(producer.outputs[0].shape)):
                    return None
                between.append(layer)
            elif is_elementwise_activation_layer(layer):
                pass
            elif isinstance(layer, GroupedPointwiseConv2D) or _is_dense_conv(layer):
                if not is_elementwise(layer.activation) or self._planned_perm(layer, "out_perm"):
                    return None
                return layer, between
            else:
                return None
            current = producer


def _dtype_of(layer):
    return layer.get_config().get("dtype")


def _is_pointwise_conv(layer):
    """A 1x1, stride-1 conv with no activation: GroupedPointwiseConv2D or a dense Conv2D."""
    if isinstance(layer, (GroupedPointwiseConv2D, PaddedGroupedPointwiseConv2D)):
        return layer.activation is keras.activations.linear
    return (_is_dense_conv(layer) and tuple(layer.kernel_size) == (1, 1) and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1) and layer.activation is keras.activations.linear)


def _is_linear_pointwise(layer):
    if isinstance(layer, keras.layers.BatchNormalization):
        return is_plain_batch_norm(layer, 4)
    return isinstance(layer, InterleaveChannels) or _is_pointwise_conv(layer)


def _linear_map(layer, channels):
    """(M, bias) with layer(x) == x @ M + bias per pixel, in float64."""
    if isinstance(layer, keras.layers.BatchNormalization):
        scale, shift = bn_affine(layer)
        return np.diag(scale), shift
    if isinstance(layer, InterleaveChannels):
        perm = interleave_permutation(channels, layer.step_size)
        matrix = np.zeros((channels, channels))
        matrix[perm, np.arange(channels)] = 1.0
        return matrix, np.zeros(channels)
    weights = [np.asarray(w, "float64") for w in layer.get_weights()]
    kernel = weights[0]
    if isinstance(layer, GroupedPointwiseConv2D):
        kernel = grouped_to_dense(kernel, layer.groups)
    if isinstance(layer, PaddedGroupedPointwiseConv2D):  # the 2022 variant: padded inputs, two paths
        kernel = padded_dense_kernel(kernel, channels, layer.channels_per_group)
    matrix = kernel[0, 0]
    bias = weights[1] if layer.use_bias else np.zeros(matrix.shape[1])
    return matrix, bias


def _compose(nodes, channels):
    """The (M, bias) of applying the nodes' layers in order to `channels` channels."""
    matrix, bias = np.eye(channels), np.zeros(channels)
    for node in nodes:
        m, b = _linear_map(node.operation, matrix.shape[1])
        matrix, bias = matrix @ m, bias @ m + b
    return matrix, bias


def _bn_foldable_into(layer):
    if not isinstance(layer, (GroupedPointwiseConv2D, PaddedGroupedPointwiseConv2D, keras.layers.DepthwiseConv2D)) \
            and not is_plain_conv2d(layer):
        return False
    return layer.activation is keras.activations.linear and getattr(layer, "data_format", None) != "channels_first"


def _is_dense_conv(layer):
    """A Conv2D that mixes all input channels (groups=1, channels_last)."""
    return is_plain_conv2d(layer) and layer.groups == 1 and layer.data_format == "channels_last"


# ---------------------------------------------------------------------------------------------
# Rebuilding


class _Folder(Transform):
    """Rebuilds each level with the folds its `_LevelPlan` decided: folded layers pass their input
    through, folded convs and merges get new weights (assigned once the whole model is built)."""

    def __init__(self, target, fold_batchnorm, fold_interleave, max_dense_weights, report):
        self.target = target
        self.fold_batchnorm = fold_batchnorm
        self.fold_interleave = fold_interleave
        self.max_dense_weights = max_dense_weights
        self.report = report
        self.pending = []  # (new layer, weights) assigned once the new model is built

    def needs_functional(self, model):
        return True  # folded layers are skipped in their call, which Keras runs in Functional models only

    def begin_level(self, model):
        return _LevelPlan(model, self.fold_batchnorm, self.fold_interleave, self.max_dense_weights, self.report,
                          self.target)

    def clone(self, layer, plan):
        new, weights = self._new_layer(layer, plan)
        if weights:
            self.pending.append((new, weights))
        return new

    def call(self, original, layer, plan, *args, **kwargs):
        if id(original) in plan.passthrough:
            index = plan.passthrough[id(original)]
            return args[0] if index is None else args[0][index]
        return layer(*args, **kwargs)

    def assign_weights(self):
        for layer, weights in self.pending:
            layer.set_weights(weights)

    def _new_layer(self, layer, plan):
        merge = plan.merges.get(id(layer))
        if merge is not None:
            new = keras.layers.Conv2D(merge.kernel.shape[1], 1, name=merge.name, dtype=merge.dtype)
            return new, [merge.kernel[None, None].astype("float32"), merge.bias.astype("float32")]
        if id(layer) in plan.passthrough:
            return clone_layer(layer), []  # folded away: never called, never built
        fold = plan.convs.get(id(layer))
        if fold is not None:
            return _folded_conv(fold, self.target, self.report)
        if isinstance(layer, GroupedPointwiseConv2D) and self.target == "tflite":
            return _folded_conv(_ConvFold(layer), self.target, self.report)
        new = clone_layer(layer)
        weights = layer.get_weights()
        if id(layer) in plan.permuted_bn:
            perm = plan.permuted_bn[id(layer)]
            weights = [w[perm] for w in weights]
        return new, weights


def _folded_conv(fold, target, report):
    """The new layer for a conv-like layer with its folds applied, and its weights."""
    layer = fold.layer
    config = layer.get_config()
    kernel, *rest = [np.asarray(w) for w in layer.get_weights()]
    bias = rest[0] if getattr(layer, "use_bias", False) and rest else None
    is_depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    use_bias = bias is not None
    if fold.bn is not None:
        scale, shift = bn_affine(fold.bn)
        if is_depthwise:
            kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
        else:
            kernel = kernel * scale
        bias = (bias if bias is not None else 0.0) * scale + shift
        use_bias = True
    grouped = isinstance(layer, GroupedPointwiseConv2D)
    if grouped and fold.dense:
        kernel = grouped_to_dense(kernel, layer.groups)
    if fold.in_perm is not None:  # new row perm[o] takes old row o
        inverse = np.argsort(fold.in_perm)
        kernel = kernel[inverse] if kernel.ndim == 2 else kernel[..., inverse, :]
    if fold.out_perm is not None:
        kernel = kernel[..., fold.out_perm]
        bias = bias[fold.out_perm] if bias is not None else None
    weights = [kernel.astype("float32")] + ([np.asarray(bias, "float32")] if use_bias else [])
    dtype = config.get("dtype")
    common = dict(use_bias=use_bias, activation=config["activation"], name=layer.name, dtype=dtype)
    if grouped:
        if fold.dense:
            new = keras.layers.Conv2D(layer.filters, 1, **common)
        elif target == "tflite":
            new = keras.layers.Conv2D(layer.filters, 1, groups=layer.groups, **common)
            report.grouped_to_conv.append(layer.name)
        else:
            new = GroupedPointwiseConv2D(layer.filters, layer.groups, **common)
        return new, weights
    config["use_bias"] = use_bias
    if use_bias and "bias_initializer" in config:
        config["bias_initializer"] = "zeros"
    return layer.__class__.from_config(config), weights
