"""Layout ops: views, permutes, rolls, zero pads and full slices become free on packed tokens.

The layout rule follows each op symbolically (see ``greenmim_convert.compiler.layout``); once the passes
that read layouts have run, ``LayoutOpsPass`` removes the ops, since packed data never moves.
Ops rewritten: ``view``, ``reshape``, ``_unsafe_view``, ``permute``, ``transpose`` (``swapaxes``), ``flatten``,
``unflatten``, ``unsqueeze``, ``squeeze``, ``contiguous``, ``clone``, ``alias``, ``detach``,
``roll``, ``pad`` (zero amounts, or zeros read only by convolutions and -inf read only by max pooling,
which absorb them; other pads of the grid: ``grid_padding``), ``slice`` (full), ``expand`` (of size-one axes, feeding
elementwise ops), ``unfold`` into adjacent blocks (``x.unfold(d, k, k)``), ``_to_copy`` within one dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import REWRITES, Property, facts, peek
from greenmim_convert.compiler.layout import Layout, LayoutError

from . import rules
from .base import GreenPass, args_of, aten, is_op, layout_of, shape_of

VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten)
NOOPS = (aten.contiguous, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy)


def _full_slice(node: fx.Node, lay: Layout) -> bool:
    a = args_of(node)
    size = lay.shape[a["dim"] % len(lay.axes)]
    start = a["start"] or 0
    end = size if a["end"] is None else min(a["end"], size)
    return start == 0 and end >= size and a["step"] == 1


@rules.layout("layout-ops", priority=30)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """Layout after a layout-only op, or None when ``node`` is not one."""
    src = node.args[0] if node.args else None
    lay = layout_of(src)
    if lay is None or node.op != "call_function" or not hasattr(node.target, "_schema"):
        return None
    try:
        if is_op(node, *VIEWS):
            return lay.view(shape_of(node))
        if is_op(node, aten.permute):
            return lay.permute(node.args[1])
        if is_op(node, aten.transpose, aten.swapaxes, aten.swapdims):
            return lay.transpose(node.args[1], node.args[2])
        if is_op(node, aten.t):
            return lay.transpose(0, 1)
        if is_op(node, aten.flatten):
            a = args_of(node)
            return lay.flatten(a["start_dim"], a["end_dim"])
        if is_op(node, aten.unsqueeze):
            return lay.unsqueeze(node.args[1])
        if is_op(node, aten.squeeze):
            return lay.view(shape_of(node))
        if is_op(node, *NOOPS):
            return lay
        if is_op(node, aten._to_copy):
            a = args_of(node)
            if a.get("dtype") not in (None, src.meta["val"].dtype):
                return None  # a dtype cast is token-wise
            return lay
        if is_op(node, aten.roll):
            a = args_of(node)
            return lay.roll(list(a["shifts"]), list(a["dims"]))
        if is_op(node, aten.pad, aten.constant_pad_nd):
            return lay if not any(node.args[1]) or absorbed_pad(node) is not None else None
        if is_op(node, aten.slice) and _full_slice(node, lay):
            return lay
        if is_op(node, aten.expand, aten.expand_as):
            return expand_layout(node, lay)
        if is_op(node, aten.unfold):
            return unfold_layout(lay, node.args[1], node.args[2], node.args[3])
    except LayoutError as exc:
        raise type(exc)(f"{getattr(node.target, '__name__', node.target)}: {exc}") from exc
    return None


def unfold_layout(lay: Layout, dim: int, size: int, step: int) -> Layout:
    """``x.unfold(dim, size, size)``: axis ``dim`` split into blocks of ``size`` whose inner digit moves to a new last
    axis (a view); overlapping or gapped blocks (``step != size``) repeat or drop positions and are refused."""
    n = len(lay.axes)
    dim %= n
    if step != size or lay.shape[dim] % size:
        raise LayoutError(
            f"unfold of {lay.shape[dim]} positions into blocks of {size} every {step}, which do not tile them"
        )
    shape = list(lay.shape)
    split = lay.view(shape[:dim] + [shape[dim] // size, size] + shape[dim + 1 :])
    return split.permute(list(range(dim + 1)) + list(range(dim + 2, n + 1)) + [dim + 1])


def absorbed_pad(node: fx.Node):
    """``(top, bottom, left, right)`` of a pad of H and W that only feeds windowed ops which take it as their
    own padding (TensorFlow-style SAME, timm's ``Conv2dSame`` and ``MaxPool2dSame``): zeros read only by
    convolutions, or ``-inf`` read only by max pooling; None for any other pad."""
    a = args_of(node)
    pads = list(a["pad"])
    if is_op(node, aten.pad) and (a.get("mode", "constant") != "constant"):
        return None
    if len(pads) != 4 or min(pads) < 0 or not node.users:
        return None
    value = a.get("value") or 0.0
    reader = aten.conv2d if value == 0.0 else aten.max_pool2d if value == float("-inf") else None
    if reader is None or not all(is_op(u, reader) and u.args[0] is node and node not in u.args[1:] for u in node.users):
        return None
    facts(node).absorbed_pad = (pads[2], pads[3], pads[0], pads[1])
    return facts(node).absorbed_pad


def with_absorbed_pad(src, padding: Tuple[int, int]) -> Tuple[int, ...]:
    """The ``(h, w)`` padding of a conv or max pool reading ``src``, plus the pad ``src`` absorbed
    (``absorbed_pad``), as ``(top, bottom, left, right)``; unchanged when ``src`` is no such pad."""
    extra = peek(src).absorbed_pad
    if extra is None:
        return padding
    return (padding[0] + extra[0], padding[0] + extra[1], padding[1] + extra[2], padding[1] + extra[3])


def expand_layout(node: fx.Node, lay: Layout) -> Layout:
    """``expand`` only repeats size-one axes: packed values broadcast instead, so its users must be elementwise."""
    shape = shape_of(node)
    if len(shape) != len(lay.axes):
        raise LayoutError("expand that adds axes")
    return lay


class LayoutOpsPass(GreenPass):
    name = "layout-ops"
    description = "views, permutes, rolls, zero pads and full slices become free on packed tokens"
    requires = REWRITES  # every rewrite reads its inputs' layouts through the layout ops
    ensures = frozenset({Property.NO_LAYOUT_OPS})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if peek(node).layout_op:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                self.report[str(getattr(node.target, "__name__", node.target)).split(".")[0]] += 1
        gm.graph.eliminate_dead_code()
