"""timm's squeeze-excite: the squeeze over visible positions, its 1x1 convs on one value per sample."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.layers.squeeze_excite import SEModule

from greenmim_convert.oracle.hooks import Family, HookState, squeeze_excite_pre, visibility_map


def _squeeze_excite_post(state: HookState) -> Callable:
    """timm's ``SEModule`` recomputed from its definition with the squeeze (mean, and max when ``add_maxpool``)
    over visible positions only; its 1x1 convs act on one value per sample."""

    def hook(module: nn.Module, args, out):
        if state.dense:
            return None
        state.per_sample -= 1
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None]
        zero = torch.zeros((), dtype=x.dtype)
        x_se = torch.where(vis, x, zero).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True).clamp_min(1)
        if module.add_maxpool:
            low = torch.tensor(float("-inf"), dtype=x.dtype)
            x_se = 0.5 * x_se + 0.5 * torch.where(vis, x, low).amax((2, 3), keepdim=True)
        state.per_sample += 1
        try:
            x_se = module.fc2(module.act(module.bn(module.fc1(x_se))))
        finally:
            state.per_sample -= 1
        return x * module.gate(x_se)

    return hook


FAMILY = Family(pre=[(SEModule, squeeze_excite_pre, False)], post=[(SEModule, _squeeze_excite_post)])
