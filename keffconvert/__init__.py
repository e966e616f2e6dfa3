"""keffconvert: turn a Keras CNN's pointwise convolutions into kEffNet grouped convolutions."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keffconvert.convert import convert  # noqa: E402
from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels  # noqa: E402
from keffconvert.plan import LayerPlan, Plan  # noqa: E402

__version__ = "0.1.0"
__all__ = ["convert", "GroupedPointwiseConv2D", "InterleaveChannels", "LayerPlan", "Plan", "__version__"]
