"""Average pooling -> mean over the visible positions of each pooled cell.

Masked-dense semantics for average pooling: a pooled cell averages the visible positions it covers;
a cell with none is not a site of the pooled grid (so it is absent from attention keys). Adaptive
pooling whose output size divides the grid is a kernel == stride pooling. A ``mean`` over every
spatial axis (FocalNet's global context, squeeze-excitation) is the per-sample mean of the visible
tokens: one value per sample, broadcast back to the sample's tokens by the token-wise pass.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from greenmim_convert import ops
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, layout_of, replace_with_call, sites_node
from .conv import _is_nchw


def _pool(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.AdaptiveAvgPool2d]:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    return mod if isinstance(mod, nn.AdaptiveAvgPool2d) else None


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    pool = _pool(gm, node)
    if pool is None or layout_of(node.args[0]) is None:
        return None
    lay = layout_of(node.args[0])
    if not _is_nchw(lay):
        raise LayoutError(f"pooling input is not an NCHW feature map (layout {lay.shape})")
    size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size, pool.output_size)
    out = tuple(g if s is None else s for s, g in zip(size, lay.grid))
    if lay.grid[0] % out[0] or lay.grid[1] % out[1] or lay.grid[0] // out[0] != lay.grid[1] // out[1]:
        raise LayoutError(f"adaptive pooling from {lay.grid} to {out} is not a square kernel == stride pooling")
    factor = lay.grid[0] // out[0]
    return Layout.nchw(lay.axes[0][0].size if lay.axes[0] else 1, out, lay.channels, lay.stride * factor)


def _mean_dims(node: fx.Node) -> Optional[Sequence[int]]:
    if node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return [dims] if isinstance(dims, int) else dims
    return None


def spatial_mean_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """``x.mean(dims)`` over exactly the axes holding the spatial digits -> a per-sample layout."""
    dims = _mean_dims(node)
    lay = layout_of(node.args[0]) if node.args else None
    if dims is None or lay is None:
        return None
    n = len(lay.axes)
    reduced = {d % n for d in dims}
    if lay.is_per_sample() or any(
        (a.kind in "hw") != (i in reduced) for i, ax in enumerate(lay.axes) for a in ax
    ) or any(not lay.axes[i] for i in reduced):
        raise LayoutError(f"mean over axes {sorted(reduced)} of layout {lay.shape} is not over the whole grid")
    keep = len(node.args) > 2 and node.args[2] or node.kwargs.get("keepdim", False)
    axes = tuple(() if i in reduced else ax for i, ax in enumerate(lay.axes) if keep or i not in reduced)
    return Layout(axes, lay.grid, lay.stride)


class PoolingPass(GreenPass):
    name = "pooling"
    description = "average pooling -> mean over the visible positions of each pooled cell"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if _mean_dims(node) is not None and "layout" in node.meta:
                replace_with_call(gm, node, ops.sample_mean, (node.args[0], sites_node(gm, layout_of(node.args[0]))))
                self.report["spatial mean -> per-sample mean"] += 1
                continue
            if _pool(gm, node) is None or "layout" not in node.meta:
                continue
            src = node.args[0]
            fine, coarse = layout_of(src), node.meta["layout"]
            factor = fine.grid[0] // coarse.grid[0]
            replace_with_call(gm, node, ops.mean_pool, (src, sites_node(gm, fine), sites_node(gm, coarse), factor))
            self.report[f"mean pool {factor}x{factor}"] += 1
        gm.recompile()
