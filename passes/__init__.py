"""The FX passes of greenmim-convert, in pipeline order (see ``pipeline``)."""
from .base import ConvertContext, GreenPass
from .check import CheckPass
from .conv import ConvPass
from .inline_functions import InlineFunctionsPass
from .layout_analysis import LAYOUT_RULES, LayoutAnalysisPass, to_networkx
from .outputs import OutputsPass
from .patch_embed import PatchEmbedPass
from .patch_merging import PatchMergingPass
from .specialize import SpecializePass
from .tokenwise import TokenwisePass
from .window_attention import ATTENTION_RULES, WindowAttentionPass
from .window_ops import WindowOpsPass

__all__ = [
    "ConvertContext", "GreenPass", "CheckPass", "ConvPass", "InlineFunctionsPass", "LayoutAnalysisPass", "OutputsPass",
    "PatchEmbedPass", "PatchMergingPass", "SpecializePass", "TokenwisePass", "WindowAttentionPass",
    "WindowOpsPass", "LAYOUT_RULES", "ATTENTION_RULES", "to_networkx",
]
