"""The 2022 variant's grouped 1x1 conv (`keffconvert.plan.variant2022`): no divisibility constraints."""

import keras
import numpy as np
from keras import ops

from keffconvert.layers.base import PACKAGE, PointwiseKernelLayer
from keffconvert.layers.kernels import grouped_pointwise


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
class PaddedGroupedPointwiseConv2D(PointwiseKernelLayer):
    """The 2022 variant's grouped 1x1 conv: cpg input channels per group whatever C and F are.

    K-CAI's `kGroupConv2D` (kernel 1x1) in one layer: the input is padded to groups * local
    channels by copying its first channels, the first F - extra filters form a grouped conv with
    `groups` groups, the `extra = F mod groups` others a second grouped conv with one filter per
    group over the first extra * local padded channels, and the two are concatenated (in that
    order). K-CAI puts a BN after each path; one BN over the concatenation is the same per-channel
    map with the same weights. The kernel is `(1, 1, local, F)`: column f holds filter f's weights
    (`padded_input_index` says which inputs they read); `padded_groups` gives groups, local, extra.
    The other arguments are `Conv2D`'s.
    """

    implementation = "auto"

    def __init__(self, filters, channels_per_group, **kwargs):
        super().__init__(filters, **kwargs)
        self.channels_per_group = int(channels_per_group)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"Input channels must be known. Received: input_shape={input_shape}")
        self.in_channels = int(channels)
        self.groups, self.local, self.extra = padded_groups(self.in_channels, self.filters, self.channels_per_group)
        padded = self.groups * self.local
        self._pad_index = None if padded == self.in_channels else np.arange(padded) % self.in_channels
        self.add_kernel_and_bias(self.local)

    def call(self, inputs):
        x = inputs if self._pad_index is None else ops.take(inputs, self._pad_index, axis=-1)
        kernel = ops.convert_to_tensor(self.kernel)
        main = self.filters - self.extra
        y = grouped_pointwise(x, kernel[..., :main], self.groups, self.implementation)
        if self.extra:
            side = grouped_pointwise(x[..., :self.extra * self.local], kernel[..., main:], self.extra,
                                     self.implementation)
            y = ops.concatenate([y, side], axis=-1)
        return self.finish(y)

    def get_config(self):
        return {**super().get_config(), "channels_per_group": self.channels_per_group}
