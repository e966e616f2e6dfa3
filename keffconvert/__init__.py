"""keffconvert: turn a Keras CNN's pointwise convolutions into kEffNet grouped convolutions."""

from keffconvert._quiet import start_backend

start_backend()

from keffconvert.convert import convert  # noqa: E402
from keffconvert.layers import GroupedPointwiseConv2D, InterleaveChannels  # noqa: E402
from keffconvert.plan import LayerPlan, Plan  # noqa: E402

__version__ = "0.1.0"
__all__ = ["convert", "GroupedPointwiseConv2D", "InterleaveChannels", "LayerPlan", "Plan", "__version__"]
