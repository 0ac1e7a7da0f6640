"""``table[index]`` on parameters and buffers (``aten.index`` with one integer index) -> ``aten.index_select``.

A relative-position bias reads its table through a constant index of every (query, key) pair of a
window: ``table[index]``. Autograd's backward of ``aten.index`` is ``index_put_(accumulate=True)``, which
on the CPU is slow when the gradient arrives strided (the bias is used as ``(heads, N, N)``, the gather
gives ``(N * N, heads)``) and slower on two threads than on one: GC ViT's 14x14 windows, a ``729 x 8``
table read at 38416 pairs, take 1.9 ms on one thread and 4.6 ms on two, per block, forward and backward.
``index_select`` along the indexed axis gives the same values; its backward is ``index_add_`` (0.9 ms
on either). The mask does not shrink this work, so it weighs four times more in a converted step than in
the dense one. Only image-independent gathers are rewritten; an index that may hold negative entries
(which ``aten.index`` counts from the end) is wrapped first, so every index means what it meant.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, copy_meta

from .base import GreenPass, aten, is_op
from .block_masks import evaluate_constant
from .layout_analysis import image_values


def _known_nonnegative(gm: fx.GraphModule, index: fx.Node) -> bool:
    """True when ``index`` is computed from buffers and constants only and all its entries are >= 0 now."""
    value = evaluate_constant(gm, index)
    return value is not None and (value.numel() == 0 or int(value.min()) >= 0)


def _single_index(node: fx.Node) -> Optional[int]:
    """The axis of the one integer index tensor of ``aten.index``, or None for any other indexing."""
    indices = node.args[1]
    present = [i for i, x in enumerate(indices) if x is not None]
    if len(present) != 1:
        return None
    val = indices[present[0]].meta.get("val") if isinstance(indices[present[0]], fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.int64, torch.int32):
        return None
    return present[0]


def _fake_like(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    mode = getattr(like, "fake_mode", None)
    if mode is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    with mode:
        return torch.empty(shape, dtype=dtype, device=like.device)


class RowGatherPass(GreenPass):
    name = "row-gather"
    description = "image-independent table[index] -> index_select (backward: index_add_, not index_put_)"
    requires = frozenset({Property.CANONICAL})
    ensures = frozenset({Property.TABLE_ROWS})

    def run(self, gm: fx.GraphModule) -> None:
        image = image_values(gm, next(n for n in gm.graph.nodes if n.op == "placeholder"))
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.index) or node.name in image or node.args[0].name in image:
                continue
            axis = _single_index(node)
            if axis is None:
                continue
            table, index = node.args[0], node.args[1][axis]
            tval, ival = table.meta["val"], index.meta["val"]
            g = gm.graph
            with g.inserting_before(node):
                flat = g.call_function(aten.reshape.default, (index, [-1]))
                flat.meta["val"] = _fake_like(ival, (ival.numel(),), ival.dtype)
                if not _known_nonnegative(gm, index):
                    negative = g.call_function(aten.lt.Scalar, (flat, 0))
                    negative.meta["val"] = _fake_like(ival, (ival.numel(),), torch.bool)
                    wrapped = g.call_function(aten.add.Tensor, (flat, tval.shape[axis]))
                    wrapped.meta["val"] = flat.meta["val"]
                    flat = g.call_function(aten.where.self, (negative, wrapped, flat))
                    flat.meta["val"] = wrapped.meta["val"]
                rows = g.call_function(aten.index_select.default, (table, axis, flat))
                shape = list(tval.shape[:axis]) + [ival.numel()] + list(tval.shape[axis + 1 :])
                rows.meta["val"] = _fake_like(tval, shape, tval.dtype)
                out = g.call_function(aten.view.default, (rows, list(node.meta["val"].shape)))
            copy_meta(node, out)
            node.replace_all_uses_with(out)
            g.erase_node(node)
            self.report["table[index] -> index_select"] += 1
