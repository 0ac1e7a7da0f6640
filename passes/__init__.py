"""The FX passes of greenmim-convert, in pipeline order (see ``pipeline``)."""
from .base import ConvertContext, GreenPass
from .channel_attention import CHANNEL_ATTENTION_TYPES, ChannelAttentionPass
from .channel_split import ChannelSplitPass
from .check import CheckPass
from .conv import ConvPass
from .global_attention import GlobalAttentionPass
from .inline_functions import InlineFunctionsPass
from .layout_analysis import LAYOUT_RULES, LayoutAnalysisPass, to_networkx
from .outputs import OutputsPass
from .patch_embed import PatchEmbedPass
from .patch_merging import PatchMergingPass
from .pooling import PoolingPass
from .specialize import SpecializePass
from .tokenwise import TokenwisePass
from .window_attention import ATTENTION_RULES, TOKEN_WINDOW_RULES, WindowAttentionPass
from .window_ops import WindowOpsPass

__all__ = [
    "ConvertContext", "GreenPass", "ChannelAttentionPass", "ChannelSplitPass", "CheckPass", "ConvPass", "GlobalAttentionPass", "InlineFunctionsPass", "LayoutAnalysisPass", "OutputsPass",
    "PatchEmbedPass", "PatchMergingPass", "PoolingPass", "SpecializePass", "TokenwisePass", "WindowAttentionPass",
    "WindowOpsPass", "LAYOUT_RULES", "ATTENTION_RULES", "TOKEN_WINDOW_RULES", "CHANNEL_ATTENTION_TYPES",
    "to_networkx",
]
