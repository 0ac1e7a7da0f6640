"""NesT: attention inside blocks of tokens (timm's ``blockify``)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from timm.models import nest

from greenmim_convert.oracle.hooks import Family, HookState, attention_post, attention_pre, visibility_map


def _nest_block_keys(module: nn.Module) -> Callable:
    """(B, 1, T, 1, N) key visibility of NesT's attention inside its T blocks of N tokens (timm's ``blockify``)."""

    def keys(state: HookState, k: torch.Tensor) -> torch.Tensor:
        b, _, t, n, _ = k.shape
        vis = visibility_map(state.visible, state.grid_of(t * n))
        blocks = nest.blockify(vis[..., None].to(k.dtype), math.isqrt(n))
        return blocks.reshape(b, 1, t, 1, n) > 0.5

    return keys


FAMILY = Family(
    pre=[(nest.Attention, attention_pre(_nest_block_keys), False)],
    post=[(nest.Attention, attention_post)],
    fused=(nest.Attention,),
)
