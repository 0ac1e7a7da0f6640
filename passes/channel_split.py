"""Channel splits: ``unbind``, ``select``, ``split``, ``chunk`` and ``slice`` (strided too) over channel digits,
and their inverse: ``cat`` along a new axis (``stack``), which makes a new channel digit.

Attention layers compute q/k/v with one Linear and split its output by viewing the channels as
(3, heads, head_dim) and unbinding (or chunking) the leading digit; gates are split off with
``split`` or slices. On packed tokens each part is a set of columns: a slice when the split digit
is the most significant one, a column gather otherwise.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from math import prod
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, copy_meta, facts, peek
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, is_op, layout_of, replace_with_call

Part = Tuple[Layout, List[int]]  # layout of the part and the packed columns it reads


def select_digits(lay: Layout, axis: int, start: int, stop: int, drop: bool, step: int = 1) -> Part:
    """The part of ``lay`` whose ``axis`` (one channel digit) lies in ``range(start, stop, step)``; ``drop`` removes
    the axis."""
    ax = lay.axes[axis]
    if len(ax) != 1 or ax[0].kind != "c":
        raise LayoutError(f"split along axis {axis} of layout {lay.shape}, which is not one channel digit")
    split = ax[0]
    signature = lay.channel_atoms()
    sizes = [len(range(start, stop, step)) if a == split else a.size for a in signature]
    renamed: Dict[Atom, Atom] = {}
    place = 1
    for a, size in zip(reversed(signature), reversed(sizes)):
        renamed[a] = Atom("c", size, place)
        place *= size
    columns = torch.arange(lay.channels).view([a.size for a in signature])
    index = [slice(None)] * len(signature)
    index[signature.index(split)] = slice(start, stop, step)
    columns = columns[tuple(index)].reshape(-1).tolist()
    axes = []
    for i, ax_i in enumerate(lay.axes):
        if i == axis and drop:
            continue
        axes.append(tuple(renamed.get(a, a) if a.kind == "c" else a for a in ax_i))
    return replace(lay, axes=tuple(axes)), columns


def _parts(node: fx.Node, lay: Layout) -> Optional[List[Part]]:
    """The parts of a multi-output split, or None when ``node`` is not one."""
    a = args_of(node)
    if is_op(node, aten.unbind):
        dim = a["dim"] % len(lay.axes)
        n = lay.shape[dim]
        return [select_digits(lay, dim, i, i + 1, True) for i in range(n)]
    if is_op(node, aten.split, aten.split_with_sizes, aten.chunk):
        dim = a["dim"] % len(lay.axes)
        n = lay.shape[dim]
        if is_op(node, aten.chunk):
            step = -(-n // a["chunks"])
            sizes = [min(step, n - s) for s in range(0, n, step)]
        elif is_op(node, aten.split_with_sizes):
            sizes = list(a["split_sizes"])
        else:
            step = a["split_size"]
            sizes = [min(step, n - s) for s in range(0, n, step)]
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [select_digits(lay, dim, s, e, False) for s, e in zip(bounds, bounds[1:])]
    return None


def _new_digit_cat(node: fx.Node) -> Optional[Layout]:
    """``cat`` along an axis of size one in every input (``stack`` in canonical form): the inputs become the values
    of a new channel digit, placed above the channel digits of the later axes (rotary embeddings'
    ``stack([-x[..., 1::2], x[..., ::2]], -1)``)."""
    tensors, dim = node.args[0], args_of(node)["dim"]
    lays = [layout_of(t) for t in tensors]
    if len(tensors) < 2 or any(lay is None for lay in lays):
        return None
    base = lays[0]
    dim %= len(base.axes)
    if any(lay.axes[dim] for lay in lays) or base.is_pair() or base.prefixed_axes():
        return None
    if any(lay != base for lay in lays[1:]):
        raise LayoutError("stack of tensors of different layouts")
    signature = base.channel_atoms()
    later = [a for ax in base.axes[dim + 1 :] for a in ax if a.kind == "c"]
    if set(later) != set(signature[len(signature) - len(later) :]):
        raise LayoutError("stack along an axis placed between channel digits of other significance")
    below = prod(a.size for a in later)
    renamed = {a: a if a in later else Atom("c", a.size, a.inner * len(tensors)) for a in signature}
    axes = [tuple(renamed.get(a, a) for a in ax) for ax in base.axes]
    axes[dim] = (Atom("c", len(tensors), below),)
    facts(node).new_digit = below
    return replace(base, axes=tuple(axes))


@rules.layout("channel-split", priority=90)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if node.op != "call_function":
        return None
    if is_op(node, aten.cat):
        return _new_digit_cat(node)
    src = node.args[0] if node.args else None
    if node.target is operator.getitem:
        parts = peek(src).parts
        if parts is None:
            return None
        lay, columns = parts[node.args[1]]
        facts(node).columns = columns
        return lay
    lay = layout_of(src)
    if lay is None or not hasattr(node.target, "_schema"):
        return None
    parts = _parts(node, lay)
    if parts is not None:
        found = facts(node)
        found.parts = parts
        found.layout_op = True
        return lay
    a = args_of(node)
    if is_op(node, aten.select):
        dim = a["dim"] % len(lay.axes)
        index = a["index"] % lay.shape[dim]
        out, facts(node).columns = select_digits(lay, dim, index, index + 1, True)
        return out
    if is_op(node, aten.slice):
        dim = a["dim"] % len(lay.axes)
        start, stop, step = slice(a["start"], a["end"], a["step"]).indices(lay.shape[dim])
        if not all(x.kind == "c" for x in lay.axes[dim]):
            return None
        out, facts(node).columns = select_digits(lay, dim, start, stop, False, step)
        return out
    return None


class ChannelSplitPass(GreenPass):
    name = "channel-split"
    description = "unbind / split / chunk / select / slice over channel digits -> column slices of packed features"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.CHANNEL_SPLITS})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if peek(node).parts is not None:
                self._split_whole(gm, node)
        for node in list(gm.graph.nodes):
            new_digit = peek(node).new_digit
            if new_digit is not None:
                replace_with_call(gm, node, ops.stack_columns, (list(node.args[0]), new_digit))
                self.report["stack -> columns interleaved as a new channel digit"] += 1
        for node in list(gm.graph.nodes):
            columns = peek(node).columns
            if columns is None:
                continue
            src = node.args[0]
            if peek(src).parts is not None:
                src = src.args[0]
            lo = columns[0] if columns else 0
            if columns == list(range(lo, lo + len(columns))):
                replace_with_call(gm, node, ops.channel_slice, (src, lo, lo + len(columns)))
                self.report["channel split -> slice"] += 1
            else:
                replace_with_call(gm, node, ops.channel_gather, (src, tuple(columns)))
                self.report["channel split -> column gather"] += 1
        gm.graph.eliminate_dead_code()

    def _split_whole(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """A split whose parts are consecutive column ranges covering every column (q/k/v of a fused
        projection) becomes one ``split`` of the packed features, whose backward is one ``cat``."""
        parts = peek(node).parts
        sizes = [len(cols) for _, cols in parts]
        flat = [c for _, cols in parts for c in cols]
        items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
        if flat != list(range(len(flat))) or not items:
            return
        with gm.graph.inserting_after(node):
            whole = gm.graph.call_function(ops.channel_split, (node.args[0], tuple(sizes)))
        for item in items:
            with gm.graph.inserting_before(item):
                new = gm.graph.call_function(operator.getitem, (whole, item.args[1]))
            copy_meta(item, new, columns=None)
            item.replace_all_uses_with(new)
            gm.graph.erase_node(item)
        self.report["channel split -> one split"] += 1
