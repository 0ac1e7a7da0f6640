"""GC ViT: the dense global-query generator, and the key mask added after the position bias."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.layers.pos_embed_rel import RelPosBias
from timm.models import gcvit

from greenmim_convert.oracle.hooks import Family, HookState, hidden_logit, visibility_map


def _dense_generator_pre(state: HookState) -> Callable:
    """GC ViT's global-query generator runs densely at every position of its input, which reads zeros at masked
    positions; inside it no other hook changes anything."""

    def hook(module: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None]
        state.dense += 1
        return (torch.where(vis, x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])

    return hook


def _dense_generator_post(state: HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        state.dense -= 1

    return hook


def _gcvit_block_pre(state: HookState) -> Callable:
    """GC ViT block: the key mask of its window attention (local or global queries) from timm's own
    ``window_partition`` of the (B, H, W) visibility, added to the logits after the position bias."""

    def hook(block: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[1:3]))[..., None].to(x.dtype)
        wins = gcvit.window_partition(vis, block.window_size)
        keys = wins.reshape(wins.shape[0], 1, 1, -1) > 0.5
        zero = torch.zeros((), dtype=x.dtype)
        state.block_vis[block.attn.rel_pos] = (
            torch.where(keys, zero, torch.tensor(hidden_logit(x.dtype), dtype=x.dtype)),
            block,
        )

    return hook


def _gcvit_logits_post(state: HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        if module not in state.block_vis:
            return None
        return out + state.block_vis.pop(module)[0]

    return hook


FAMILY = Family(
    pre=[(gcvit.FeatureBlock, _dense_generator_pre, False), (gcvit.GlobalContextVitBlock, _gcvit_block_pre, False)],
    post=[(gcvit.FeatureBlock, _dense_generator_post), (RelPosBias, _gcvit_logits_post)],
)
