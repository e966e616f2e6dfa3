"""The two layers the kEffNet sub-architecture adds, written with `keras.ops` only.

`GroupedPointwiseConv2D` is a 1x1 convolution with `groups` independent groups. Its kernel has the
layout of `keras.layers.Conv2D(groups=g)`, `(1, 1, C/g, F)`, so weights move between the two
unchanged.

`InterleaveChannels` is K-CAI's channel shuffle: `interleave(x, step)` views the channels as
`(C/step, step)`, transposes to `(step, C/step)` and flattens. It keeps K-CAI's class name and
`step_size` config so kEffNets saved by K-CAI load here.

How the two run (the kernels), and why
--------------------------------------
Every way of computing a grouped 1x1 convolution gives the same numbers (tests/test_kernels.py);
they differ only in speed:

=============  ===============================================================================
name           what it runs
=============  ===============================================================================
``einsum``     ``einsum('ngc,gcf->ngf')`` over the groups
``matmul``     transpose to (g, N, C/g), batched matmul, transpose back
``blockdiag``  one dense (C, F) matmul with the block-diagonal kernel (g times the multiply-adds)
``broadcast``  multiply and sum over C/g
``conv``       ``ops.conv`` with the (1, 1, C/g, F) kernel, i.e. Conv2D(groups): slow on the CPU,
               its gradient most of all (METHOD.md)
``auto``       per layer, the rule below
=============  ===============================================================================

`python benchmarks/bench_kernels.py` times each of them on every grouped layer of a converted
EfficientNet-B0 (and each interleave on every InterleaveChannels layer), alternating them in one
process, for training at 32x32 and inference at 224x224; `--per-shape` times each layer shape
on its own. The script prints the full table (`--out` writes it as JSON) and README.md, "Speed",
quotes the headline ratios; no figure is copied here, where it would go stale. What they show on
the TensorFlow CPU backend, and why:

At these sizes the layers are memory-bound: the dense matmul's g-fold extra multiply-adds cost
less than the transposes ``matmul`` needs, until the dense kernel is large enough for the
matmul to be compute-bound. ``broadcast`` is a multiply and a sum, the cheapest when each group
has one output (the SE reduce convolutions). So ``auto`` picks, from the static channel counts
only (`choose_implementation`):

* F/g == 1                                  -> ``broadcast``
* C*F / (C+F) <= 100 (memory-bound matmul)  -> ``blockdiag``
* otherwise (the 7x7, 1152-channel layers)  -> ``matmul``

(In a whole-model training step, `benchmarks/bench_speed.py`, ``auto`` and ``blockdiag`` tie;
at 224x224 ``auto`` is the faster, ``matmul`` winning the 7x7 layers with 1152 channels. The
rule comes from the per-shape figures. On other backends the same rule runs; it was measured on
TensorFlow only.)

For the interleave, ``transpose`` (reshape, transpose, reshape) beats ``take`` (a gather with
the permutation) and, by far, K-CAI's strided slices plus concatenate, so it is the default.
The reshapes use static shapes `(-1, H, W, C)` whenever H and W are known: no shape-computing
ops in the graph, which TFLite needs to keep the layer inside its XNNPACK delegate.

Folding the interleave into the next layer's weights is exact when that layer mixes all
channels (a dense Conv2D or Dense: reorder its kernel's input rows) or is per-channel
(BatchNormalization, an element-wise activation, DepthwiseConv2D: reorder its per-channel
weights and move the interleave past it). It is NOT exact into the next grouped convolution L
as a grouped convolution: L's group j reads interleaved channels j*F/g .. (j+1)*F/g - 1, and
interleaved channel s*g + i is K's channel i*F/g + s, from K's group i = (s*g + i) mod g; so
L's group j reads from min(F/g, g) different groups of K, more than one whenever F/g > 1 and
g > 1 -- always, when an interleave is there at all. The permutation maps L's groups to groups only when F/g == 1 or g == 1. So the
training graph keeps the interleave as its own layer, and the inference export
(`keffconvert.export`) folds it into L or K by making them dense where their dense kernel is
small.

Saved files do not record the implementation: it is a runtime choice (`layer.implementation`,
default ``"auto"``), so files written before or after load and run the same.
"""

import keras
import numpy as np
from keras import ops

PACKAGE = "keffconvert"

GROUPED_IMPLEMENTATIONS = ("auto", "einsum", "matmul", "blockdiag", "broadcast", "conv")
# `blockdiag` while C*F / (C+F) -- the dense matmul's multiply-adds per value read or written,
# its arithmetic intensity -- is at most this: below it the dense matmul is memory-bound and its
# g-fold extra multiply-adds are free, above it `matmul`'s transposes cost less than they do.
DENSE_INTENSITY_LIMIT = 100
INTERLEAVE_IMPLEMENTATIONS = ("transpose", "take", "slices")


def choose_implementation(in_channels, filters, groups):
    """The kernel ``auto`` runs for a grouped 1x1 conv with these channel counts (see above)."""
    if filters // groups == 1:
        return "broadcast"
    if in_channels * filters <= DENSE_INTENSITY_LIMIT * (in_channels + filters):
        return "blockdiag"
    return "matmul"


def grouped_kernel(kernel, groups):
    """Conv2D(groups) kernel (1, 1, C/g, F) -> (g, C/g, F/g): group j's weights."""
    c_per_group, filters = kernel.shape[-2], kernel.shape[-1]
    k = ops.reshape(kernel, (c_per_group, groups, filters // groups))
    return ops.transpose(k, (1, 0, 2))


def block_diagonal_kernel(kernel, groups):
    """Conv2D(groups) kernel (1, 1, C/g, F) -> the equivalent dense (C, F) matrix.

    Row j*C/g + c, column j*F/g + f holds group j's weight (c, f); every other entry is 0. Built
    as tile-and-mask (not an einsum with an identity: TFLite's converter mis-lowers that one).
    """
    c_per_group, filters = kernel.shape[-2], kernel.shape[-1]
    k = ops.tile(ops.reshape(kernel, (c_per_group, filters)), (groups, 1))
    return k * ops.cast(_block_mask(c_per_group * groups, filters, groups), k.dtype)


def _block_mask(channels, filters, groups):
    rows = np.arange(channels)[:, None] // (channels // groups)
    cols = np.arange(filters)[None, :] // (filters // groups)
    return (rows == cols).astype("float32")


def grouped_pointwise(inputs, kernel, groups, implementation="auto"):
    """A grouped 1x1 convolution of `inputs` (..., C) with a (1, 1, C/g, F) kernel, no bias."""
    channels, filters = inputs.shape[-1], kernel.shape[-1]
    if implementation == "auto":
        implementation = choose_implementation(channels, filters, groups)
    kernel = ops.cast(kernel, inputs.dtype)
    if implementation == "conv":
        if len(inputs.shape) != 4:
            raise ValueError(f"implementation='conv' needs 4-D inputs. Received: shape={inputs.shape}")
        return ops.conv(inputs, kernel, strides=1, padding="valid")
    if implementation not in _GROUPED:
        raise ValueError(f"Unknown implementation {implementation!r}; expected one of {GROUPED_IMPLEMENTATIONS}")
    y = _GROUPED[implementation](ops.reshape(inputs, (-1, channels)), kernel, groups)
    return _restore_leading(y, inputs, filters)


def _restore_leading(y, inputs, channels):
    """Reshape rows back to `inputs`' leading dimensions with `channels` channels.

    With static spatial dimensions the target is `(-1, H, W, channels)`: no shape ops in the
    graph, which TFLite (XNNPACK) needs to keep the reshape and transpose in its delegate and
    which saves three tiny ops per layer on TensorFlow.
    """
    inner = tuple(inputs.shape[1:-1])
    if all(isinstance(d, int) for d in inner):
        return ops.reshape(y, (-1,) + inner + (channels,))
    return ops.reshape(y, tuple(ops.shape(inputs)[:-1]) + (channels,))


def _einsum(x, kernel, groups):
    rows = ops.reshape(x, (-1, groups, x.shape[-1] // groups))
    return ops.einsum("ngc,gcf->ngf", rows, grouped_kernel(kernel, groups))


def _matmul(x, kernel, groups):
    rows = ops.transpose(ops.reshape(x, (-1, groups, x.shape[-1] // groups)), (1, 0, 2))  # (g, N, C/g)
    y = ops.matmul(rows, grouped_kernel(kernel, groups))  # (g, N, F/g)
    return ops.transpose(y, (1, 0, 2))


def _blockdiag(x, kernel, groups):
    return ops.matmul(x, block_diagonal_kernel(kernel, groups))


def _broadcast(x, kernel, groups):
    rows = ops.reshape(x, (-1, groups, x.shape[-1] // groups, 1))
    return ops.sum(rows * grouped_kernel(kernel, groups), axis=2)  # (N, g, F/g)


_GROUPED = {"einsum": _einsum, "matmul": _matmul, "blockdiag": _blockdiag, "broadcast": _broadcast}


def interleave_permutation(channels, step):
    """Output channel o of `interleave(x, step)` is input channel `perm[o]`.

    When `step` does not divide the channels (the 2022 variant's step F // cpg), K-CAI's strided
    slices still define it: the slices just differ in length by one.
    """
    if channels % step:
        return np.concatenate([np.arange(s, channels, step) for s in range(step)])
    return np.arange(channels).reshape(channels // step, step).T.reshape(-1)


def interleave(inputs, step, implementation="transpose"):
    """K-CAI's channel shuffle: concatenate([x[..., s::step] for s in range(step)], axis=-1)."""
    channels = inputs.shape[-1]
    if channels % step:  # uneven slices (the 2022 variant): only the gather computes them
        return ops.take(inputs, interleave_permutation(channels, step), axis=-1)
    if implementation == "transpose":
        x = ops.reshape(inputs, (-1, channels // step, step))
        x = ops.transpose(x, (0, 2, 1))
        return _restore_leading(x, inputs, channels)
    if implementation == "take":
        return ops.take(inputs, interleave_permutation(channels, step), axis=-1)
    if implementation == "slices":
        return ops.concatenate([inputs[..., s::step] for s in range(step)], axis=-1)
    raise ValueError(f"Unknown implementation {implementation!r}; expected one of {INTERLEAVE_IMPLEMENTATIONS}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedPointwiseConv2D(keras.layers.Layer):
    """1x1 convolution whose input and output channels are split into `groups` blocks.

    Group j maps input channels `[j*C/g, (j+1)*C/g)` to output channels `[j*F/g, (j+1)*F/g)`;
    it has `C*F/g` weights instead of `C*F`. `implementation` (not saved; default ``"auto"``)
    picks the kernel, see the module docstring.
    """

    implementation = "auto"

    def __init__(
        self,
        filters,
        groups,
        use_bias=True,
        activation=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if filters % groups:
            raise ValueError(f"filters must be divisible by groups. Received: filters={filters}, groups={groups}")
        self.filters = int(filters)
        self.groups = int(groups)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ValueError(
                f"Input channels must be known and divisible by groups={self.groups}. "
                f"Received: input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(1, 1, channels // self.groups, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, constraint=self.bias_constraint,
            )
        else:
            self.bias = None

    def call(self, inputs):
        y = grouped_pointwise(inputs, self.kernel, self.groups, self.implementation)
        if self.use_bias:
            y = y + ops.cast(self.bias, y.dtype)
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            groups=self.groups,
            **_kernel_settings(self),
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class InterleaveChannels(keras.layers.Layer):
    """Channel shuffle: output channel `s*C/step + i` is input channel `i*step + s`.

    `implementation` (not saved; default ``"transpose"``) picks the kernel, see the module
    docstring.
    """

    implementation = "transpose"

    def __init__(self, step_size, **kwargs):
        super().__init__(**kwargs)
        self.step_size = int(step_size)

    def call(self, inputs):
        return interleave(inputs, self.step_size, self.implementation)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["step_size"] = self.step_size
        return config


def padded_groups(in_channels, filters, channels_per_group):
    """K-CAI `kGroupConv2D`'s grouping of a 1x1 conv (the 2022 variant): `(groups, local, extra)`.

    "groups = prev_layer_channel_count // channels_per_group", plus one when it does not divide,
    "the number of groups should never be bigger than the number of filters"; the input is padded
    "by copying the first" channels up to groups * local channels, local being cpg, or
    ceil(C / groups) when the cap on groups left fewer; "extra_filters = filters % groups" go to
    a second path with one filter per group. groups <= 1: a plain dense conv (local = C).
    """
    groups = min(-(-in_channels // channels_per_group), filters)
    if groups <= 1:
        return 1, in_channels, 0
    local = channels_per_group if groups * channels_per_group >= in_channels else -(-in_channels // groups)
    return groups, local, filters % groups


def padded_input_index(in_channels, filters, channels_per_group):
    """(local, F) array: the input channel that weight (i, f) of a PaddedGroupedPointwiseConv2D reads.

    Filter f < F - extra belongs to group f // ((F - extra) / groups), filter F - extra + j to
    group j (the one-filter path); group j reads padded channels j*local .. (j+1)*local - 1, and
    padded channel p is input channel p mod C (the copies of the first channels).
    """
    groups, local, extra = padded_groups(in_channels, filters, channels_per_group)
    main = filters - extra
    f = np.arange(filters)
    group = np.where(f < main, f // max(main // groups, 1), f - main)
    return (group[None, :] * local + np.arange(local)[:, None]) % in_channels


def padded_dense_kernel(kernel, in_channels, channels_per_group):
    """A PaddedGroupedPointwiseConv2D kernel (1, 1, local, F) as the dense (1, 1, C, F) kernel of
    the same convolution (a copied channel's weights add to the original channel's)."""
    kernel = np.asarray(kernel)
    filters = kernel.shape[-1]
    index = padded_input_index(in_channels, filters, channels_per_group)
    dense = np.zeros((in_channels, filters), kernel.dtype)
    np.add.at(dense, (index, np.broadcast_to(np.arange(filters), index.shape)), kernel[0, 0])
    return dense[None, None]


@keras.saving.register_keras_serializable(package=PACKAGE)
class PaddedGroupedPointwiseConv2D(keras.layers.Layer):
    """The 2022 variant's grouped 1x1 conv: cpg input channels per group whatever C and F are.

    K-CAI's `kGroupConv2D` (kernel 1x1) in one layer: the input is padded to groups * local
    channels by copying its first channels, the first F - extra filters form a grouped conv with
    `groups` groups, the `extra = F mod groups` others a second grouped conv with one filter per
    group over the first extra * local padded channels, and the two are concatenated (in that
    order). K-CAI puts a BN after each path; one BN over the concatenation is the same per-channel
    map with the same weights. The kernel is `(1, 1, local, F)`: column f holds filter f's weights
    (`padded_input_index` says which inputs they read); `padded_groups` gives groups, local, extra.
    """

    implementation = "auto"

    def __init__(self, filters, channels_per_group, use_bias=True, activation=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, kernel_constraint=None, bias_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.channels_per_group = int(channels_per_group)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"Input channels must be known. Received: input_shape={input_shape}")
        self.in_channels = int(channels)
        self.groups, self.local, self.extra = padded_groups(self.in_channels, self.filters, self.channels_per_group)
        padded = self.groups * self.local
        self._pad_index = None if padded == self.in_channels else np.arange(padded) % self.in_channels
        self.kernel = self.add_weight(
            name="kernel", shape=(1, 1, self.local, self.filters), initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer, constraint=self.kernel_constraint)
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, constraint=self.bias_constraint)
        else:
            self.bias = None

    def call(self, inputs):
        x = inputs if self._pad_index is None else ops.take(inputs, self._pad_index, axis=-1)
        kernel = ops.convert_to_tensor(self.kernel)
        main = self.filters - self.extra
        y = grouped_pointwise(x, kernel[..., :main], self.groups, self.implementation)
        if self.extra:
            side = grouped_pointwise(x[..., :self.extra * self.local], kernel[..., main:], self.extra,
                                     self.implementation)
            y = ops.concatenate([y, side], axis=-1)
        if self.use_bias:
            y = y + ops.cast(self.bias, y.dtype)
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            channels_per_group=self.channels_per_group,
            **_kernel_settings(self),
        )
        return config


def _kernel_settings(layer):
    """The config entries a grouped pointwise layer shares with Conv2D (bias, activation,
    initializers, regularizers, constraints), serialized."""
    return dict(
        use_bias=layer.use_bias,
        activation=keras.activations.serialize(layer.activation),
        kernel_initializer=keras.initializers.serialize(layer.kernel_initializer),
        bias_initializer=keras.initializers.serialize(layer.bias_initializer),
        kernel_regularizer=keras.regularizers.serialize(layer.kernel_regularizer),
        bias_regularizer=keras.regularizers.serialize(layer.bias_regularizer),
        kernel_constraint=keras.constraints.serialize(layer.kernel_constraint),
        bias_constraint=keras.constraints.serialize(layer.bias_constraint),
    )


def custom_objects():
    """Names under which saved files may refer to keffconvert's layers, K-CAI's included."""
    return {
        "InterleaveChannels": InterleaveChannels,
        "GroupedPointwiseConv2D": GroupedPointwiseConv2D,
        f"{PACKAGE}>InterleaveChannels": InterleaveChannels,
        f"{PACKAGE}>GroupedPointwiseConv2D": GroupedPointwiseConv2D,
        "PaddedGroupedPointwiseConv2D": PaddedGroupedPointwiseConv2D,
        f"{PACKAGE}>PaddedGroupedPointwiseConv2D": PaddedGroupedPointwiseConv2D,
    }
