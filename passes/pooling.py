"""Average pooling and spatial means -> means over the visible positions.

Masked-dense semantics for average pooling: a pooled cell averages the visible positions it covers;
a cell with none is not a site of the pooled grid (so it is absent from attention keys). A sliding-window
average pool divides by its visible positions, plus its own padding when ``count_include_pad``. Adaptive
pooling whose output size divides the grid, and ``avg_pool2d`` with kernel == stride, are
kernel == stride poolings. A reduction over every spatial digit (a global context, squeeze-excite,
GRN's norm; with channel digits too, a group norm's statistics) is one value per sample over its visible tokens,
broadcast back to the sample's tokens by the token-wise pass. Max pooling takes the maximum over the visible
positions of its window (as over its own ``-inf`` padding). Pooling runs wherever the windows were folded: a
kernel == stride pool (or a reduction over low row and column digits, ``view(...).amax(dims)``) of any layout,
windows or heads folded into the batch axis included, reduces the visible positions of each cell of the grid.
A pooling of a padded grid (``passes.grid_padding``) pools onto a padded grid: the pooled padded positions
pool the padded (and, a sliding window, visible) positions of their windows, present whatever the mask.
Ops rewritten: ``adaptive_avg_pool2d``, ``avg_pool2d``, ``max_pool2d``, and ``mean``, ``sum``,
``linalg_vector_norm``, ``amax``, ``amin`` over the grid.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import (
    AvgPool,
    CellReduction,
    MaxPool,
    Property,
    SpatialReduction,
    facts,
    peek,
)
from greenmim_convert.compiler.layout import Atom, ImageWideError, Layout, LayoutError
from greenmim_convert.kernels.sparse_conv import conv_output_grid
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, is_op, layout_of, replace_with_call, shape_of, sites_node
from .conv import is_nchw
from .grid_padding import pooled_border
from .layout_ops import with_absorbed_pad

SPATIAL_REDUCTIONS = (aten.mean, aten.sum, aten.linalg_vector_norm, aten.amax, aten.amin)
POOLS = (aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d)


def _pool_factor(node: fx.Node, lay: Layout) -> Optional[int]:
    a = args_of(node)
    if is_op(node, aten.adaptive_avg_pool2d):
        out = tuple(shape_of(node)[-2:])
        if lay.grid[0] % out[0] or lay.grid[1] % out[1] or lay.grid[0] // out[0] != lay.grid[1] // out[1]:
            raise LayoutError(f"adaptive pooling from {lay.grid} to {out} is not a square kernel == stride pooling")
        return lay.grid[0] // out[0]
    if is_op(node, aten.avg_pool2d):
        k, s = _pair(a["kernel_size"]), _pair(a["stride"] or a["kernel_size"])
        uneven = lay.grid[0] % k[0] or lay.grid[1] % k[1]
        if k != s or k[0] != k[1] or any(a["padding"]) or a["ceil_mode"] or uneven or a["divisor_override"]:
            return None  # a sliding-window average pool
        return k[0]
    return None


@rules.layout("pooling", priority=60)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    src = node.args[0] if node.args else None
    lay = layout_of(src)
    if lay is None or node.op != "call_function":
        return None
    if is_op(node, *POOLS) and not is_nchw(lay):
        return _folded_pool_layout(node, lay)
    factor = _pool_factor(node, lay) if is_op(node, aten.adaptive_avg_pool2d, aten.avg_pool2d) else None
    if factor is not None:
        out = (lay.grid[0] // factor, lay.grid[1] // factor)
        if out == (1, 1):
            facts(node).spatial_mean = True
            return Layout(((lay.axes[0]), lay.axes[1], (), ()), lay.grid, lay.stride)
        return _nchw_pooled(lay, out, factor)
    if is_op(node, *SPATIAL_REDUCTIONS) and not lay.is_per_sample():
        dims = args_of(node)["dim"]
        reduced = {d % len(lay.axes) for d in ([dims] if isinstance(dims, int) else dims or [])}
        if not any(a.kind in "hw" for i in reduced for a in lay.axes[i]):
            return None
        if lay.prefixed_axes():
            raise LayoutError(
                "reduction over the grid of tokens that hold prefix tokens: slice the prefix tokens off first"
            )
        kind = str(node.target).split(".")[1]
        cell = _cell_reduction(lay, reduced, kind, bool(args_of(node)["keepdim"]))
        if cell is not None:
            facts(node).cell_reduction = CellReduction(kind, cell.stride // lay.stride)
            return cell
        if any(a.kind in "hw" for i, ax in enumerate(lay.axes) if i not in reduced for a in ax) or any(
            not lay.axes[i] for i in reduced
        ):
            _refuse_side_spanning(lay, reduced)
            raise LayoutError(
                f"reduction over axes {sorted(reduced)} of layout {lay.shape} is not over exactly the whole grid"
            )
        chans = [a for i in reduced for a in lay.axes[i] if a.kind == "c"]
        if chans and not is_op(node, aten.mean, aten.sum, aten.amax, aten.amin):
            raise LayoutError(f"{node.target} over the grid and channel digits together")
        if any(a.kind not in "hwc" for i in reduced for a in lay.axes[i]):
            raise LayoutError(
                f"reduction over axes {sorted(reduced)} of layout {lay.shape} mixes samples into the grid"
            )
        keep = bool(args_of(node)["keepdim"])
        signature = lay.channel_atoms()
        facts(node).spatial_reduction = SpatialReduction(
            [a.size for a in signature], [signature.index(a) for a in chans]
        )
        return Layout(
            tuple(() if i in reduced else ax for i, ax in enumerate(lay.axes) if keep or i not in reduced),
            lay.grid,
            lay.stride,
        )
    if is_op(node, aten.max_pool2d, aten.avg_pool2d):
        return _window_pool_layout(node, lay)
    return None


def _refuse_side_spanning(lay: Layout, reduced: set) -> None:
    """Raise ImageWideError for a reduction whose groups span a whole side of the grid with gaps: it reduces the
    major digit of the rows (or columns) and keeps a lower one (Hiera's query pooling of raster tokens it never
    unrolled maxes rows a quarter of the grid apart), so only a mask unit as tall (wide) as the image holds a
    group whole."""
    kept = [a for i, ax in enumerate(lay.axes) if i not in reduced for a in ax]
    for kind, side in zip("hw", lay.grid):
        top = [a for i in reduced for a in lay.axes[i] if a.kind == kind and a.inner * a.size == side]
        if top and any(a.kind == kind for a in kept):
            what = "rows" if kind == "h" else "columns"
            raise ImageWideError(
                f"reduction over axes {sorted(reduced)} of layout {lay.shape} groups {what}"
                f" {side // top[0].size} apart across the whole {side}-position side of the grid: no mask unit finer "
                "than the image holds a group whole"
            )


def _cell_reduction(lay: Layout, reduced: set, kind: str, keep: bool) -> Optional[Layout]:
    """The layout after a reduction over the low row and column digits of every cell (Hiera's max pooling of
    unrolled tokens, a pool of windows folded into the batch): a kernel == stride pooling onto the coarser grid;
    None when other digits are reduced or the reduction is not an ``amax``, ``mean`` or ``sum``."""
    atoms = [a for i in reduced for a in lay.axes[i]]
    kept = [a for i, ax in enumerate(lay.axes) if i not in reduced for a in ax if a.kind in "hw"]
    if not kept or any(a.kind not in "hw" for a in atoms) or kind not in ("amax", "mean", "sum"):
        return None
    factor = {}
    for k in "hw":
        place = 1
        for a in sorted((a for a in atoms if a.kind == k), key=lambda a: a.inner):
            if a.inner != place:
                return None
            place *= a.size
        factor[k] = place
    f = factor["h"]
    if f != factor["w"] or f == 1 or lay.offset != (0, 0) or any(a.inner % f for a in kept):
        return None
    axes = []
    for i, ax in enumerate(lay.axes):
        if i in reduced:
            if keep:
                axes.append(())
            continue
        axes.append(tuple(Atom(a.kind, a.size, a.inner // f) if a.kind in "hw" else a for a in ax))
    out = Layout(tuple(axes), (lay.grid[0] // f, lay.grid[1] // f), lay.stride * f, border=pooled_border(lay, f))
    out.check_packed()
    return out


def _folded_pool(node: fx.Node) -> Tuple[str, int]:
    """``(reduction, factor)`` of a square kernel == stride pool without padding, read from its arguments and
    shapes; raises for a sliding-window or padded pool."""
    a = args_of(node)
    if is_op(node, aten.adaptive_avg_pool2d):
        (h, w), (oh, ow) = shape_of(node.args[0])[-2:], shape_of(node)[-2:]
        if h % oh or w % ow or h // oh != w // ow:
            raise LayoutError(f"adaptive pooling from {(h, w)} to {(oh, ow)} is not a square kernel == stride pooling")
        return "mean", h // oh
    k, s = _pair(a["kernel_size"]), _pair(a["stride"] or a["kernel_size"])
    if is_op(node, aten.max_pool2d):
        kind, padding = "amax", with_absorbed_pad(node.args[0], _pair(a["padding"]))
        plain = _pair(a["dilation"]) == (1, 1)
    else:
        kind, padding, plain = "mean", _pair(a["padding"]), not a["divisor_override"]
    if k != s or k[0] != k[1] or any(padding) or not plain:
        name = "max" if kind == "amax" else "average"
        raise LayoutError(
            f"{name} pooling of a map that is not NCHW (windows or heads folded into its batch axis) "
            f"with a kernel {k} that is not its stride {s}, with padding, dilation or a divisor"
        )
    return kind, k[0]


def _folded_pool_layout(node: fx.Node, lay: Layout) -> Layout:
    """A kernel == stride pool of a map whose axes are not plain NCHW (windows folded into the batch axis): the
    reduction over the minor digits of the two pooled axes split by the kernel, which pools over the visible
    positions of each cell of the grid whatever digits the other axes hold."""
    kind, f = _folded_pool(node)
    shape = lay.shape
    if len(shape) < 3 or shape[-2] % f or shape[-1] % f:
        raise LayoutError(f"pooling by {f} of a map of shape {shape} that it does not divide")
    if lay.prefixed_axes():
        raise LayoutError("pooling of tokens that hold prefix tokens: slice the prefix tokens off first")
    split = lay.view(shape[:-2] + (shape[-2] // f, f, shape[-1] // f, f))
    out = _cell_reduction(split, {len(shape) - 1, len(shape) + 1}, kind, keep=False)
    if out is None:
        raise LayoutError(
            f"pooling of layout {lay.shape} does not pool cells of its grid: its pooled axes do not "
            f"hold the low row and column digits"
        )
    facts(node).cell_reduction = CellReduction(kind, f)
    return out


def _window_pool_layout(node: fx.Node, lay: Layout) -> Layout:
    """A sliding-window max or average pool: its output grid, checked to stay aligned with the mask units."""
    a = args_of(node)
    kind = "max" if is_op(node, aten.max_pool2d) else "avg"
    k = _pair(a["kernel_size"])
    s = _pair(a["stride"] or k)
    if kind == "max":
        p, d = with_absorbed_pad(node.args[0], _pair(a["padding"])), _pair(a["dilation"])  # MaxPool2dSame's -inf pad
    else:
        p, d = _pair(a["padding"]), (1, 1)
    if not is_nchw(lay):
        raise LayoutError(f"{kind} pooling input is not an NCHW feature map (layout {lay.shape})")
    if a["ceil_mode"] or s[0] != s[1]:
        raise LayoutError(f"{kind} pooling with ceil_mode or an anisotropic stride")
    grid = conv_output_grid(lay.grid, k, s, p, d)
    if s[0] > 1 and (lay.grid[0] != grid[0] * s[0] or lay.grid[1] != grid[1] * s[1]):
        raise LayoutError(f"{kind} pooling from grid {lay.grid} to {grid} does not keep the grid aligned")
    if kind == "max":
        facts(node).max_pool = MaxPool(k, s, p, d)
    else:
        facts(node).avg_pool = AvgPool(k, s, p, bool(a["count_include_pad"]), a["divisor_override"])
    return _nchw_pooled(lay, grid, s[0])


def _nchw_pooled(lay: Layout, grid: Tuple[int, int], factor: int) -> Layout:
    """The NCHW layout of ``lay`` pooled onto ``grid`` with stride ``factor``: a padded grid's padded positions
    pool onto the padded positions of the pooled grid (``grid_padding.pooled_border``)."""
    out = Layout.nchw(lay.axes[0][0].size if lay.axes[0] else 1, grid, lay.channels, lay.stride * factor)
    return replace(out, border=pooled_border(lay, factor))


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


class PoolingPass(GreenPass):
    name = "pooling"
    description = "pooling and grid reductions -> over the visible positions only"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.POOLS})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            found = peek(node)
            if found.layout is None:
                continue
            src = node.args[0] if node.args else None
            if found.spatial_mean:
                replace_with_call(gm, node, ops.sample_mean, (src, sites_node(gm, layout_of(src))))
                self.report["spatial mean -> per-sample mean"] += 1
            elif found.spatial_reduction is not None:
                kwargs = {k: v for k, v in args_of(node).items() if k not in ("self", "input", "dim", "keepdim")}
                sizes, digits = found.spatial_reduction
                replace_with_call(
                    gm,
                    node,
                    ops.sample_reduce,
                    (node.target, src, sites_node(gm, layout_of(src)), kwargs, sizes, digits),
                )
                self.report[f"spatial {str(node.target).split('.')[1]} -> per-sample over visible positions"] += 1
            elif found.cell_reduction is not None:
                kind, f = found.cell_reduction
                args = (kind, src, sites_node(gm, layout_of(src)), sites_node(gm, found.layout), f)
                replace_with_call(gm, node, ops.cell_reduce, args)
                self.report[f"{kind} over {f}x{f} cells of visible positions"] += 1
            elif found.max_pool is not None:
                k, st, p, d = found.max_pool
                args = (src, sites_node(gm, layout_of(src)), sites_node(gm, found.layout), k, st, p, d)
                replace_with_call(gm, node, ops.max_pool, args)
                self.report[f"max pool {k[0]}x{k[1]}/{st[0]} over visible positions"] += 1
            elif found.avg_pool is not None:
                k, st, p, with_pad, divisor = found.avg_pool
                args = (src, sites_node(gm, layout_of(src)), sites_node(gm, found.layout), k, st, p, with_pad, divisor)
                replace_with_call(gm, node, ops.avg_pool, args)
                self.report[f"average pool {k[0]}x{k[1]}/{st[0]} over visible positions"] += 1
            elif is_op(node, aten.adaptive_avg_pool2d, aten.avg_pool2d):
                fine, coarse = layout_of(src), found.layout
                factor = fine.grid[0] // coarse.grid[0]
                replace_with_call(gm, node, ops.mean_pool, (src, sites_node(gm, fine), sites_node(gm, coarse), factor))
                self.report[f"mean pool {factor}x{factor}"] += 1
