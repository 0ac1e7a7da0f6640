"""Where an image-independent attention term's element for (head, query, key) lives, read from positions."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from greenmim_convert.runtime.plan.sites import digit_sum

Digit = Tuple[str, int, int, int]  # (kind h|w, size, inner, stride in the term)


@dataclass(frozen=True)
class TermPlan:
    """Where a term's element for (head, query, key) lives: sum of head, query and key digit offsets."""

    head: Tuple[Tuple[int, int, int], ...]  # (index among the head digits, size, stride)
    query: Tuple[Digit, ...]
    key: Tuple[Digit, ...]


def term_offsets(
    plan: TermPlan,
    head_sizes: Sequence[int],
    coords: torch.Tensor,
    grid,
    offset,
    key_coords=None,
    key_grid=None,
    key_offset=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets of a term's elements: per head ``(heads,)``, per query token and per key token."""
    heads = 1
    for s in head_sizes:
        heads *= s
    key_coords = coords if key_coords is None else key_coords
    q = digit_sum(coords, grid, offset, plan.query)
    k = digit_sum(key_coords, key_grid or grid, offset if key_offset is None else key_offset, plan.key)
    return head_offsets(plan, heads, head_sizes, coords.device), q, k


def head_offsets(plan: TermPlan, heads: int, head_sizes: Sequence[int], device) -> torch.Tensor:
    return head_offsets_cpu(plan, heads, tuple(head_sizes)).to(device)


@functools.lru_cache(maxsize=None)
def head_offsets_cpu(plan: TermPlan, heads: int, head_sizes: Tuple[int, ...]) -> torch.Tensor:
    """Offset of each head's first element in a term (static: cached per plan)."""
    out = torch.zeros(heads, dtype=torch.long)
    h = torch.arange(heads)
    for index, size, stride in plan.head:
        below = math.prod(head_sizes[index + 1 :])
        out += (torch.div(h, below, rounding_mode="floor") % size) * stride
    return out
