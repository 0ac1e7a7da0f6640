"""Channel attention (DaViT) -> per-sample channel attention over the visible tokens.

DaViT's ``ChannelAttention`` lets channels attend to channels: its ``(head_dim, head_dim)`` logits
are sums over all tokens of a sample. Under masked-dense semantics a masked token is absent, so the
sums run over the sample's visible tokens only; ``ChannelAttentionV2``'s dynamic scale ``N ** -0.5``
uses that sample's visible count N. The rest of the module (qkv, proj) is token-wise.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
from timm.models.davit import ChannelAttention, ChannelAttentionV2

from greenmim_convert import ops
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, layout_of, module_ref, replace_with_call, sites_node

CHANNEL_ATTENTION_TYPES = (ChannelAttention, ChannelAttentionV2)


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), CHANNEL_ATTENTION_TYPES):
        return None
    lay = layout_of(node.args[0])
    if lay is None:
        return None
    if len(lay.axes) != 3 or not lay.is_canonical_tokens():
        raise LayoutError(f"channel attention input is not (batch, raster tokens, channels): {lay.shape}")
    return lay


class ChannelAttentionPass(GreenPass):
    name = "channel-attention"
    description = "channel attention -> per-sample sums over visible tokens"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or "layout" not in node.meta:
                continue
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, CHANNEL_ATTENTION_TYPES):
                continue
            sites = sites_node(gm, layout_of(node.args[0]))
            ref = module_ref(gm, node.target, node)
            replace_with_call(gm, node, ops.channel_attention, (node.args[0], sites, ref))
            self.report[type(mod).__name__] += 1
        gm.recompile()
