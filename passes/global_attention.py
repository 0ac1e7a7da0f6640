"""Global (and spatially reduced) attention -> per-sample attention over the visible tokens.

PVT-style attention calls ``F.scaled_dot_product_attention`` on ``(B, heads, N, head_dim)`` tensors
whose token axis spans a whole grid: queries on the stage grid, keys and values on the same grid
or on a reduced one (after a kernel == stride convolution or pooling). Under masked-dense semantics
every query of a sample attends to the visible keys of that sample; masked keys are removed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.fx as fx
import torch.nn.functional as F

from greenmim_convert import ops
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, layout_of, replace_with_call, sites_node


def heads_and_dim(lay: Layout, role: str) -> Tuple[int, int]:
    """(heads, head_dim) of a ``(B, heads, N, head_dim)`` layout whose tokens span its whole grid."""
    if len(lay.axes) != 4 or lay.offset != (0, 0):
        raise LayoutError(f"{role} of attention is not (batch, heads, tokens, head_dim): {lay.shape}")
    b, h, tok, d = lay.axes
    if any(a.kind != "b" for a in b) or any(a.kind != "c" for a in h) or [a.kind for a in d] != ["c"] or d[0].inner != 1:
        raise LayoutError(f"{role} of attention is not (batch, heads, tokens, head_dim)")
    spatial = [(a.kind, a.size, a.inner) for a in tok]
    full = [(k, n, 1) for k, n in zip("hw", lay.grid) if n > 1]
    if spatial != full:
        raise LayoutError(f"{role} tokens do not span the whole grid in raster order (global attention)")
    heads = h[0].size if h else 1
    if h and h[0].inner != d[0].size:
        raise LayoutError(f"{role} heads are not the major channel digit")
    return heads, d[0].size


def _qkv(node: fx.Node):
    names = ("query", "key", "value")
    return [node.args[i] if len(node.args) > i else node.kwargs[n] for i, n in enumerate(names)]


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    q, k, v = _qkv(node)
    lays = [layout_of(t) for t in (q, k, v)]
    if any(lay is None for lay in lays):
        raise LayoutError("attention between image features and constants")
    if node.kwargs.get("attn_mask") is not None or node.kwargs.get("is_causal") or len(node.args) > 3:
        raise LayoutError("attention with an explicit mask or causal flag")
    (hq, dq), (hk, dk), (hv, dv) = (heads_and_dim(lay, r) for lay, r in zip(lays, ("query", "key", "value")))
    if not (hq == hk == hv and dq == dk) or lays[1].grid != lays[2].grid:
        raise LayoutError("query, key and value heads or grids disagree")
    return lays[0]


class GlobalAttentionPass(GreenPass):
    name = "global-attention"
    description = "global / spatially reduced attention -> per-sample attention over visible tokens"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not F.scaled_dot_product_attention or "layout" not in node.meta:
                continue
            q, k, v = _qkv(node)
            heads, _ = heads_and_dim(layout_of(q), "query")
            qs, ks = sites_node(gm, layout_of(q)), sites_node(gm, layout_of(k))
            scale = node.kwargs.get("scale")
            drop = node.kwargs.get("dropout_p", 0.0)
            replace_with_call(gm, node, ops.global_attention, (q, qs, k, ks, v, heads, scale, drop))
            same = layout_of(q).grid == layout_of(k).grid
            self.report["global attention" if same else "reduced-key attention"] += 1
        gm.recompile()
