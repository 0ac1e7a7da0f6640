"""``einsum`` of packed tokens with a table read at each token's position, without keeping the gathered table.

``out[t] = einsum(x[t], table[index[t]])`` (MViTv2's decomposed relative positions: each query contracts its
channels with the table slice at its row, or column). Gathering the slices for every token and handing both
to ``einsum`` makes autograd keep the gathered ``(T, *slice)`` tensor, ``slice / channels`` times the size of
the tokens (14x for MViTv2's first stage). Here the tokens run in chunks whose gathered slices stay small,
and only ``x``, the table and the indices are kept; the backward gathers each chunk again and adds its
slice gradients into the table's (``index_put_`` with accumulation: many tokens share a slice).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 4 << 20  # gathered slices of one chunk


def _chunk(table: torch.Tensor, index: Sequence[torch.Tensor]) -> int:
    """Tokens per chunk: their gathered slices take about :data:`CHUNK_BYTES`."""
    per_token = table[(0,) * len(index)].numel() * table.element_size()
    return max(1, CHUNK_BYTES // max(1, per_token))


class _TableEinsum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, equation: str, *index: torch.Tensor) -> torch.Tensor:
        step = _chunk(table, index)
        parts = [torch.einsum(equation, x[s:s + step], table[tuple(i[s:s + step] for i in index)])
                 for s in range(0, x.shape[0], step)]
        ctx.save_for_backward(x, table, *index)
        ctx.equation = equation
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, table, *index = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_x else None
        dtable = torch.zeros_like(table) if need_table else None
        step = _chunk(table, index)
        for s in range(0, x.shape[0], step):
            rows = tuple(i[s:s + step] for i in index)
            xs = x[s:s + step].detach().requires_grad_(need_x)
            ts = table[rows].detach().requires_grad_(need_table)
            with torch.enable_grad():
                out = torch.einsum(ctx.equation, xs, ts)
            wanted = [t for t in (xs, ts) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad[s:s + step]))
            if need_x:
                dx[s:s + step] = next(grads)
            if need_table:
                dtable.index_put_(rows, next(grads), accumulate=True)
        return (dx, dtable, None, *([None] * len(index)))


def table_einsum(equation: str, x: torch.Tensor, table: torch.Tensor, index: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``einsum(equation, x, table[index])`` over the leading (token) axis, keeping only ``x`` and ``table``.

    ``equation`` sees the gathered table with the token axis first (``"tyc,tkc->tyk"``); ``index`` holds one
    ``(T,)`` integer tensor per leading table axis it reads.
    """
    if any(i.shape != (x.shape[0],) for i in index):
        raise ValueError(f"every index must have shape ({x.shape[0]},), got {[tuple(i.shape) for i in index]}")
    return _TableEinsum.apply(x, table, equation, *index)
