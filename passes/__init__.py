"""The passes of greenmim-convert over captured ATen graphs, in pipeline order (see
``greenmim_convert.compiler.pipeline.build_pipeline``)."""

from .attention import AttentionPass
from .base import ConvertContext, GreenPass
from .canonicalize import CanonicalizePass
from .channel_split import ChannelSplitPass
from .check import CheckPass
from .conv import ConvPass
from .dense_island import DenseIslandPass
from .einsum import EinsumPass
from .functionalize import FunctionalizePass
from .grid_padding import GridPaddingPass
from .layout_analysis import LAYOUT_RULES, LayoutAnalysisPass, to_networkx
from .layout_ops import LayoutOpsPass
from .outputs import OutputsPass
from .patch_merging import PatchMergingPass
from .pooling import PoolingPass
from .position_einsum import PositionEinsumPass
from .prefix_tokens import PrefixTokensPass
from .recompute import RecomputePass
from .row_gather import RowGatherPass
from .sample_matmul import SampleMatmulPass
from .tokenwise import TokenwisePass

__all__ = [
    "AttentionPass",
    "CanonicalizePass",
    "ConvertContext",
    "GreenPass",
    "ChannelSplitPass",
    "CheckPass",
    "ConvPass",
    "DenseIslandPass",
    "EinsumPass",
    "FunctionalizePass",
    "GridPaddingPass",
    "LayoutAnalysisPass",
    "LayoutOpsPass",
    "OutputsPass",
    "PatchMergingPass",
    "PoolingPass",
    "PositionEinsumPass",
    "PrefixTokensPass",
    "RecomputePass",
    "RowGatherPass",
    "SampleMatmulPass",
    "TokenwisePass",
    "LAYOUT_RULES",
    "to_networkx",
]
