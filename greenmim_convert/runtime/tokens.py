"""Packed visible tokens of one stage, and the converted model's output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from greenmim_convert.runtime.plan.sites import Sites


class VisibleTokens:
    """Packed features of the visible positions of one grid: ``feats (T, C)`` in canonical order."""

    def __init__(self, feats: torch.Tensor, sites: Sites):
        if feats.shape[0] != sites.num_tokens:
            raise ValueError(f"{feats.shape[0]} feature rows for {sites.num_tokens} sites")
        self.feats = feats
        self.sites = sites

    batch = property(lambda self: self.sites.batch, doc="sample index of every token, ``(T,)``")
    coords = property(lambda self: self.sites.coords, doc="(row, col) of every token on ``grid``, ``(T, 2)``")
    grid = property(lambda self: self.sites.grid, doc="(H, W) of this stage's grid")
    batch_size = property(lambda self: self.sites.batch_size)
    stride = property(lambda self: self.sites.stride, doc="pixels per grid cell")

    @property
    def num_channels(self) -> int:
        return int(self.feats.shape[1])

    def counts(self) -> torch.Tensor:
        """Visible tokens per sample, ``(B,)``."""
        return self.sites.counts()

    def to_dense(self) -> torch.Tensor:
        """``(B, C, H, W)`` with zeros at masked positions."""
        b, (h, w), c = self.batch_size, self.grid, self.num_channels
        out = self.feats.new_zeros(b, h, w, c)
        out[self.batch, self.coords[:, 0], self.coords[:, 1]] = self.feats
        return out.permute(0, 3, 1, 2)

    def to_padded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, Nmax, C)`` features padded with zeros, and the ``(B, Nmax)`` bool validity mask (a view of
        ``feats`` when every sample has the same number of tokens)."""
        return self.sites.pad(self.feats)

    def as_batched(self) -> torch.Tensor:
        """Zero-copy ``(B, N, C)`` view; only when every sample has the same number of tokens."""
        counts = self.counts()
        if counts.numel() and bool((counts != counts[0]).any()):
            raise ValueError(f"samples have different token counts {counts.tolist()}; use to_padded()")
        n = int(counts[0].item()) if counts.numel() else 0
        return self.feats.view(self.batch_size, n, self.num_channels)

    def mean(self) -> torch.Tensor:
        """Per-sample mean over visible tokens, ``(B, C)`` (zeros for a sample with none)."""
        sums = self.feats.new_zeros(self.batch_size, self.num_channels).index_add_(0, self.batch, self.feats)
        return sums / self.counts().clamp(min=1).to(self.feats.dtype)[:, None]

    def __repr__(self) -> str:
        return f"VisibleTokens(feats={tuple(self.feats.shape)}, grid={self.grid}, batch_size={self.batch_size})"


@dataclass
class GreenOutput:
    """``last``: tokens of ``forward_features`` (after the final norm); ``stages``: every stage's output."""

    last: VisibleTokens
    stages: List[VisibleTokens]
