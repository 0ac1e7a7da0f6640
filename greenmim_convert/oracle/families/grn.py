"""Global response normalisation (ConvNeXt V2): the per-sample norm over visible positions."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.layers.grn import GlobalResponseNorm

from greenmim_convert.oracle.hooks import Family, HookState, visibility_map


def _grn_post(state: HookState) -> Callable:
    """Global response normalisation with its per-sample L2 norm over visible positions only (FCMAE's sparse GRN).

    From the definition: ``g = ||x||_2`` over the grid per channel, ``n = g / (mean over channels of g + eps)``,
    output ``x + bias + weight * x * n``; masked positions add nothing to ``g`` (their output is never read).
    """

    def hook(module: nn.Module, args, out):
        x = args[0]
        spatial = list(module.spatial_dim)
        grid = [x.shape[d] for d in spatial]
        vis = visibility_map(state.visible, tuple(grid))
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        for d, size in zip(spatial, grid):
            shape[d] = size
        vis = vis.reshape(shape)
        g = torch.where(vis, x, torch.zeros((), dtype=x.dtype)).pow(2).sum(spatial, keepdim=True).sqrt()
        n = g / (g.mean(dim=module.channel_dim, keepdim=True) + module.eps)
        wb = [1] * x.dim()
        wb[module.channel_dim] = -1
        return x + module.bias.view(wb) + module.weight.view(wb) * (x * n)

    return hook


FAMILY = Family(post=[(GlobalResponseNorm, _grn_post)])
