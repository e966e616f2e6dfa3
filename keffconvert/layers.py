"""The two layers the kEffNet sub-architecture adds, written with `keras.ops` only.

`GroupedPointwiseConv2D` is a 1x1 convolution with `groups` independent groups. Its kernel has the
layout of `keras.layers.Conv2D(groups=g)`, `(1, 1, C/g, F)`, so weights move between the two
unchanged, but it runs as one batched matmul over the groups, which is much faster than the
grouped convolution's gradient on the CPU (see METHOD.md).

`InterleaveChannels` is K-CAI's channel shuffle: `interleave(x, step)` views the channels as
`(C/step, step)`, transposes to `(step, C/step)` and flattens. It keeps K-CAI's class name and
`step_size` config so kEffNets saved by K-CAI load here.
"""

import keras
from keras import ops

PACKAGE = "keffconvert"


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedPointwiseConv2D(keras.layers.Layer):
    """1x1 convolution whose input and output channels are split into `groups` blocks.

    Group j maps input channels `[j*C/g, (j+1)*C/g)` to output channels `[j*F/g, (j+1)*F/g)`;
    it has `C*F/g` weights instead of `C*F`.
    """

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
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )
        else:
            self.bias = None

    def call(self, inputs):
        g = self.groups
        c_per_group = inputs.shape[-1] // g
        f_per_group = self.filters // g
        # (1, 1, C/g, F) -> (g, C/g, F/g): group j's weights are columns j*F/g..(j+1)*F/g.
        kernel = ops.transpose(ops.reshape(self.kernel, (c_per_group, g, f_per_group)), (1, 0, 2))
        leading = ops.shape(inputs)[:-1]
        x = ops.reshape(inputs, (-1, g, c_per_group))
        y = ops.einsum("ngc,gcf->ngf", x, ops.cast(kernel, x.dtype))
        y = ops.reshape(y, tuple(leading) + (self.filters,))
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
            use_bias=self.use_bias,
            activation=keras.activations.serialize(self.activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class InterleaveChannels(keras.layers.Layer):
    """Channel shuffle: output channel `s*C/step + i` is input channel `i*step + s`."""

    def __init__(self, step_size, **kwargs):
        super().__init__(**kwargs)
        self.step_size = int(step_size)

    def call(self, inputs):
        channels = inputs.shape[-1]
        step = self.step_size
        if channels % step:
            raise ValueError(f"Channels ({channels}) must be divisible by step_size={step}.")
        leading = ops.shape(inputs)[:-1]
        x = ops.reshape(inputs, (-1, channels // step, step))
        x = ops.transpose(x, (0, 2, 1))
        return ops.reshape(x, tuple(leading) + (channels,))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["step_size"] = self.step_size
        return config


def custom_objects():
    """Names under which saved files may refer to keffconvert's layers, K-CAI's included."""
    return {
        "InterleaveChannels": InterleaveChannels,
        "GroupedPointwiseConv2D": GroupedPointwiseConv2D,
        f"{PACKAGE}>InterleaveChannels": InterleaveChannels,
        f"{PACKAGE}>GroupedPointwiseConv2D": GroupedPointwiseConv2D,
    }
