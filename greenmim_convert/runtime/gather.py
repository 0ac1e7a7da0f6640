"""Row gathers whose backward is a gather too: partial permutations of the rows of a 2-D tensor.

The converted model moves packed rows between layouts (tokens into attention slots and back,
fine tokens into their coarse cell for patch merging). Each such move reads every source row at
most once, and some output rows read nothing (padding slots, masked neighbours). PyTorch's
``index_select`` / fancy-index backward must allow repeated indices, so it zero-fills the whole
source-sized gradient and scatter-adds into it (``index_add_`` / ``index_put_`` with accumulate),
which on the CPU costs several times the forward gather. For a partial permutation the exact
gradient is the transposed partial permutation, a plain gather again: ``RowMap`` holds both
directions and ``RowMap.__call__`` applies it with that backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


def _nonzero_or_none(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the true entries of ``mask``, or None when there are none (nothing to fill)."""
    rows = mask.nonzero().squeeze(1)
    return rows if rows.numel() else None


def _gather_rows(src: torch.Tensor, index: torch.Tensor, empty: Optional[torch.Tensor]) -> torch.Tensor:
    """``src[index]`` with the rows listed in ``empty`` set to zero."""
    if src.shape[0] == 0:
        return src.new_zeros((index.shape[0], *src.shape[1:]))
    out = src.index_select(0, index)
    if empty is not None:
        out.index_fill_(0, empty, 0)
    return out


@dataclass(frozen=True)
class RowMap:
    """A partial permutation from ``num_src`` source rows to ``num_out`` output rows.

    ``index[i]`` is the source row of output row ``i`` (any valid row where ``empty`` lists ``i``:
    those read zero); ``inverse[j]`` is the output row that reads source row ``j`` (any valid row
    where ``unused`` lists ``j``: no output reads it).
    """

    index: torch.Tensor
    empty: Optional[torch.Tensor]
    inverse: torch.Tensor
    unused: Optional[torch.Tensor]

    @classmethod
    def from_index(cls, index: torch.Tensor, num_src: int) -> "RowMap":
        """From the source row of every output row, -1 for rows reading zero; valid entries must be distinct."""
        index = index.reshape(-1)
        valid = index >= 0
        target = torch.where(valid, index, num_src)  # rows reading zero all land on one spare entry
        inverse = torch.full((num_src + 1,), -1, dtype=torch.long, device=index.device)
        inverse.scatter_(0, target, torch.arange(index.shape[0], device=index.device))
        inverse = inverse[:num_src]
        return cls(index.clamp_min(0), _nonzero_or_none(~valid), inverse.clamp_min(0), _nonzero_or_none(inverse < 0))

    @property
    def num_out(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_src(self) -> int:
        return int(self.inverse.shape[0])

    def t(self) -> "RowMap":
        """The transposed map, from the output rows back to the source rows (the backward)."""
        return RowMap(self.inverse, self.unused, self.index, self.empty)

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        """``(num_out, ...)`` rows of ``src`` ``(num_src, ...)``, differentiable, backward a gather too."""
        return _PartialPermutation.apply(src, self)

    def split(self, src: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, ...]:
        """``self(src).split(sizes)``: consecutive blocks of ``sizes`` rows.

        Taking q, k and v of every attention bucket as blocks here, rather than ``split`` then
        ``unbind``, lets the backward gather their gradients with one concatenation instead of a
        stack per bucket and a concatenation.
        """
        return _SplitPermutation.apply(src, self, tuple(sizes))


class _PartialPermutation(torch.autograd.Function):
    """Autograd for ``RowMap``: forward gathers by ``index``, backward by ``inverse`` (itself differentiable)."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, rows: RowMap) -> torch.Tensor:
        ctx.rows = rows
        return _gather_rows(src, rows.index, rows.empty)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.rows.t()(grad), None


class _SplitPermutation(torch.autograd.Function):
    """Autograd for ``RowMap.split``: blocks are views of one gather; backward one concatenation, one gather."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, rows: RowMap, sizes: Tuple[int, ...]):
        ctx.rows = rows
        return _gather_rows(src, rows.index, rows.empty).split(sizes)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return ctx.rows.t()(torch.cat(grads)), None, None
