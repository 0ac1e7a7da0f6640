"""Attention over packed groups under a block-diagonal mask (PyTorch reference path).

Shapes: ``q, k, v`` are ``(G, heads, g, d)``; ``segment`` is ``(G, g)`` with the window id of each
slot (padding slots carry unique negative ids, so they only see themselves); ``position`` is
``(G, g)`` with each slot's in-window position, used to gather ``bias`` ``(heads, N, N)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gather_pair_bias(bias: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Per-group pairwise bias ``(G, heads, g, g)`` from a window bias ``(heads, N, N)``."""
    n = bias.shape[-1]
    flat = (position[:, :, None] * n + position[:, None, :]).reshape(-1)
    pair = bias.reshape(bias.shape[0], n * n).index_select(1, flat)
    return pair.view(bias.shape[0], *position.shape, position.shape[-1]).transpose(0, 1)


def block_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(G, 1, g, g)``: 0 inside a segment, -inf across segments."""
    same = segment[:, :, None] == segment[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=segment.device)
    return torch.where(same, zero, torch.tensor(float("-inf"), dtype=dtype, device=segment.device))[:, None]


def group_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: torch.Tensor,
    position: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias[pos_i, pos_j] + mask) v, independently per group."""
    mask = block_mask(segment, q.dtype)
    if bias is not None:
        mask = mask + gather_pair_bias(bias.to(q.dtype), position)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
