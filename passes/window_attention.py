"""Window attention -> Group Window Attention over packed visible tokens.

The attention module's input layout says which digits index windows (batch axis) and which index
positions inside a window (token axis); the roll offset is the shift. The visible tokens of every
(sample, window) are packed into groups once per (grid, window, shift) and every block of the stage
shares that grouping. timm's shifted-window mask buffer is checked against the seam split the
grouping implements, so a model with any other mask is refused rather than silently changed.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn
from timm.models.davit import WindowAttention as DaVitWindowAttention
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention as SwinV2CrWindowAttention
from timm.models.twins import LocallyGroupedAttn

from greenmim_convert import ops
from greenmim_convert.kernels.windows import WindowSpec, window_segments
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, context_of, layout_of, module_ref, replace_with_call, sites_node

# module type -> (runtime op, name of the additive-mask argument)
ATTENTION_RULES: Dict[Type[nn.Module], Tuple[Callable, Optional[str]]] = {
    SwinWindowAttention: (ops.swin_window_attention, "mask"),
    SwinV2WindowAttention: (ops.swinv2_window_attention, "mask"),
    SwinV2CrWindowAttention: (ops.swinv2cr_window_attention, "mask"),
    DaVitWindowAttention: (ops.davit_window_attention, None),
}


# module type -> (runtime op, window size of the module): attention over windows of a token-grid input
TOKEN_WINDOW_RULES: Dict[Type[nn.Module], Tuple[Callable, Callable[[nn.Module], Tuple[int, int]]]] = {
    LocallyGroupedAttn: (ops.twins_window_attention, lambda m: (m.ws, m.ws)),
}


def token_window_spec(mod: nn.Module, lay: Layout) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(window, shift) of a module that windows a raster-ordered token grid itself."""
    kinds = [a.kind for ax in lay.axes for a in ax]
    if kinds != ["b", "h", "w", "c"] or lay.offset != (0, 0) or not lay.channel_last():
        raise LayoutError(f"{type(mod).__name__} input is not raster-ordered tokens")
    window = TOKEN_WINDOW_RULES[type(mod)][1](mod)
    if lay.grid[0] % window[0] or lay.grid[1] % window[1]:
        raise LayoutError(f"window {window} does not divide the grid {lay.grid} (the dense model would pad with keys)")
    return window, (0, 0)


def window_spec_of(lay: Layout) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(window, shift) of a ``(windows, tokens, channels)`` layout, or LayoutError."""
    if len(lay.axes) != 3 or lay.kinds(2) != {"c"} or not lay.channel_last():
        raise LayoutError(f"window attention input is not (windows, tokens, channels): {lay.shape}")
    tok = lay.atoms(1)
    if [a.kind for a in tok] != ["h", "w"] or any(a.inner != 1 for a in tok):
        raise LayoutError("window tokens are not (row, col) low digits in raster order")
    window = (tok[0].size, tok[1].size)
    outer = lay.atoms(0)
    kinds = [a.kind for a in outer]
    if len(set(kinds)) != len(kinds) or kinds != sorted(kinds, key="bhw".index):
        raise LayoutError("windows are not ordered (sample, window row, window col)")
    for a in outer:
        if a.kind in "hw":
            win = window[0] if a.kind == "h" else window[1]
            if a.inner != win:
                raise LayoutError("window index digits do not sit directly above the in-window digits")
    return window, lay.offset


def _expected_mask(grid, window, shift) -> torch.Tensor:
    """Which pairs of a dense sample's windows may attend, as timm's rolled partition orders them."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1)
    seg, _, _ = window_segments(torch.zeros(h * w, dtype=torch.long), coords, grid, 1, WindowSpec(window, shift, True))
    seg = seg.view(h, w).roll((-shift[0], -shift[1]), (0, 1))
    seg = seg.view(h // window[0], window[0], w // window[1], window[1]).permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    return seg[:, :, None] == seg[:, None, :]


def check_mask_buffer(mask: torch.Tensor, grid, window, shift) -> bool:
    """True when ``mask`` is the shifted-window mask: 0 inside a seam region, very negative across."""
    expected = _expected_mask(grid, window, shift)
    if tuple(mask.shape) != tuple(expected.shape):
        return False
    m = mask.detach().cpu()
    return bool(((m == 0) == expected).all()) and bool((m[~expected] <= -50).all())


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    lay = layout_of(node.args[0])
    if lay is None or type(mod) not in ATTENTION_RULES and type(mod) not in TOKEN_WINDOW_RULES:
        return None
    if type(mod) in TOKEN_WINDOW_RULES:
        token_window_spec(mod, lay)
    else:
        window_spec_of(lay)
    return lay


class WindowAttentionPass(GreenPass):
    name = "window-attention"
    description = "window attention -> group window attention on packed visible tokens"

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or "layout" not in node.meta:
                continue
            mod = gm.get_submodule(node.target)
            lay = layout_of(node.args[0])
            if type(mod) in TOKEN_WINDOW_RULES:
                fn, mask = TOKEN_WINDOW_RULES[type(mod)][0], None
                window, shift = token_window_spec(mod, lay)
            elif type(mod) in ATTENTION_RULES:
                fn, mask_arg = ATTENTION_RULES[type(mod)]
                window, shift = window_spec_of(lay)
                mask = node.kwargs.get(mask_arg) if mask_arg else None
                if mask is None and len(node.args) > 1:
                    mask = node.args[1]
            else:
                continue
            split_seam = False
            if mask is not None:
                if not (isinstance(mask, fx.Node) and mask.op == "get_attr" and "layout" not in mask.meta):
                    self.fail(node, "attention mask is computed from the input; only timm's constant shifted-window mask is supported")
                buf = gm.get_buffer(mask.target)
                if not check_mask_buffer(buf, lay.grid, window, shift):
                    self.fail(node, "attention mask is not the shifted-window mask for this window and shift")
                split_seam = True
            key = (lay.grid, lay.stride, window, shift, split_seam)
            if key not in ctx.grouping_nodes:
                sites = sites_node(gm, lay)
                with gm.graph.inserting_after(sites):
                    ctx.grouping_nodes[key] = gm.graph.call_function(
                        ops.window_grouping, (sites, window, shift, split_seam, ctx.grouping)
                    )
                self.report["groupings (stage, shift)"] += 1
            ref = module_ref(gm, node.target, node)
            replace_with_call(gm, node, fn, (node.args[0], ctx.grouping_nodes[key], ref, ctx.attention_backend))
            self.report[type(mod).__name__] += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()

