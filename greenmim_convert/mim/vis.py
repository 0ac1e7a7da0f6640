"""Reconstruction pictures: masked input, reconstruction (visible units as given, hidden units predicted) and
original, one row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .data import denormalize
from .targets import patchify, unpatchify


def reconstruct(model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The reconstructions ``(B, C, H, W)`` of ``images``, in their normalisation.

    Runs ``model`` in eval mode without gradients and without touching the global random state; predictions of a
    per-unit normalised target are mapped back with each hidden unit's own mean and variance (MAE's display).
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(images, visible)
    finally:
        model.train(was)
    unit, grid = model.unit, model.mask_grid
    units = patchify(images.float(), unit)
    flat = units.flatten(0, 1).clone()
    pred = out.pred.float()
    if getattr(model.target, "norm_pix", False) and out.hidden.numel():
        rows = flat.index_select(0, out.hidden)
        var, mean = torch.var_mean(rows, dim=-1, unbiased=False, keepdim=True)
        pred = pred * (var + model.target.eps).sqrt() + mean
    flat[out.hidden] = pred
    return unpatchify(flat.view_as(units), unit, grid, images.shape[1])


def masked_input(images: torch.Tensor, visible: torch.Tensor, unit: int) -> torch.Tensor:
    """The images with hidden units set to the mean colour (0 in ImageNet normalisation: grey)."""
    keep = visible.repeat_interleave(unit, 1).repeat_interleave(unit, 2)[:, None]
    return torch.where(keep, images.float(), torch.zeros((), dtype=torch.float32, device=images.device))


def reconstruction_grid(model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """A ``(3, B*H, 3*W)`` picture in [0, 1]: per row masked input | reconstruction | original."""
    recon = reconstruct(model, images, visible)
    cols = [masked_input(images, visible, model.unit), recon, images.float()]
    rows = torch.cat([torch.cat([denormalize(c[i]) for c in cols], dim=2) for i in range(images.shape[0])], dim=1)
    return rows.cpu()


def save_png(image: torch.Tensor, path: Path) -> Optional[Path]:
    """Write a ``(3, H, W)`` [0, 1] image as PNG."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return Path(path)
