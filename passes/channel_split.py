"""Channel splits: ``kv.unbind(0)`` over a channel digit becomes a slice of the packed features.

Attention layers compute q/k/v with one Linear and split its output by viewing the channels as
(3 or 2, heads, head_dim) and unbinding the leading digit. On packed tokens that is a column slice.
Only the most significant channel digit may be split this way (contiguous columns). ``torch.split``
along the channel axis and slices of it (``x[:, a:b]``, FocalNet's gates) are column slices too.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from math import prod
from typing import Optional

import torch
import torch.fx as fx

from greenmim_convert import ops
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, layout_of, replace_with_call


def _split_layouts(lay: Layout, dim: int):
    axis = lay.axes[dim]
    if len(axis) != 1 or axis[0].kind != "c":
        raise LayoutError(f"unbind along axis {dim} that is not one channel digit")
    atom = axis[0]
    rest = prod(a.size for ax in lay.axes for a in ax if a.kind == "c" and a is not atom)
    if atom.inner != rest:
        raise LayoutError("unbind of a channel digit that is not the most significant one")
    sub = replace(lay, axes=lay.axes[:dim] + lay.axes[dim + 1:])
    return [(sub, i * rest, (i + 1) * rest) for i in range(atom.size)]


def _split_sizes(lay: Layout, node: fx.Node) -> Optional[list]:
    """Channel ranges of ``torch.split(x, sizes, dim)`` along the channel axis, or None."""
    is_split = node.op == "call_function" and node.target is torch.split or node.op == "call_method" and node.target == "split"
    if not is_split:
        return None
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs["split_size_or_sections"]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if lay.channel_axis() is None or dim % len(lay.axes) != lay.channel_axis():
        raise LayoutError(f"split along axis {dim} that is not the channel axis of layout {lay.shape}")
    c = lay.channels
    sizes = [sizes] * -(-c // sizes) if isinstance(sizes, int) else list(sizes)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [(lay.with_channels(min(stop, c) - start), start, min(stop, c)) for start, stop in zip(bounds, bounds[1:])]


def _channel_range(lay: Layout, index) -> Optional[tuple]:
    """(start, stop) when ``index`` slices only the channel axis, with step 1; None otherwise."""
    axis = lay.channel_axis()
    index = index if isinstance(index, tuple) else (index,)
    if axis is None or len(index) != axis + 1 or any(s != slice(None) for s in index[:axis]):
        return None
    sl = index[axis]
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    start, stop, _ = sl.indices(lay.channels)
    if (start, stop) == (0, lay.channels) or stop <= start:
        return None
    return start, stop


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    lay = layout_of(node.args[0]) if node.args else None
    if lay is not None:
        parts = _split_sizes(lay, node)
        if parts is not None:
            node.meta["layout_tuple"] = parts
            return lay
        if node.op == "call_function" and node.target is operator.getitem:
            rng = _channel_range(lay, node.args[1])
            if rng is not None:
                node.meta["channel_slice"] = rng
                return lay.with_channels(rng[1] - rng[0])
    if node.op == "call_method" and node.target == "unbind":
        lay = layout_of(node.args[0])
        if lay is None:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        node.meta["layout_tuple"] = _split_layouts(lay, dim % len(lay.axes))
        return lay
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        parts = src.meta.get("layout_tuple") if isinstance(src, fx.Node) else None
        if parts is None:
            return None
        sub, start, stop = parts[node.args[1]]
        node.meta["channel_slice"] = (start, stop)
        return sub
    return None


class ChannelSplitPass(GreenPass):
    name = "channel-split"
    description = "unbind over a channel digit -> column slices of the packed features"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if "channel_slice" not in node.meta:
                continue
            src = node.args[0]
            if "layout_tuple" in src.meta:
                src = src.args[0]
            replace_with_call(gm, node, ops.channel_slice, (src,) + node.meta["channel_slice"])
            self.report["channel split -> slice"] += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
