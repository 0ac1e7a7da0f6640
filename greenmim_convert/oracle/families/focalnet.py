"""FocalNet: the modulation's global context averaged over visible positions."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.models import focalnet

from greenmim_convert.oracle.hooks import Family, HookState, visibility_map


def _focal_modulation_post(state: HookState) -> Callable:
    """FocalNet's modulation recomputed with its global context averaged over visible positions only.

    The focal convolutions keep their own hooks (they read zeros at masked inputs); only the
    ``mean`` over the grid, which no module hook reaches, is replaced by the visible-only mean.
    """

    def hook(module: nn.Module, args, out):
        q, ctx, gates = torch.split(module.f(args[0]), module.input_split, 1)
        levels = module.focal_level
        modulator = torch.zeros_like(ctx)
        for level, layer in enumerate(module.focal_layers):
            ctx = layer(ctx)
            modulator = modulator + ctx * gates[:, level : level + 1]
        vis = visibility_map(state.visible, ctx.shape[-2:])[:, None].to(ctx.dtype)
        mean = (ctx * vis).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True).clamp_min(1)
        modulator = modulator + module.act(mean) * gates[:, levels:]
        if module.normalize_modulator:
            modulator = modulator / (levels + 1)
        return module.proj_drop(module.proj(module.norm(q * module.h(modulator))))

    return hook


FAMILY = Family(post=[(focalnet.FocalModulation, _focal_modulation_post)])
