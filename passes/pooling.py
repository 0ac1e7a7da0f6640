"""Average pooling and spatial means -> means over the visible positions.

Masked-dense semantics for average pooling: a pooled cell averages the visible positions it covers;
a cell with none is not a site of the pooled grid (so it is absent from attention keys). Adaptive
pooling whose output size divides the grid, and ``avg_pool2d`` with kernel == stride, are
kernel == stride poolings. A ``mean`` over every spatial axis (a global context, squeeze-excite)
is the per-sample mean of the visible tokens: one value per sample, broadcast back to the sample's
tokens by the token-wise pass. Ops rewritten: ``adaptive_avg_pool2d``, ``avg_pool2d``, ``mean``.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from greenmim_convert import ops
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, args_of, aten, is_op, layout_of, replace_with_call, shape_of, sites_node
from .conv import is_nchw


def _pool_factor(node: fx.Node, lay: Layout) -> Optional[int]:
    a = args_of(node)
    if is_op(node, aten.adaptive_avg_pool2d):
        out = tuple(shape_of(node)[-2:])
        if lay.grid[0] % out[0] or lay.grid[1] % out[1] or lay.grid[0] // out[0] != lay.grid[1] // out[1]:
            raise LayoutError(f"adaptive pooling from {lay.grid} to {out} is not a square kernel == stride pooling")
        return lay.grid[0] // out[0]
    if is_op(node, aten.avg_pool2d):
        k = list(a["kernel_size"])
        s = list(a["stride"] or k)
        k, s = k * (2 // len(k)), s * (2 // len(s))
        if k != s or k[0] != k[1] or any(a["padding"]) or a["ceil_mode"] or lay.grid[0] % k[0] or lay.grid[1] % k[1]:
            raise LayoutError(f"avg_pool2d with kernel {k}, stride {s}: only kernel == stride pooling that tiles the grid")
        return k[0]
    return None


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    src = node.args[0] if node.args else None
    lay = layout_of(src)
    if lay is None or node.op != "call_function":
        return None
    factor = _pool_factor(node, lay) if is_op(node, aten.adaptive_avg_pool2d, aten.avg_pool2d) else None
    if factor is not None:
        if not is_nchw(lay):
            raise LayoutError(f"pooling input is not an NCHW feature map (layout {lay.shape})")
        out = (lay.grid[0] // factor, lay.grid[1] // factor)
        if out == (1, 1):
            node.meta["spatial_mean"] = True
            return Layout(((lay.axes[0]), lay.axes[1], (), ()), lay.grid, lay.stride)
        return Layout.nchw(lay.axes[0][0].size if lay.axes[0] else 1, out, lay.channels, lay.stride * factor)
    if is_op(node, aten.mean) and not lay.is_per_sample():
        dims = args_of(node)["dim"]
        reduced = {d % len(lay.axes) for d in ([dims] if isinstance(dims, int) else dims or [])}
        spatial = [(a.kind in "hw") for ax in lay.axes for a in ax]
        if not any(spatial):
            return None
        if any((a.kind in "hw") != (i in reduced) for i, ax in enumerate(lay.axes) for a in ax) or any(not lay.axes[i] for i in reduced):
            raise LayoutError(f"mean over axes {sorted(reduced)} of layout {lay.shape} is not over the whole grid")
        keep = bool(args_of(node)["keepdim"])
        node.meta["spatial_mean"] = True
        return Layout(tuple(() if i in reduced else ax for i, ax in enumerate(lay.axes) if keep or i not in reduced), lay.grid, lay.stride)
    return None


class PoolingPass(GreenPass):
    name = "pooling"
    description = "average pooling -> mean over the visible positions of each pooled cell"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if "layout" not in node.meta:
                continue
            src = node.args[0] if node.args else None
            if node.meta.get("spatial_mean"):
                replace_with_call(gm, node, ops.sample_mean, (src, sites_node(gm, layout_of(src))))
                self.report["spatial mean -> per-sample mean"] += 1
            elif is_op(node, aten.adaptive_avg_pool2d, aten.avg_pool2d):
                fine, coarse = layout_of(src), node.meta["layout"]
                factor = fine.grid[0] // coarse.grid[0]
                replace_with_call(gm, node, ops.mean_pool, (src, sites_node(gm, fine), sites_node(gm, coarse), factor))
                self.report[f"mean pool {factor}x{factor}"] += 1
