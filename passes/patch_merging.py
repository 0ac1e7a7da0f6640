"""Patch merging and subsampling: low spatial digits gathered into channels, or one cell of each picked.

Two ways of writing patch merging are understood. (1) Views and permutes that move low spatial digits into the
last axis, followed by a norm or Linear over that axis (timm's Swin): the token-wise rule plans a
space-to-depth. (2) Strided slices ``x[:, 0::2, 1::2, :]`` concatenated along the channels
(torchvision's Swin): each slice picks one cell of every 2x2 neighbourhood. Either way this pass
inserts one gather of the neighbourhood of every visible coarse site, in the dense feature order.
A pick of the rows and the columns read by anything else is a subsampling (LeViT's queries): the picked cells
are the tokens of the ``f`` times coarser grid, gathered at its visible sites. A pick is a strided slice of a
whole spatial axis or a ``select`` of the lowest spatial digit (``x.view(B, H // 2, 2, W // 2, 2, C)[:, :, 0, :, 0]``).
The mask unit, a multiple of every grid's stride, is then a multiple of the coarse stride: a coarse cell is
visible exactly when its picked fine position is.
A ``cat`` along the channels of ordinary tokens is a column concatenation.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import Pick, Property, StridedMerge, Subsample, facts, peek
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, is_op, layout_of, replace_with_call, sites_node


def _spatial_axis(lay: Layout, dim: int) -> Optional[str]:
    ax = lay.axes[dim]
    if len(ax) == 1 and ax[0].kind in "hw" and ax[0].inner == 1 and ax[0].size == lay.grid["hw".index(ax[0].kind)]:
        return ax[0].kind
    return None


def _lowest_digit(lay: Layout, dim: int) -> Optional[str]:
    """The kind of the axis ``dim`` when it holds exactly the lowest digit of the rows or the columns."""
    ax = lay.axes[dim]
    return ax[0].kind if len(ax) == 1 and ax[0].kind in "hw" and ax[0].inner == 1 else None


def _picked(node: fx.Node, lay: Layout) -> Optional[Tuple[str, int, int, Layout]]:
    """``(kind, factor, offset, layout)`` when ``node`` keeps one cell of every ``factor`` rows (or columns): a
    strided slice of a whole spatial axis (``x[:, o::f]``) or a select of the lowest spatial digit
    (``x.view(B, H // f, f, ...)[:, :, o]``). The layout keeps the remaining digits at their fine place values."""
    a = args_of(node)
    dim = a["dim"] % len(lay.axes)
    if is_op(node, aten.slice):
        kind = _spatial_axis(lay, dim)
        if kind is None or a["step"] == 1:
            return None
        size = lay.shape[dim]
        start, stop, step = slice(a["start"], a["end"], a["step"]).indices(size)
        if size % step or start >= step or len(range(start, stop, step)) != size // step:
            raise LayoutError(
                f"strided slice {start}:{stop}:{step} of a spatial axis of size {size} is not one cell of every {step}"
            )
        axes = list(lay.axes)
        axes[dim] = (Atom(kind, size // step, step),)
        return kind, step, start, replace(lay, axes=tuple(axes))
    if is_op(node, aten.select):
        kind = _lowest_digit(lay, dim)
        if kind is None:
            return None
        size = lay.axes[dim][0].size
        return kind, size, a["index"] % size, replace(lay, axes=lay.axes[:dim] + lay.axes[dim + 1 :])
    return None


def _continues_pick(node: fx.Node) -> bool:
    """A user that reads a pick as one (a further spatial pick, or the concatenation of a space-to-depth)."""
    if is_op(node, aten.cat):
        return True
    if not is_op(node, aten.slice, aten.select):
        return False
    lay = layout_of(node.args[0])
    return lay is not None and _picked(node, lay) is not None


def coarse_layout(lay: Layout, factor: int) -> Layout:
    """The layout of picked cells (one of every ``factor`` rows and columns) on the ``factor`` times coarser grid."""
    if lay.offset != (0, 0) or lay.prefixed_axes() or any(lay.border):
        raise LayoutError("subsampling of rolled or padded tokens or of tokens that hold prefix tokens")
    axes = []
    for ax in lay.axes:
        for a in ax:
            if a.kind in "hw" and a.inner % factor:
                raise LayoutError(f"subsampling by {factor} of a layout whose digit {a} lies below the stride")
        axes.append(tuple(Atom(a.kind, a.size, a.inner // factor) if a.kind in "hw" else a for a in ax))
    grid = (lay.grid[0] // factor, lay.grid[1] // factor)
    return Layout(tuple(axes), grid, lay.stride * factor)


@rules.layout("strided-pick", priority=20)
def pick_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """A strided slice or lowest-digit select of the rows or columns: remember which cells it picks. Once rows and
    columns are both picked and the result is read by anything but a further pick or a concatenation, it is a
    subsampling: the picked cells form the coarser grid (``x[:, ::2, ::2]``, LeViT's subsampled queries)."""
    if not is_op(node, aten.slice, aten.select) or layout_of(node.args[0]) is None:
        return None
    src = node.args[0]
    prev: Optional[Pick] = peek(src).pick
    found = _picked(node, layout_of(src))
    if found is None:
        return None
    kind, step, start, lay = found
    factor, offset = dict(prev.factor) if prev else {}, dict(prev.offset) if prev else {}
    if kind in factor:
        raise LayoutError("two strided slices of the same spatial axis")
    factor[kind], offset[kind] = step, start
    pick = Pick(prev.src if prev else src, factor, offset)
    if len(factor) == 2 and not all(_continues_pick(u) for u in node.users):
        if factor["h"] != factor["w"]:
            raise LayoutError(f"subsampling by {factor['h']} rows and {factor['w']} columns: the grid has one stride")
        coarse = coarse_layout(lay, factor["h"])
        facts(node).subsample = Subsample(coarse, factor["h"], (offset["h"], offset["w"]))
        return coarse
    found = facts(node)
    found.pick = pick
    found.layout_op = True
    return lay


@rules.layout("cat", priority=100)
def cat_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """``cat`` along the channel axis: a space-to-depth of picks, or a column concatenation."""
    if not is_op(node, aten.cat):
        return None
    tensors, dim = node.args[0], args_of(node)["dim"]
    lays = [layout_of(t) for t in tensors]
    if any(lay is None for lay in lays):
        raise LayoutError("concatenation of image features with constants")
    dim %= len(lays[0].axes)
    picks = [peek(t).pick for t in tensors]
    if any(p is not None for p in picks):
        if any(p is None for p in picks) or len({p.src for p in picks}) != 1:
            raise LayoutError("concatenation of strided slices of different tensors")
        src = picks[0].src
        fine = layout_of(src)
        f = {p.factor.get("h", 1) for p in picks} | {p.factor.get("w", 1) for p in picks}
        if len(f) != 1 or lays[0].channel_axis() != dim or fine.offset != (0, 0):
            raise LayoutError("strided slices that are not a square space-to-depth along the channels")
        f = f.pop()
        offsets = [(p.offset.get("h", 0), p.offset.get("w", 0)) for p in picks]
        grid = (fine.grid[0] // f, fine.grid[1] // f)
        batch = fine.axes[0][0].size if fine.axes[0] else 1
        make = Layout.nhwc if dim == 3 else Layout.nchw
        coarse = make(batch, grid, fine.channels * len(picks), fine.stride * f)
        facts(node).strided_merge = StridedMerge(src, fine, coarse, (f, f), offsets)
        return coarse
    if any(lay.channel_axis() != dim for lay in lays):
        raise LayoutError(f"concatenation along axis {dim}, which is not the channel axis")
    base = lays[0]
    for lay in lays[1:]:
        if lay.with_channels(base.channels) != base:
            raise LayoutError("concatenation of tensors of different layouts")
    facts(node).channel_cat = True
    return base.with_channels(sum(lay.channels for lay in lays))


class PatchMergingPass(GreenPass):
    name = "patch-merging"
    description = "space-to-depth views or strided slices -> neighbour gather onto the coarser grid of visible sites"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.PATCH_MERGES})

    def run(self, gm: fx.GraphModule) -> None:
        done = {}
        for node in list(gm.graph.nodes):
            found = peek(node)
            if found.subsample is not None:
                self._subsample(gm, node)
                continue
            merge = found.strided_merge
            if merge is not None:
                src, fine, coarse, factor, offsets = merge
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(
                        ops.space_to_depth, (src, sites_node(gm, fine), sites_node(gm, coarse), factor, offsets, None)
                    )
                facts(new).layout = coarse
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                self.report[f"strided slices -> space-to-depth {factor[0]}x{factor[1]}"] += 1
                continue
            if found.channel_cat:
                node.target = aten.cat.default
                node.args = (node.args[0], 1)
                self.report["channel concatenation"] += 1
                continue
            plan = found.space_to_depth
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
                facts(done[src]).layout = coarse_lay
                self.report[f"space-to-depth {factor[0]}x{factor[1]}"] += 1
            node.replace_input_with(src, done[src])
        gm.graph.eliminate_dead_code()

    def _subsample(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """The picked cells of the fine tokens, gathered at the visible sites of the coarser grid."""
        coarse, factor, offset = peek(node).subsample
        src = node.args[0]
        while peek(src).pick is not None:  # the picks before this one, to the value they read
            src = src.args[0]
        fine, coarse_sites = sites_node(gm, layout_of(src)), sites_node(gm, coarse)
        replace_with_call(gm, node, ops.space_to_depth, (src, fine, coarse_sites, (factor, factor), [offset], None))
        self.report[f"subsampling {factor}x{factor}"] += 1
