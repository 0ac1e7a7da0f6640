"""Window ops: views, permutes, rolls and friends become free on packed tokens.

The layout rule below follows each op symbolically (see ``greenmim_convert.layout``); once the
passes that read layouts have run, this pass removes the ops, since the packed data never moves.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, layout_of

VIEW_METHODS = {"view", "reshape"}
NOOP_METHODS = {"contiguous", "clone"}


def _ints(args) -> list:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return list(args[0])
    return list(args)


def _full_slices(index, shape) -> bool:
    index = index if isinstance(index, tuple) else (index,)
    for sl, size in zip(index, shape):
        if sl is Ellipsis:
            return all(s == slice(None) for s in index if s is not Ellipsis)
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            return False
        start, stop = sl.start or 0, size if sl.stop is None else min(sl.stop, size)
        if start != 0 or stop != size:
            return False
    return True


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """Layout after a layout-only op, or None when ``node`` is not one."""
    src = node.args[0] if node.args else None
    lay = layout_of(src)
    if lay is None:
        return None
    try:
        if node.op == "call_method":
            if node.target in VIEW_METHODS:
                return lay.view(node.meta["shape"])
            if node.target == "permute":
                return lay.permute(_ints(node.args[1:]))
            if node.target == "transpose":
                return lay.transpose(node.args[1], node.args[2])
            if node.target == "flatten":
                return lay.flatten(*node.args[1:], **node.kwargs)
            if node.target == "unsqueeze":
                return lay.unsqueeze(node.args[1])
            if node.target in NOOP_METHODS:
                return lay
        if node.op == "call_function":
            if node.target in (torch.reshape,):
                return lay.view(node.meta["shape"])
            if node.target is torch.permute:
                return lay.permute(_ints(node.args[1:]))
            if node.target is torch.flatten:
                return lay.flatten(*node.args[1:], **node.kwargs)
            if node.target is torch.roll:
                shifts = node.kwargs.get("shifts", node.args[1] if len(node.args) > 1 else None)
                dims = node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None)
                shifts = shifts if isinstance(shifts, (tuple, list)) else (shifts,)
                dims = dims if isinstance(dims, (tuple, list)) else (dims,)
                return lay.roll(shifts, dims)
            if node.target is F.pad:
                pads = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
                if any(pads):
                    return None
                return lay
            if node.target is operator.getitem and _full_slices(node.args[1], lay.shape):
                return lay
    except LayoutError as exc:
        raise LayoutError(f"{node.target}: {exc}") from exc
    return None


class WindowOpsPass(GreenPass):
    name = "window-ops"
    description = "views, permutes, rolls, zero pads and full slices become free on packed tokens"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if node.meta.get("layout_op"):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                self.report[str(getattr(node.target, "__name__", node.target))] += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
