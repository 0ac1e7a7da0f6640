"""Packing window segments into equal-size groups for Group Window Attention.

A *packing* assigns every non-empty segment (window) a group and a slot offset inside it, such that
the segments of a group fit in ``group_size`` slots. Attention then runs on ``(num_groups, group_size)``
padded groups under a block-diagonal mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """Where each segment lives: ``seg_group[s]`` (-1 when empty) and ``seg_offset[s]``."""

    group_size: int
    num_groups: int
    seg_group: torch.Tensor
    seg_offset: torch.Tensor


def pack_one_per_group(counts: torch.Tensor) -> Packing:
    """Every non-empty segment alone in its group, groups as large as the largest segment."""
    nonempty = counts > 0
    g = int(counts.max().item()) if counts.numel() else 0
    group = torch.cumsum(nonempty.long(), 0) - 1
    seg_group = torch.where(nonempty, group, torch.full_like(group, -1))
    return Packing(max(g, 1), int(nonempty.sum().item()), seg_group, torch.zeros_like(counts))


def pack_segments(counts: torch.Tensor, capacity: int, strategy: str = "window") -> Packing:
    """Pack segments of the given token counts (each ``<= capacity``) into groups."""
    if strategy == "window":
        return pack_one_per_group(counts)
    raise ValueError(f"unknown grouping strategy {strategy!r}")
