"""Padded grids: a constant pad of the rows and columns of a token map, and the crop back to the image.

Window attention on a grid its window does not divide (MaskFormer Swin, ViTDet, SAM) pads the token
map, usually with zeros after a norm, runs on the padded grid, and crops the result back. The padded
positions are not masked positions: they are constant tokens of the source model, which its attention
reads as keys (their keys and values are the projection biases) whatever the mask. So:

- ``pad`` (``constant_pad_nd``) of whole row or column axes by ``n >= 0`` positions gives a layout on the
  padded grid with a ``border``: its sites are the visible sites of the image's positions plus every
  padded position of every sample, always present, holding the pad value (``planner.padded_sites``);
- token-wise ops, views, rolls of the whole padded grid and window attention then run on those sites
  unchanged: windows group the visible positions with the padded ones, only hidden image positions are
  missing from the keys;
- ``slice`` of a whole row or column axis of a padded layout that removes padded positions only (the crop)
  keeps the remaining border; back to a zero border the layout is the image's again.

Why padded positions are sites rather than keys added inside attention: whatever runs between the pad
and the crop (the norm or qkv projection that gives them their keys, rolls, position terms, a per-sample
statistic) then runs on them as the source model runs it, with no rule of its own; the price is that they
are queries too, whose outputs the crop drops (at most a window's width of rows and columns per grid).

Pads and crops become one row move between the two sets of sites (``ops.move_rows``, a partial
permutation whose backward is a gather). Pooling by ``s`` maps a padded grid onto a padded grid: when the border
and the image's positions come in whole cells of ``s``, the pooled grid's border is the border divided by ``s``
(``pooled_border``), its padded positions are present whatever the mask and pool the present positions of their
windows (SAM 2 pools queries in windows of its padded grid onto a padded coarser grid, cropped after attention).
Nothing else changes the grid of a padded value: convolutions and patch merging of a padded grid, and a pooled
cell that would hold image and padded positions together, are refused (``check_kept``), as are pads of rolled
tokens, of channels, of tokens holding a class token, and crops of image positions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import GridMove, Property, facts, peek
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, is_op, layout_of, replace_with_call, sites_node

SIDES = {"h": (0, 1), "w": (2, 3)}  # the border entries (before, after) of rows and of columns


def _whole_axis(lay: Layout, dim: int) -> Optional[str]:
    """``h`` or ``w`` when axis ``dim`` holds exactly one whole side of the grid, else None."""
    ax = lay.axes[dim]
    if len(ax) == 1 and ax[0].kind in "hw" and ax[0].inner == 1 and ax[0].size == lay.grid["hw".index(ax[0].kind)]:
        return ax[0].kind
    return None


def _resized(lay: Layout, dim: int, kind: str, before: int, after: int) -> Layout:
    """``lay`` with ``before`` and ``after`` positions added to (or, negative, removed from) the border of axis
    ``dim``, which holds the whole ``kind`` side of the grid."""
    axes, grid, border = list(lay.axes), list(lay.grid), list(lay.border)
    k = "hw".index(kind)
    grid[k] += before + after
    lo, hi = SIDES[kind]
    border[lo] += before
    border[hi] += after
    axes[dim] = (Atom(kind, grid[k]),)
    return replace(lay, axes=tuple(axes), grid=(grid[0], grid[1]), border=tuple(border))


def _pad_rule(node: fx.Node, lay: Layout) -> Layout:
    a = args_of(node)
    if is_op(node, aten.pad) and (a.get("mode") or "constant") != "constant":
        raise LayoutError(f"{a['mode']} pad of image features (its padded values are image values)")
    if lay.is_pair() or lay.is_per_sample():
        raise LayoutError("pad of attention logits or of per-sample values")
    pads: List[int] = list(a["pad"])
    shift, out = [0, 0], lay
    for i in range(0, len(pads), 2):
        before, after = pads[i], pads[i + 1]
        if not (before or after):
            continue
        dim = len(lay.axes) - 1 - i // 2
        kind = _whole_axis(lay, dim)
        if kind is None:
            raise LayoutError(f"pad of axis {dim} of layout {lay.shape}, which is not one whole side of the grid")
        if min(before, after) < 0:
            raise LayoutError("pad by a negative amount (a crop) of a grid")
        if lay.offset["hw".index(kind)]:
            raise LayoutError("pad of rolled tokens")
        shift["hw".index(kind)] = before
        out = _resized(out, dim, kind, before, after)
    facts(node).grid_move = GridMove(tuple(shift), float(a.get("value") or 0.0))
    return out


def _crop_rule(node: fx.Node, lay: Layout) -> Optional[Layout]:
    a = args_of(node)
    dim = a["dim"] % len(lay.axes)
    kind = _whole_axis(lay, dim)
    if kind is None:
        return None
    size = lay.shape[dim]
    start, stop, step = slice(a["start"], a["end"], a["step"]).indices(size)
    lo, hi = (lay.border[i] for i in SIDES[kind])
    if step != 1 or start > lo or stop < size - hi or stop <= start:
        raise LayoutError(
            f"slice {start}:{stop}:{step} of a grid side of {size} positions, {lo} before and {hi} after "
            "the image padded, that does not remove padded positions only"
        )
    if lay.offset["hw".index(kind)]:
        raise LayoutError("crop of rolled tokens")
    shift = [0, 0]
    shift["hw".index(kind)] = -start
    facts(node).grid_move = GridMove(tuple(shift), 0.0)
    return _resized(lay, dim, kind, -start, stop - size)


@rules.layout("grid-padding", priority=40)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """Layout of a constant pad of grid sides (not absorbed by a convolution), or of a slice of a padded grid side
    that crops padded positions; None for other nodes."""
    lay = layout_of(node.args[0]) if node.op == "call_function" and node.args else None
    if lay is None:
        return None
    if is_op(node, aten.pad, aten.constant_pad_nd):
        return _pad_rule(node, lay)
    if is_op(node, aten.slice) and any(lay.border) and not lay.is_pair():
        return _crop_rule(node, lay)
    return None


def pooled_border(lay: Layout, factor: int) -> Tuple[int, int, int, int]:
    """The border of ``lay``'s grid pooled by ``factor`` (cell ``j`` of the pooled grid stands for cells
    ``factor * j`` to ``factor * j + factor - 1``): whole cells of padded positions are its padded positions.
    Raises when a cell would mix image and padded positions, which no mask unit of the pooled grid describes."""
    if not any(lay.border) or factor == 1:
        return lay.border
    if any(b % factor for b in lay.border) or any(n % factor for n in lay.image_grid):
        raise LayoutError(
            f"pooling by {factor} of a grid padded by {lay.border} around {lay.image_grid} image positions: "
            "a pooled cell would hold image and padded positions together"
        )
    top, bottom, left, right = lay.border
    return top // factor, bottom // factor, left // factor, right // factor


def check_kept(node: fx.Node, out: Layout) -> None:
    """Raise unless every padded input of ``node`` keeps its grid and border in ``out``, or pools them onto a grid
    whose border is its own pooled (``pooled_border``), or ``out`` is one value per sample: no rule maps padded
    positions onto another grid without saying where they go."""
    if out.is_per_sample():
        return
    for arg in node.all_input_nodes:
        lay = layout_of(arg)
        if lay is None or not any(lay.border) or lay.is_per_sample():
            continue
        if (lay.grid, lay.stride, lay.border) == (out.grid, out.stride, out.border) or pooled_onto(lay, out):
            continue
        raise LayoutError(
            f"{getattr(node.target, '__name__', node.target)} of a padded grid onto another grid "
            "(padded positions are supported in token-wise ops, window attention and pooling, then cropped)"
        )


def pooled_onto(fine: Layout, coarse: Layout) -> bool:
    """Whether ``coarse``'s grid is ``fine``'s pooled by their stride ratio, its border ``fine``'s pooled: the padded
    positions of the two grids stand for each other (pooled queries of padded windows and their keys)."""
    factor = coarse.stride // fine.stride
    if factor < 1 or coarse.stride != fine.stride * factor or fine.grid != tuple(n * factor for n in coarse.grid):
        return False
    try:
        return coarse.border == pooled_border(fine, factor)
    except LayoutError:
        return False


class GridPaddingPass(GreenPass):
    name = "grid-padding"
    description = "pads of the grid and crops of the padding -> rows moved between the visible and padded sites"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.GRID_PADDING})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            move = peek(node).grid_move
            if move is None or layout_of(node) is None:
                continue
            shift, fill = move
            src = node.args[0]
            what = "pad -> padded sites" if is_op(node, aten.pad, aten.constant_pad_nd) else "crop of the padding"
            args = (src, sites_node(gm, layout_of(src)), sites_node(gm, layout_of(node)), shift, fill)
            replace_with_call(gm, node, ops.move_rows, args)
            self.report[what] += 1
