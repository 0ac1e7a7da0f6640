"""Patch merging: gather low spatial digits into channels on the coarser grid.

Two ways of writing it are understood. (1) Views and permutes that move low spatial digits into the
last axis, followed by a norm or Linear over that axis (timm's Swin): the token-wise rule plans a
space-to-depth. (2) Strided slices ``x[:, 0::2, 1::2, :]`` concatenated along the channels
(torchvision's Swin): each slice picks one cell of every 2x2 neighbourhood. Either way this pass
inserts one gather of the neighbourhood of every visible coarse site, in the dense feature order.
A ``cat`` along the channels of ordinary tokens is a column concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch.fx as fx

from greenmim_convert import ops
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, args_of, aten, is_op, layout_of, sites_node


@dataclass(frozen=True)
class Pick:
    """A strided spatial slice of ``src``: every ``factor``-th row/col starting at ``offset``."""

    src: fx.Node
    factor: Dict[str, int] = field(hash=False)
    offset: Dict[str, int] = field(hash=False)


def _spatial_axis(lay: Layout, dim: int) -> Optional[str]:
    ax = lay.axes[dim]
    if len(ax) == 1 and ax[0].kind in "hw" and ax[0].inner == 1 and ax[0].size == lay.grid["hw".index(ax[0].kind)]:
        return ax[0].kind
    return None


def pick_rule(node: fx.Node) -> Optional[Layout]:
    """``slice`` with a step along a whole spatial axis: remember which cells it picks."""
    if not is_op(node, aten.slice):
        return None
    src = node.args[0]
    a = args_of(node)
    prev: Optional[Pick] = src.meta.get("pick")
    lay = layout_of(src)
    dim = a["dim"] % len(lay.axes)
    kind = _spatial_axis(lay, dim)
    if kind is None or a["step"] == 1:
        return None
    size = lay.shape[dim]
    start, stop, step = slice(a["start"], a["end"], a["step"]).indices(size)
    if size % step or start >= step or len(range(start, stop, step)) != size // step:
        raise LayoutError(f"strided slice {start}:{stop}:{step} of a spatial axis of size {size} is not one cell of every {step}")
    factor, offset = dict(prev.factor) if prev else {}, dict(prev.offset) if prev else {}
    if kind in factor:
        raise LayoutError("two strided slices of the same spatial axis")
    factor[kind], offset[kind] = step, start
    node.meta["pick"] = Pick(prev.src if prev else src, factor, offset)
    node.meta["layout_op"] = True
    return lay


def cat_rule(node: fx.Node) -> Optional[Layout]:
    """``cat`` along the channel axis: a space-to-depth of picks, or a column concatenation."""
    if not is_op(node, aten.cat):
        return None
    tensors, dim = node.args[0], args_of(node)["dim"]
    lays = [layout_of(t) for t in tensors]
    if any(lay is None for lay in lays):
        raise LayoutError("concatenation of image features with constants")
    dim %= len(lays[0].axes)
    picks = [t.meta.get("pick") for t in tensors]
    if any(p is not None for p in picks):
        if any(p is None for p in picks) or len({p.src for p in picks}) != 1:
            raise LayoutError("concatenation of strided slices of different tensors")
        src = picks[0].src
        fine = layout_of(src)
        f = {p.factor.get("h", 1) for p in picks} | {p.factor.get("w", 1) for p in picks}
        if len(f) != 1 or fine.channel_axis() != dim or fine.offset != (0, 0):
            raise LayoutError("strided slices that are not a square space-to-depth along the channels")
        f = f.pop()
        offsets = [(p.offset.get("h", 0), p.offset.get("w", 0)) for p in picks]
        grid = (fine.grid[0] // f, fine.grid[1] // f)
        batch = fine.axes[0][0].size if fine.axes[0] else 1
        make = Layout.nhwc if dim == 3 else Layout.nchw
        coarse = make(batch, grid, fine.channels * len(picks), fine.stride * f)
        node.meta["strided_merge"] = (src, fine, coarse, (f, f), offsets)
        return coarse
    if any(lay.channel_axis() != dim for lay in lays):
        raise LayoutError(f"concatenation along axis {dim}, which is not the channel axis")
    base = lays[0]
    for lay in lays[1:]:
        if lay.with_channels(base.channels) != base:
            raise LayoutError("concatenation of tensors of different layouts")
    node.meta["channel_cat"] = True
    return base.with_channels(sum(lay.channels for lay in lays))


class PatchMergingPass(GreenPass):
    name = "patch-merging"
    description = "space-to-depth views or strided slices -> neighbour gather onto the coarser grid of visible sites"

    def run(self, gm: fx.GraphModule) -> None:
        done = {}
        for node in list(gm.graph.nodes):
            merge = node.meta.get("strided_merge")
            if merge is not None:
                src, fine, coarse, factor, offsets = merge
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(ops.space_to_depth, (src, sites_node(gm, fine), sites_node(gm, coarse), factor, offsets, None))
                new.meta["layout"] = coarse
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                self.report[f"strided slices -> space-to-depth {factor[0]}x{factor[1]}"] += 1
                continue
            if node.meta.get("channel_cat"):
                node.target = aten.cat.default
                node.args = (node.args[0], 1)
                self.report["channel concatenation"] += 1
                continue
            plan = node.meta.get("space_to_depth")
            if plan is None:
                continue
            fine_lay, coarse_lay, factor, features = plan
            src = node.args[0]
            if src not in done:
                offsets = []
                for dh, dw, _ in features:
                    if (dh, dw) not in offsets:
                        offsets.append((dh, dw))
                order = [offsets.index((dh, dw)) * fine_lay.channels + c for dh, dw, c in features]
                index = None if order == list(range(len(order))) else tuple(order)
                fine, coarse = sites_node(gm, fine_lay), sites_node(gm, coarse_lay)
                with gm.graph.inserting_after(src):
                    done[src] = gm.graph.call_function(ops.space_to_depth, (src, fine, coarse, factor, offsets, index))
                done[src].meta["layout"] = coarse_lay
                self.report[f"space-to-depth {factor[0]}x{factor[1]}"] += 1
            node.replace_input_with(src, done[src])
        gm.graph.eliminate_dead_code()
