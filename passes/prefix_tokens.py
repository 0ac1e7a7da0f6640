"""Prefix tokens (a class token) in front of the grid tokens: ``cat``, ``slice`` and ``slice_scatter`` of them.

``cat((*parts, grid), dim)`` along a token axis, where each part is one value per sample (an image
value) or constant tokens equal for every sample (``cls_token.expand(B, -1, -1)``, register tokens),
gives a layout whose token axis holds prefix tokens before the grid tokens. Packed, such a value is its
grid rows in canonical order followed by each sample's prefix rows: token-wise ops run on it unchanged.
``x[:, 1:]`` (the grid tokens) and ``x[:, :1]`` (the prefix token, one value per sample) select rows;
``slice_scatter`` of the grid part of attention logits back into them (timm's
``attn[:, :, 1:, 1:] = ...`` after functionalization) is read by the attention pass.
Ops rewritten: ``cat``, ``slice`` (of the prefix or the grid part of a token axis).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch.fx as fx

from greenmim_convert.compiler.annotations import PrefixSlice, Property, facts, peek
from greenmim_convert.compiler.layout import Layout, LayoutError
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, context_of, is_op, layout_of, replace_with_call, shape_of


def _bounds(node: fx.Node, size: int):
    a = args_of(node)
    return slice(a["start"], a["end"], a["step"]).indices(size)


def _slice_rule(node: fx.Node, lay: Layout) -> Optional[Layout]:
    dim = args_of(node)["dim"] % len(lay.axes)
    count = lay.prefixed_axes().get(dim)
    if count is None:
        return None
    size = lay.shape[dim]
    start, stop, step = _bounds(node, size)
    if (start, stop, step) == (0, size, 1):
        return None  # a full slice: a layout op
    if (start, stop, step) == (count, size, 1):
        facts(node).prefix_slice = PrefixSlice("grid", count)
        return lay.without_prefix(dim)
    if (start, stop, step) == (0, count, 1):
        if lay.is_pair():
            raise LayoutError("the prefix-token part of attention logits")
        if count != 1:
            raise LayoutError(f"{count} prefix tokens (one, a class token, is supported)")
        facts(node).prefix_slice = PrefixSlice("prefix", count)
        axes = list(lay.axes)
        axes[dim] = ()
        return replace(lay, axes=tuple(axes), prefix=0)
    raise LayoutError(
        f"slice {start}:{stop}:{step} of a token axis holding {count} prefix token(s) and the grid tokens"
    )


def _constant_tokens(node: fx.Node, grid: Layout, dim: int) -> tuple:
    """``(source, token axis, channel axis, count)`` of constant prefix tokens equal for every sample
    (``cls_token.expand(B, -1, -1)``, or several register tokens), with their axes checked."""
    src = node.args[0] if is_op(node, aten.expand) else node
    shape = shape_of(src)
    batch_axis = next((i for i, ax in enumerate(grid.axes) if any(a.kind == "b" for a in ax)), None)
    channel_axis = grid.channel_axis()
    if shape is None or len(shape) != len(grid.axes) or batch_axis is None or channel_axis is None:
        raise LayoutError("concatenation of image tokens with a constant that is not one token per sample")
    for i, size in enumerate(shape):
        want = grid.shape[i] if i == channel_axis else 1
        if size != want and i != dim:
            raise LayoutError(
                f"concatenation of image tokens with a constant of shape {shape_of(node)} that is not "
                "tokens equal for every sample"
            )
    return src, dim, channel_axis, shape[dim]


def _cat_rule(node: fx.Node) -> Optional[Layout]:
    """``cat((prefix parts..., grid tokens), dim)``: each part a per-sample token or constant tokens."""
    tensors, dim = node.args[0], args_of(node)["dim"]
    if len(tensors) < 2 or layout_of(tensors[-1]) is None:
        return None
    grid = layout_of(tensors[-1])
    dim %= len(grid.axes)
    if grid.is_pair() or grid.prefixed_axes() or not grid.axes[dim] or any(a.kind not in "hw" for a in grid.axes[dim]):
        return None
    parts = []
    for part in tensors[:-1]:
        token = layout_of(part)
        if token is None:
            parts.append(_constant_tokens(part, grid, dim))
            continue
        expected = list(grid.axes)
        expected[dim] = ()
        if not token.is_per_sample() or token.padded_to(len(grid.axes)).axes != tuple(expected):
            raise LayoutError(
                f"concatenation of grid tokens {grid.shape} with tokens {token.shape} that are not one per sample"
            )
        parts.append(None)
    facts(node).prefix_cat = parts
    return replace(grid, prefix=sum(1 if p is None else p[-1] for p in parts))


def _scatter_rule(node: fx.Node, lay: Layout) -> Optional[Layout]:
    """``slice_scatter`` of a value into the grid part of a token axis holding prefix tokens."""
    dim = args_of(node)["dim"] % len(lay.axes)
    if dim not in lay.prefixed_axes():
        return None
    size = lay.shape[dim]
    if _bounds(node, size) != (lay.prefixed_axes()[dim], size, 1):
        raise LayoutError("slice_scatter into a token axis that is not its grid part")
    if layout_of(node.args[1]) != lay.without_prefix(dim):
        raise LayoutError("slice_scatter of a value whose layout is not the grid part of the target")
    facts(node).block_scatter = dim
    return lay


@rules.layout("prefix-tokens", priority=10)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """Layout of a ``cat`` that puts a per-sample token before the grid tokens, or of a ``slice``/``slice_scatter``
    of a token axis holding prefix tokens; None for every other node."""
    if node.op != "call_function":
        return None
    if is_op(node, aten.cat):
        return _cat_rule(node)
    lay = layout_of(node.args[0]) if node.args else None
    if lay is None or not lay.prefixed_axes():
        return None
    if is_op(node, aten.slice):
        return _slice_rule(node, lay)
    if is_op(node, aten.slice_scatter):
        return _scatter_rule(node, lay)
    return None


class PrefixTokensPass(GreenPass):
    name = "prefix-tokens"
    description = "class tokens: cat in front of the grid tokens and slices of them -> rows of the packed tokens"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS, Property.ATTENTION})  # attention reads prefix slices
    ensures = frozenset({Property.PREFIX_TOKENS})

    def run(self, gm: fx.GraphModule) -> None:
        visible = context_of(gm).visible
        for node in list(gm.graph.nodes):
            found = peek(node)
            if found.layout is None or found.layout.is_pair():
                continue
            if found.prefix_slice is not None:
                part, count = found.prefix_slice
                fn = ops.grid_rows if part == "grid" else ops.prefix_rows
                replace_with_call(gm, node, fn, (node.args[0], visible, count))
                self.report[f"slice -> {part} rows"] += 1
            elif found.prefix_cat is not None:
                tokens = []
                for part, constant in zip(node.args[0][:-1], found.prefix_cat):
                    if constant is not None:
                        with gm.graph.inserting_before(node):
                            part = gm.graph.call_function(ops.constant_prefix_rows, (*constant[:-1], visible))
                        self.report["constant prefix tokens -> rows of every sample"] += 1
                    tokens.append(part)
                replace_with_call(gm, node, ops.join_prefix, (node.args[0][-1], tokens, visible))
                self.report["cat -> prefix token rows after the grid rows"] += 1
