"""Reconstruction targets of MIM pre-training: each hidden unit's pixels, raw or normalised per unit (MAE)."""

from __future__ import annotations

import torch
import torch.nn as nn


def patchify(images: torch.Tensor, unit: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, gh*gw, unit*unit*C)``: the pixels of every mask unit, row-major over units."""
    b, c, h, w = images.shape
    gh, gw = h // unit, w // unit
    x = images.reshape(b, c, gh, unit, gw, unit).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, unit * unit * c)


def unpatchify(units: torch.Tensor, unit: int, grid: tuple, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, gh*gw, unit*unit*C)`` -> ``(B, C, gh*unit, gw*unit)``."""
    b = units.shape[0]
    gh, gw = grid
    x = units.reshape(b, gh, gw, unit, unit, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * unit, gw * unit)


class PixelTarget(nn.Module):
    """Pixels of the units at flat positions ``rows`` (b * N + u), normalised by their own mean and variance when
    ``norm_pix`` (MAE's target); the loss is their mean squared error, averaged over those units."""

    def __init__(self, norm_pix: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm_pix, self.eps = bool(norm_pix), float(eps)

    def forward(self, images: torch.Tensor, unit: int, rows: torch.Tensor) -> torch.Tensor:
        """``(len(rows), unit*unit*C)`` targets in float32 (or the images' dtype when wider)."""
        target = patchify(images.float() if images.dtype != torch.float64 else images, unit)
        target = target.flatten(0, 1).index_select(0, rows)
        if self.norm_pix:
            var, mean = torch.var_mean(target, dim=-1, unbiased=False, keepdim=True)
            target = (target - mean) / (var + self.eps).sqrt()
        return target

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over units and pixels."""
        return (pred - target).pow(2).mean()

    def extra_repr(self) -> str:
        return f"norm_pix={self.norm_pix}"
