"""Patch merging and subsampling: low spatial digits gathered into channels, or one cell of each picked.

Two ways of writing patch merging are understood. (1) Views and permutes that move low spatial digits into the
last axis, followed by a norm or Linear over that axis (timm's Swin): the token-wise rule plans a
space-to-depth. (2) Strided slices ``x[:, 0::2, 1::2, :]`` concatenated along the channels
(torchvision's Swin): each slice picks one cell of every 2x2 neighbourhood. Either way this pass
inserts one gather of the neighbourhood of every visible coarse site, in the dense feature order.
A pick of the rows and the columns read by anything else is a subsampling (LeViT's queries): the picked cells
are the tokens of the ``f`` times coarser grid, gathered at its visible sites. A pick is a strided slice of a
whole spatial axis or a ``select`` of the lowest spatial digit (``x.view(B, H // 2, 2, W // 2, 2, C)[:, :, 0, :, 0]``).
A coarse cell is visible exactly when its picked fine position is. The pick keeps cells ``o, o + f, ...`` to the
end of the axis, whether or not ``f`` tiles it (every second cell of 7 is 4 cells). Where it tiles a grid of
mask-unit cells, the coarse grid is one too (its stride joins the minimal mask unit, so a picked cell lies in its
coarse cell's unit); where it does not, the coarse grid's sites are the fine sites the pick keeps (``PickedGrid``,
``planner.picked_sites``). A pick of a padded grid is a padded grid: picked padded positions stay padded positions.
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
from .base import GreenPass, PickedGrid, args_of, aten, context_of, is_op, layout_of, replace_with_call, sites_node


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
    strided slice of a whole spatial axis from a cell below the step to its end (``x[:, o::f]``, which keeps
    ``ceil((size - o) / f)`` cells whether or not ``f`` divides the size) or a select of the lowest spatial digit
    (``x.view(B, H // f, f, ...)[:, :, o]``). The layout keeps the remaining digits at their fine place values."""
    a = args_of(node)
    dim = a["dim"] % len(lay.axes)
    if is_op(node, aten.slice):
        kind = _spatial_axis(lay, dim)
        if kind is None or a["step"] == 1:
            return None
        size = lay.shape[dim]
        start, stop, step = slice(a["start"], a["end"], a["step"]).indices(size)
        kept = len(range(start, size, step))
        if start >= step or len(range(start, stop, step)) != kept:
            raise LayoutError(
                f"strided slice {start}:{stop}:{step} of a spatial axis of size {size} does not keep every cell "
                f"{start} + {step}k of the axis"
            )
        axes = list(lay.axes)
        axes[dim] = (Atom(kind, kept, step),)
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


def _picked_side(size: int, before: int, after: int, factor: int, offset: int) -> Tuple[int, int, int, int]:
    """One side of a pick of cells ``offset + factor * j`` of a grid side of ``size`` cells, ``before`` and ``after``
    of them padding: ``(cells, padded before, padded after, first)``, ``first`` the image cell the first picked
    image cell is."""
    picks = range(offset, size, factor)
    lead = len([p for p in picks if p < before])
    trail = len([p for p in picks if p >= size - after])
    if lead + trail == len(picks):
        raise LayoutError("a strided pick that keeps padded positions only")
    return len(picks), lead, trail, picks[lead] - before


def coarse_layout(lay: Layout, factor: int, offset: Tuple[int, int]) -> Tuple[Layout, Tuple[int, int]]:
    """The layout of picked cells (cell ``offset + factor * j`` of the rows and the columns) on their own grid, at
    ``factor`` times the stride, and the offset of the first picked image cell on the image's grid. Picked padded
    positions of a padded grid are padded positions of the picked one."""
    if lay.offset != (0, 0) or lay.prefixed_axes():
        raise LayoutError("subsampling of rolled tokens or of tokens that hold prefix tokens")
    axes = []
    for ax in lay.axes:
        for a in ax:
            if a.kind in "hw" and a.inner % factor:
                raise LayoutError(f"subsampling by {factor} of a layout whose digit {a} lies below the stride")
        axes.append(tuple(Atom(a.kind, a.size, a.inner // factor) if a.kind in "hw" else a for a in ax))
    (gh, th, bh, fh), (gw, tw, bw, fw) = (
        _picked_side(lay.grid[k], lay.border[2 * k], lay.border[2 * k + 1], factor, offset[k]) for k in (0, 1)
    )
    return Layout(tuple(axes), (gh, gw), lay.stride * factor, border=(th, bh, tw, bw)), (fh, fw)


def _record_picked_grid(gm: fx.GraphModule, fine: Layout, coarse: Layout, factor: int, first: Tuple[int, int]):
    """Remember how the picked image cells' grid reads its sites when the step does not tile the fine image grid
    (or that grid is a pick itself): as the fine sites it keeps. Where the step tiles a grid of mask-unit cells, a
    picked cell lies in the unit of its coarse cell, and the coarse grid's sites are read off the mask as usual."""
    ctx = context_of(gm)
    image, stride = fine.image_grid, fine.stride
    key = (coarse.image_grid, coarse.stride)
    if (image, stride) not in ctx.picked_grids and not (image[0] % factor or image[1] % factor):
        return
    picked = PickedGrid(Layout((), image, stride), (factor, factor), first)
    if ctx.picked_grids.setdefault(key, picked) != picked:
        raise LayoutError(f"two strided picks onto the {key[0]} grid at stride {key[1]} keep different cells")


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
        coarse, first = coarse_layout(lay, factor["h"], (offset["h"], offset["w"]))
        _record_picked_grid(gm, layout_of(pick.src), coarse, factor["h"], first)
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
        if any(g % f for g in fine.grid) or any(fine.border):
            raise LayoutError(
                f"strided slices of a {fine.grid} grid concatenated as a {f}x{f} space-to-depth: the "
                "step does not tile the grid, or it is padded"
            )
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
