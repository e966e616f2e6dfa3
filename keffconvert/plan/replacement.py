"""What replaces one chain M[->B][->A]: a list of new-layer descriptions.

The plan counts parameters from these descriptions and the rewrite builds layers from the same
descriptions, so the two cannot disagree (a frozen batch norm gives a frozen B' in both). Each new
layer copies the settings of the layer it stands in for: its trainability, initialisers,
regularisers and constraints. What cannot be carried (M's activity regulariser: no single tensor
of the replacement is M's output) is named in `dropped_settings`.
"""

from dataclasses import dataclass

import keras

from keffconvert.layers.grouped import GroupedPointwiseConv2D, InterleaveChannels
from keffconvert.layers.padded import PaddedGroupedPointwiseConv2D, padded_groups

# Conv2D settings that K and L take over unchanged.
CARRIED_CONV_SETTINGS = ("kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer",
                         "kernel_constraint", "bias_constraint", "dtype")


@dataclass(frozen=True)
class NewLayer:
    """One layer of a replacement. `role` is k, k_bn, k_act, interleave, l, l_bn, l_act or sum."""

    role: str
    name: str
    source: keras.layers.Layer | None  # the original layer whose settings it copies
    in_channels: int = 0
    filters: int = 0
    groups: int = 1
    step: int = 0
    channels_per_group: int = 0  # > 0: a 2022-variant PaddedGroupedPointwiseConv2D at this cpg

    def kernel_size(self):
        """Weights in K's or L's kernel, which are also its multiply-accumulates per pixel."""
        if self.channels_per_group:
            _, local, _ = padded_groups(self.in_channels, self.filters, self.channels_per_group)
            return local * self.filters
        return self.in_channels * self.filters // self.groups

    @property
    def trainable(self):
        return self.source.trainable if self.source is not None else True

    def weight_sizes(self):
        """[(number of values, trainable)] for each weight the built layer will have."""
        if self.role in ("k", "l"):
            sizes = [(self.kernel_size(), self.trainable)]
            if self.source.use_bias:
                sizes.append((self.filters, self.trainable))
            return sizes
        if self.role in ("k_bn", "l_bn"):  # B' always has gamma and beta (rule 2)
            return [(self.filters, self.trainable)] * 2 + [(self.filters, False)] * 2
        return []

    def build(self):
        """The Keras layer this describes (unbuilt; the rewrite calls it on its input)."""
        if self.role in ("k", "l") and self.channels_per_group:
            config = self.source.get_config()
            layer = PaddedGroupedPointwiseConv2D(
                filters=self.filters, channels_per_group=self.channels_per_group, use_bias=self.source.use_bias,
                activation=config["activation"], name=self.name,
                **{key: config[key] for key in CARRIED_CONV_SETTINGS if key in config})
        elif self.role in ("k", "l"):
            config = self.source.get_config()
            layer = GroupedPointwiseConv2D(
                filters=self.filters, groups=self.groups, use_bias=self.source.use_bias,
                activation=config["activation"], name=self.name,
                **{key: config[key] for key in CARRIED_CONV_SETTINGS if key in config})
        elif self.role in ("k_bn", "l_bn"):
            config = self.source.get_config()
            config.update(name=self.name, center=True, scale=True)
            layer = keras.layers.BatchNormalization.from_config(config)
        elif self.role in ("k_act", "l_act"):
            config = self.source.get_config()
            config["name"] = self.name
            layer = self.source.__class__.from_config(config)
        elif self.role == "interleave":
            layer = InterleaveChannels(self.step, name=self.name)
        else:
            layer = keras.layers.Add(name=self.name)
        layer.trainable = self.trainable
        return layer


def describe(conv, bn, act, in_channels, groups):
    """The new layers that replace M[->B][->A] under METHOD.md's rules 2-4, in call order."""
    filters = conv.filters
    step = filters // groups
    grouped = dict(in_channels=in_channels, filters=filters, groups=groups)
    second = dict(grouped, in_channels=filters) if in_channels >= filters else None
    return _chain_layers(conv, bn, act, grouped, step if step > 1 else None, second)


def describe_padded(conv, bn, act, in_channels, decision, cpg):
    """The new layers of the 2022 variant (`keffconvert.variant2022`), in call order: the roles
    of `describe`, K and L being PaddedGroupedPointwiseConv2D layers."""
    filters = conv.filters
    k = dict(in_channels=in_channels, filters=filters, groups=decision.groups, channels_per_group=cpg)
    l = dict(in_channels=filters, filters=filters, groups=decision.second_groups, channels_per_group=cpg)
    if not decision.second_conv:  # no L: no interleave either (K-CAI), unlike 2021's expansions
        return _chain_layers(conv, bn, act, k, None, None)
    return _chain_layers(conv, bn, act, k, decision.step, l)


def _chain_layers(conv, bn, act, k, step, l):
    """K [-> B] [-> A] [-> interleave with `step`], then, when `l` (L's settings) is given,
    L [-> B''] [-> A''] and the sum: the roles both variants share."""
    filters = conv.filters
    layers = [NewLayer("k", f"{conv.name}_k", conv, **k)]
    if bn is not None:
        layers.append(NewLayer("k_bn", bn.name, bn, filters=filters))
    if act is not None:
        layers.append(NewLayer("k_act", act.name, act))
    if step:
        layers.append(NewLayer("interleave", f"{conv.name}_interleave", None, step=step))
    if l is None:
        return layers
    layers.append(NewLayer("l", f"{conv.name}_l", conv, **l))
    if bn is not None:
        layers.append(NewLayer("l_bn", f"{bn.name}_l", bn, filters=filters))
    if act is not None:
        layers.append(NewLayer("l_act", f"{act.name}_l", act))
    layers.append(NewLayer("sum", f"{conv.name}_sum", None))
    return layers


def dropped_settings(conv):
    """Settings of M that no new layer carries."""
    return ["activity_regularizer"] if conv.activity_regularizer is not None else []
