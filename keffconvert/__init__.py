"""keffconvert: turn a Keras CNN's pointwise convolutions into kEffNet grouped convolutions."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GroupedPointwiseConv2D", "InterleaveChannels", "__version__"]
