"""The two layers the kEffNet sub-architecture adds, written with `keras.ops` only.

`GroupedPointwiseConv2D` is a 1x1 convolution with `groups` independent groups. Its kernel has the
layout of `keras.layers.Conv2D(groups=g)`, `(1, 1, C/g, F)`, so weights move between the two
unchanged.

`InterleaveChannels` is K-CAI's channel shuffle: `interleave(x, step)` views the channels as
`(C/step, step)`, transposes to `(step, C/step)` and flattens. It keeps K-CAI's class name and
`step_size` config so kEffNets saved by K-CAI load here.

How either runs is `keffconvert.layers.kernels`; saved files do not record it (it is a runtime
choice, `layer.implementation`), so files written before or after load and run the same.
"""

import keras

from keffconvert.layers.base import PACKAGE, PointwiseKernelLayer
from keffconvert.layers.kernels import grouped_pointwise, interleave


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedPointwiseConv2D(PointwiseKernelLayer):
    """1x1 convolution whose input and output channels are split into `groups` blocks.

    Group j maps input channels `[j*C/g, (j+1)*C/g)` to output channels `[j*F/g, (j+1)*F/g)`;
    it has `C*F/g` weights instead of `C*F`. `implementation` (not saved; default ``"auto"``)
    picks the kernel (`keffconvert.layers.kernels`). The other arguments are `Conv2D`'s.
    """

    implementation = "auto"

    def __init__(self, filters, groups, **kwargs):
        if filters % groups:
            raise ValueError(f"filters must be divisible by groups. Received: filters={filters}, groups={groups}")
        super().__init__(filters, **kwargs)
        self.groups = int(groups)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ValueError(
                f"Input channels must be known and divisible by groups={self.groups}. "
                f"Received: input_shape={input_shape}"
            )
        self.add_kernel_and_bias(channels // self.groups)

    def call(self, inputs):
        return self.finish(grouped_pointwise(inputs, self.kernel, self.groups, self.implementation))

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


@keras.saving.register_keras_serializable(package=PACKAGE)
class InterleaveChannels(keras.layers.Layer):
    """Channel shuffle: output channel `s*C/step + i` is input channel `i*step + s`.

    `implementation` (not saved; default ``"transpose"``) picks the kernel
    (`keffconvert.layers.kernels`).
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
