"""The layers the kEffNet sub-architecture adds, registered with Keras for serialization.

* `GroupedPointwiseConv2D` and `InterleaveChannels` (`grouped`): the paper's two layers;
* `PaddedGroupedPointwiseConv2D` (`padded`): the 2022 variant's grouped conv;
* `kernels`: how they are computed (`grouped_pointwise`, `interleave`, `choose_implementation`).

Importing this package registers them (`keras.models.load_model` then reads converted files).
"""

from keffconvert.layers.base import PACKAGE
from keffconvert.layers.grouped import GroupedPointwiseConv2D, InterleaveChannels
from keffconvert.layers.kernels import (block_diagonal_kernel, choose_implementation, grouped_kernel,
                                        grouped_pointwise, interleave, interleave_permutation)
from keffconvert.layers.padded import (PaddedGroupedPointwiseConv2D, padded_dense_kernel, padded_groups,
                                       padded_input_index)

__all__ = ["GroupedPointwiseConv2D", "InterleaveChannels", "PaddedGroupedPointwiseConv2D", "block_diagonal_kernel",
           "choose_implementation", "custom_objects", "grouped_kernel", "grouped_pointwise", "interleave",
           "interleave_permutation", "padded_dense_kernel", "padded_groups", "padded_input_index"]


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
