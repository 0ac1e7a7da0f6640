"""Slices, gathers and reductions over the channel digits of packed rows."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def channel_slice(feats: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of packed features (one part of a fused q/k/v projection)."""
    return feats[:, start:stop]


def channel_split(feats: torch.Tensor, sizes: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
    """Consecutive column ranges of packed features, all at once (so their gradients meet in one ``cat``)."""
    return torch.split(feats, list(sizes), dim=1)


def channel_gather(feats: torch.Tensor, columns: Tuple[int, ...]) -> torch.Tensor:
    """Columns of packed features that are not contiguous (a split of a minor channel digit)."""
    return feats.index_select(1, torch.tensor(columns, dtype=torch.long, device=feats.device))


def channel_op(
    op, feats: torch.Tensor, sizes: Sequence[int], positions: Sequence[int], kwargs: dict, out_channels: int
) -> torch.Tensor:
    """A reduction or softmax over channel digits of packed rows: view the digits, apply ``op`` over them."""
    x = feats.reshape(feats.shape[0], *sizes)
    if not positions:  # over a size-one axis (a softmax of one logit per token)
        x, positions = x.unsqueeze(-1), [x.dim()]
    dim_arg = next(a for a in op._schema.arguments if a.name == "dim")
    dim = positions[0] if str(dim_arg.type) == "int" else list(positions)
    return op(x, dim=dim, **kwargs).reshape(feats.shape[0], out_channels)


def stack_columns(parts: List[torch.Tensor], below: int) -> torch.Tensor:
    """Packed ``(rows, C)`` parts as the values of a new channel digit sitting above the lowest ``below`` columns:
    ``stack`` of channel values on packed rows."""
    rows = parts[0].shape[0]
    return torch.stack([p.reshape(rows, -1, below) for p in parts], 2).reshape(rows, -1)
