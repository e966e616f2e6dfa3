"""One analysis of a model's graph: which pointwise convolutions are eligible and what replaces them.

The plan, the rewrite, the weight transfer and the report all read the `Analysis` made here; none
of them re-derives which layers are coupled (the idea of Torch-Pruning's dependency graph).
The rules are the paper's section 3, as stated in METHOD.md.
"""

import fnmatch
from dataclasses import dataclass, field

import keras

from keffconvert.errors import UnsupportedModelError
from keffconvert.graph.view import Graph, functional_view, is_graph_model
from keffconvert.graph.layer_kinds import (is_elementwise, is_elementwise_activation_layer, is_plain_batch_norm,
                                     is_plain_conv2d)
from keffconvert.graph.macs import layer_macs, model_macs
from keffconvert.graph.model_info import count_weights, input_shape
from keffconvert.plan.model_plan import LayerPlan, Plan
from keffconvert.plan.variant2022 import check_variant, decide, describe_decision
from keffconvert.plan.replacement import describe, describe_padded, dropped_settings



def choose_groups(in_channels, filters, channels_per_group):
    """The largest common divisor of C and F that is <= C // cpg (rule 1); <= 1 means no change."""
    limit = in_channels // channels_per_group
    for g in range(min(limit, in_channels, filters), 1, -1):
        if in_channels % g == 0 and filters % g == 0:
            return g
    return 1


@dataclass
class Chain:
    """A pointwise conv M with the BatchNormalization B and activation A that only it feeds,
    and the new layers (`replacement.NewLayer`) that stand in for it."""

    conv: keras.layers.Conv2D
    bn: keras.layers.BatchNormalization | None
    act: keras.layers.Layer | None
    entry: LayerPlan
    new_layers: list = field(default_factory=list)

    def new_layer(self, role):
        return next((layer for layer in self.new_layers if layer.role == role), None)

    @property
    def layers(self):
        return [layer for layer in (self.conv, self.bn, self.act) if layer is not None]


@dataclass
class Analysis:
    """The plan plus, for each converted conv, its chain; keyed by layer identity."""

    plan: Plan
    model: keras.Model | None = None  # the model analysed
    chains: dict = field(default_factory=dict)  # id(conv) -> Chain (converted ones only)
    absorbed: set = field(default_factory=set)  # id(bn or act) folded into a converted chain

    def chain_of(self, layer):
        return self.chains.get(id(layer))

    def is_absorbed(self, layer):
        return id(layer) in self.absorbed

    def converts_directly(self, model):
        """Whether `model` itself (not only a model nested in it) holds a converted conv."""
        return any(id(layer) in self.chains for layer in model.layers)


def analyze(model, channels_per_group=16, include=None, exclude=None, per_layer=None, variant="2021"):
    """Walk `model` (nested models included) and decide, for every Conv2D, what happens to it.

    `per_layer` ({layer name, `outer/inner` path or glob: cpg or None}) gives some convs their own
    channels per group, or None to leave them as they are (`layer_cpg` says which key wins);
    the others take `channels_per_group`.
    """
    if channels_per_group < 1:
        raise ValueError(f"channels_per_group must be >= 1. Received: channels_per_group={channels_per_group}")
    for key, value in (per_layer or {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"per_layer[{key!r}] must be a channels-per-group >= 1 or None. Received: {value!r}")
    if not is_graph_model(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a subclassed model: it has no layer graph to rewrite; "
            "rebuild it as a Functional or Sequential model"
        )
    analysis = Analysis(plan=Plan(model_name=model.name, channels_per_group=channels_per_group,
                                  input_shape=_plan_input_shape(model)), model=model)
    analysis.plan.per_layer = dict(per_layer) if per_layer else None
    analysis.plan.variant = check_variant(variant)
    walker = _Walker(analysis, channels_per_group, include or [], exclude or [], per_layer or {},
                     variant=analysis.plan.variant)
    walker.walk(model, prefix="", trainable=model.trainable)
    plan = analysis.plan
    plan.trainable_params_before = count_weights(model.trainable_weights)
    plan.total_params_before = count_weights(model.weights)
    plan.trainable_params_after = plan.trainable_params_before + sum(
        e.trainable_after - e.trainable_before for e in plan.layers if e.converted)
    plan.total_params_after = plan.total_params_before + sum(
        e.total_after - e.total_before for e in plan.layers if e.converted)
    plan.macs_before = model_macs(model)
    if plan.macs_before is not None:
        plan.macs_after = plan.macs_before + sum(e.macs_after - e.macs_before for e in plan.layers if e.converted)
    return analysis


class _Walker:
    def __init__(self, analysis, cpg, include, exclude, per_layer, variant="2021"):
        self.analysis = analysis
        self.cpg = cpg
        self.include = include
        self.exclude = exclude
        self.per_layer = per_layer
        self.variant = variant  # "2022": keffconvert.variant2022's rules instead of METHOD.md's

    def walk(self, model, prefix, trainable):
        """`trainable`: whether every model enclosing this level is trainable (a frozen nested
        model freezes what it holds, whatever its layers say)."""
        graph = Graph(functional_view(model))
        for node in graph.nodes:
            layer = node.operation
            if is_graph_model(layer):
                self.walk(layer, prefix=f"{prefix}{layer.name}/", trainable=trainable and layer.trainable)
                continue
            if isinstance(layer, keras.Model):
                self.analysis.plan.kept_models.append({
                    "name": f"{prefix}{layer.name}", "type": type(layer).__name__,
                    "reason": "subclassed model: it has no layer graph to rewrite, so it is kept as it is"})
                continue
            if getattr(layer, "data_format", None) == "channels_first":
                raise UnsupportedModelError(
                    f"layer {prefix}{layer.name} uses data_format='channels_first'; "
                    "keffconvert rewrites channels_last models only"
                )
            if isinstance(layer, keras.layers.Conv2D):
                self._plan_conv(graph, node, layer, prefix, trainable)

    def _plan_conv(self, graph, node, conv, prefix, trainable):
        name = f"{prefix}{conv.name}"
        c_in, filters = node.input_tensors[0].shape[-1], conv.filters
        entry = LayerPlan(name=name, in_channels=c_in, filters=filters)
        _fill_unchanged(entry, conv, node, trainable)
        self.analysis.plan.layers.append(entry)
        reason = self._ineligible(graph, conv, name, c_in)
        if reason:
            entry.reason = reason
            return
        cpg = layer_cpg(conv.name, name, self.per_layer, self.cpg)
        if cpg is None:
            entry.reason = "left as it is by the per-layer choice"
            return
        entry.channels_per_group = cpg
        if self.variant == "2022":
            return self._plan_conv_2022(graph, node, conv, entry, cpg, trainable)
        groups = choose_groups(c_in, filters, cpg)
        entry.groups = groups
        if groups <= 1:
            limit = c_in // cpg
            entry.reason = (f"C={c_in} < 2*cpg: too few channels to group" if limit < 2 else
                            f"no common divisor of C={c_in} and F={filters} in 2..{limit}")
            return
        bn, act = _follow_chain(graph, node, conv)
        chain = Chain(conv, bn, act, entry, describe(conv, bn, act, c_in, groups))
        _fill_entry(entry, chain, node.outputs[0].shape, groups, trainable)
        self.analysis.chains[id(conv)] = chain
        self.analysis.absorbed.update(id(layer) for layer in (bn, act) if layer is not None)

    def _plan_conv_2022(self, graph, node, conv, entry, cpg, trainable):
        """The 2022 variant's rules (keffconvert/variant2022.py) for an eligible conv."""
        decision = decide(entry.in_channels, entry.filters, cpg)
        if not decision.convert:
            entry.reason = decision.reason
            return
        entry.groups = decision.groups
        entry.detail = describe_decision(decision, entry.in_channels)
        bn, act = _follow_chain(graph, node, conv)
        chain = Chain(conv, bn, act, entry, describe_padded(conv, bn, act, entry.in_channels, decision, cpg))
        _fill_entry(entry, chain, node.outputs[0].shape, decision.groups, trainable)
        self.analysis.chains[id(conv)] = chain
        self.analysis.absorbed.update(id(layer) for layer in (bn, act) if layer is not None)

    def _ineligible(self, graph, conv, name, c_in):
        if self.include and not _matches(conv.name, name, self.include):
            return "not matched by --include"
        for pattern in self.exclude:
            if _matches(conv.name, name, [pattern]):
                return f"excluded by pattern {pattern!r}"
        if not is_plain_conv2d(conv):
            return f"{type(conv).__name__} is a subclass of Conv2D: its call may compute something else"
        if conv.activation is not keras.activations.linear and not is_elementwise(conv.activation):
            return f"its activation {_function_name(conv.activation)!r} is not element-wise"
        if tuple(conv.kernel_size) != (1, 1):
            return f"kernel {conv.kernel_size[0]}x{conv.kernel_size[1]} is not 1x1"
        if tuple(conv.strides) != (1, 1):
            return f"strides {tuple(conv.strides)} are not 1"
        if tuple(conv.dilation_rate) != (1, 1):
            return f"dilation {tuple(conv.dilation_rate)} is not 1"
        if conv.groups != 1:
            return f"already grouped (groups={conv.groups})"
        if graph.call_count(conv) != 1:
            return f"shared layer, called {graph.call_count(conv)} times"
        if c_in is None:
            return "input channels unknown"
        return ""


def layer_cpg(short_name, path, per_layer, default):
    """A conv's channels per group: the `per_layer` value of its exact name or path, else of the
    first glob (in the mapping's order) that matches it, else `default`; None means leave it."""
    for key in (path, short_name):
        if key in per_layer:
            return per_layer[key]
    for pattern, cpg in per_layer.items():
        if _matches(short_name, path, [pattern]):
            return cpg
    return default


def _follow_chain(graph, node, conv):
    """Extend M to M->B->A while each output feeds exactly the next layer of the chain."""
    if conv.activation is not keras.activations.linear:
        return None, None
    bn_node = graph.sole_consumer(node)
    rank = len(node.outputs[0].shape)
    if bn_node is None or not is_plain_batch_norm(bn_node.operation, rank) \
            or graph.call_count(bn_node.operation) != 1:
        return None, None
    act_node = graph.sole_consumer(bn_node)
    if act_node is None or not is_elementwise_activation_layer(act_node.operation) \
            or graph.call_count(act_node.operation) != 1:
        return bn_node.operation, None
    return bn_node.operation, act_node.operation


def _fill_unchanged(entry, conv, node, trainable):
    """A skipped conv keeps its parameters and MACs; a converted one overwrites these."""
    entry.total_before = entry.total_after = count_weights(conv.weights)
    entry.trainable_before = entry.trainable_after = count_weights(conv.trainable_weights) if trainable else 0
    entry.macs_before = entry.macs_after = layer_macs(conv, node.input_tensors[0].shape, node.outputs[0].shape)


def _fill_entry(entry, chain, out_shape, groups, trainable):
    """Counts before from the chain's own weights, after from the new layers' descriptions."""
    c_in, filters = entry.in_channels, entry.filters
    step = filters // groups
    entry.converted = True
    entry.interleave_step = step if step > 1 else None
    entry.second_conv = c_in >= filters
    if chain.new_layer("k").channels_per_group:  # the 2022 variant: its own interleave and L rules
        interleave = chain.new_layer("interleave")
        entry.interleave_step = interleave.step if interleave is not None else None
        entry.second_conv = chain.new_layer("l") is not None
    entry.batch_norm = chain.bn.name if chain.bn is not None else None
    entry.activation_layer = chain.act.name if chain.act is not None else None
    entry.activation = _activation_name(chain)
    entry.dropped_settings = dropped_settings(chain.conv)
    old = [layer for layer in (chain.conv, chain.bn) if layer is not None]
    entry.total_before = sum(count_weights(layer.weights) for layer in old)
    entry.trainable_before = sum(count_weights(layer.trainable_weights) for layer in old) if trainable else 0
    sizes = [size for layer in chain.new_layers for size in layer.weight_sizes()]
    entry.total_after = sum(n for n, _ in sizes)
    entry.trainable_after = sum(n for n, train in sizes if train) if trainable else 0
    spatial = _spatial(out_shape)
    if spatial is not None:
        entry.macs_before = spatial * c_in * filters
        entry.macs_after = spatial * sum(chain.new_layer(role).kernel_size() for role in ("k", "l")
                                         if chain.new_layer(role) is not None)


def _activation_name(chain):
    if chain.act is not None:
        act = chain.act
        if isinstance(act, keras.layers.Activation):
            return _function_name(act.activation)
        return type(act).__name__
    if chain.conv.activation is not keras.activations.linear:
        return _function_name(chain.conv.activation)
    return None


def _function_name(fn):
    return fn if isinstance(fn, str) else keras.activations.serialize(fn)


def _spatial(shape):
    dims = shape[1:-1]
    if any(d is None for d in dims):
        return None
    n = 1
    for d in dims:
        n *= d
    return n


def _matches(short_name, path, patterns):
    return any(fnmatch.fnmatchcase(short_name, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def _plan_input_shape(model):
    shape = input_shape(model)
    return None if shape is None else list(shape)  # a list in the plan's JSON
