"""The passes of greenmim-convert over captured ATen graphs, in pipeline order (see ``convert.build_pipeline``)."""
from .attention import AttentionPass
from .base import ConvertContext, GreenPass
from .channel_split import ChannelSplitPass
from .check import CheckPass
from .conv import ConvPass
from .functionalize import FunctionalizePass
from .layout_analysis import LAYOUT_RULES, LayoutAnalysisPass, to_networkx
from .layout_ops import LayoutOpsPass
from .outputs import OutputsPass
from .patch_merging import PatchMergingPass
from .pooling import PoolingPass
from .recompute import RecomputePass
from .sample_matmul import SampleMatmulPass
from .tokenwise import TokenwisePass

__all__ = [
    "AttentionPass", "ConvertContext", "GreenPass", "ChannelSplitPass", "CheckPass", "ConvPass", "FunctionalizePass",
    "LayoutAnalysisPass", "LayoutOpsPass", "OutputsPass", "PatchMergingPass", "PoolingPass", "RecomputePass", "SampleMatmulPass", "TokenwisePass",
    "LAYOUT_RULES", "to_networkx",
]
