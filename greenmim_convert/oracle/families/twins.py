"""Twins: global sub-sampled attention, and locally-grouped attention with windows of ``ws`` tokens."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.models import twins

from greenmim_convert.oracle.hooks import Family, HookState, attention_post, attention_pre, global_keys, visibility_map


def _twins_window_keys(module: nn.Module) -> Callable:
    """(B, windows, 1, 1, ws*ws) key visibility of Twins' locally-grouped attention."""

    def keys(state: HookState, k: torch.Tensor) -> torch.Tensor:
        b, nw, _, n, _ = k.shape
        ws = module.ws
        h, w = state.grid_of(nw * n)
        vis = visibility_map(state.visible, (h, w)).view(b, h // ws, ws, w // ws, ws).transpose(2, 3)
        return vis.reshape(b, nw, 1, 1, n)

    return keys


FAMILY = Family(
    pre=[
        (twins.GlobalSubSampleAttn, attention_pre(lambda m: global_keys), False),
        (twins.LocallyGroupedAttn, attention_pre(_twins_window_keys), False),
    ],
    post=[(twins.GlobalSubSampleAttn, attention_post), (twins.LocallyGroupedAttn, attention_post)],
    fused=(twins.GlobalSubSampleAttn, twins.LocallyGroupedAttn),
)
