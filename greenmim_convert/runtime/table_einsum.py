"""``einsum`` of packed tokens with a table read at each token's position, without gathering the table per token.

``out[t] = einsum(x[t], table[index[t]])`` (MViTv2's decomposed relative positions: each query contracts its
channels with the table slice at its row, or column). Gathering the slice for every token and handing both to
``einsum`` makes autograd keep the gathered ``(T, *slice)`` tensor, ``slice / channels`` times the size of the
tokens (14x for MViTv2's first stage), and the table's gradient becomes an accumulating scatter over tokens.
Here the tokens are bucketed by the table entry they read (:class:`PositionBuckets`: a partial permutation into
``entries x width`` slots, zero-padded), so one batched ``einsum`` over the entries reads each slice once:
``out_pad[p, n] = einsum(x_pad[p, n], table[p])``; the table's gradient is the same batched product in backward,
with no scatter. Only ``x`` and the table are kept: the backward buckets ``x`` again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from greenmim_convert.runtime.gather import RowMap


@dataclass(frozen=True)
class PositionBuckets:
    """Tokens grouped by the table entry they read: ``into`` moves tokens to ``entries x width`` slots (entry-major,
    empty slots read zero), ``back`` moves every token's slot back to it."""

    entries: int
    width: int
    into: RowMap
    back: RowMap

    @classmethod
    def from_keys(cls, key: torch.Tensor, entries: int) -> "PositionBuckets":
        """From the table entry ``key[t]`` in ``[0, entries)`` that token ``t`` reads."""
        tokens = key.shape[0]
        counts = torch.bincount(key, minlength=entries)
        width = max(1, int(counts.max())) if tokens else 1
        order = torch.argsort(key, stable=True)
        start = torch.cumsum(counts, 0) - counts
        ranked = key[order]
        slot = torch.empty_like(order)
        slot[order] = ranked * width + torch.arange(tokens, device=key.device) - start[ranked]
        index = torch.full((entries * width,), -1, dtype=torch.long, device=key.device)
        index[slot] = torch.arange(tokens, device=key.device)
        return cls(entries, width, RowMap.from_index(index, tokens), RowMap.from_index(slot, entries * width))

    @classmethod
    def from_index(cls, index: Tuple[torch.Tensor, ...], lead: Tuple[int, ...]) -> "PositionBuckets":
        """From one ``(T,)`` index per leading table axis of sizes ``lead`` (entries numbered row-major)."""
        key = torch.zeros_like(index[0])
        for i, size in zip(index, lead):
            key = key * size + i
        return cls.from_keys(key, math.prod(lead))


def _bucketed_equation(equation: str) -> str:
    """``"tyc,tkc->tyk"`` (token axis first everywhere) -> ``"PNyc,Pkc->PNyk"`` over (entry, slot) with fresh
    letters."""
    lhs, out = equation.replace(" ", "").split("->")
    x, table = lhs.split(",")
    if not (x[0] == table[0] == out[0] == "t"):
        raise ValueError(f"equation {equation!r} must have the token axis 't' first in every operand")
    free = [ch for ch in "PQRSNMLJ" if ch not in equation]
    p, n = free[0], free[1]
    return f"{p}{n}{x[1:]},{p}{table[1:]}->{p}{n}{out[1:]}"


class _BucketedEinsum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, equation: str, buckets: PositionBuckets) -> torch.Tensor:
        padded = buckets.into(x).view(buckets.entries, buckets.width, *x.shape[1:])
        out = torch.einsum(equation, padded, table)
        ctx.save_for_backward(x, table)
        ctx.equation, ctx.buckets = equation, buckets
        return buckets.back(out.reshape(buckets.entries * buckets.width, *out.shape[2:]))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, table = ctx.saved_tensors
        b = ctx.buckets
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        padded = b.into(x).view(b.entries, b.width, *x.shape[1:]).requires_grad_(need_x)
        table = table.detach().requires_grad_(need_table)
        with torch.enable_grad():
            out = torch.einsum(ctx.equation, padded, table)
        grad_pad = b.back.t()(grad).view(out.shape)
        wanted = [t for t in (padded, table) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_pad))
        dx = b.into.t()(next(grads).reshape(b.entries * b.width, *x.shape[1:])) if need_x else None
        dtable = next(grads) if need_table else None
        return dx, dtable, None, None


def table_einsum(
    equation: str,
    x: torch.Tensor,
    table: torch.Tensor,
    index: Tuple[torch.Tensor, ...],
    buckets: Optional[PositionBuckets] = None,
) -> torch.Tensor:
    """``einsum(equation, x, table[index])`` over the leading (token) axis, keeping only ``x`` and ``table``.

    ``equation`` sees the gathered table with the token axis first (``"tyc,tkc->tyk"``); ``index`` holds one
    ``(T,)`` integer tensor per leading table axis it reads. ``buckets`` (from the flattened index) may be passed
    when several calls read the table at the same positions.
    """
    if any(i.shape != (x.shape[0],) for i in index):
        raise ValueError(f"every index must have shape ({x.shape[0]},), got {[tuple(i.shape) for i in index]}")
    flat = table.reshape(-1, *table.shape[len(index) :])
    if buckets is None:
        buckets = PositionBuckets.from_index(index, tuple(table.shape[: len(index)]))
    return _BucketedEinsum.apply(x, flat, _bucketed_equation(equation), buckets)
