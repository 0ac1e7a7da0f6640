"""timm's Swin, Swin V2 and Swin V2 CR: the key mask from timm's own ``window_partition`` of the rolled visibility."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.models import swin_transformer as swin
from timm.models import swin_transformer_v2 as swinv2
from timm.models import swin_transformer_v2_cr as swinv2cr

from greenmim_convert.oracle.hooks import Family, HookState, hidden_logit, visibility_map


def _swin_block_pre(state: HookState) -> Callable:
    def hook(block: nn.Module, args):
        x = args[0]
        state.block_vis[block.attn] = (visibility_map(state.visible, x.shape[1:3]), block)

    return hook


def _swin_attention_pre(state: HookState) -> Callable:
    def hook(attn: nn.Module, args, kwargs):
        vis, block = state.block_vis[attn]
        x = args[0]
        sh, sw = block.shift_size
        if sh or sw:
            vis = torch.roll(vis, shifts=(-sh, -sw), dims=(1, 2))
        wins = swin.window_partition(vis[..., None].to(x.dtype), block.window_size).reshape(x.shape[0], -1)
        key = torch.where(
            wins > 0.5, torch.zeros((), dtype=x.dtype), torch.tensor(hidden_logit(x.dtype), dtype=x.dtype)
        )
        key = key[:, None, :].expand(-1, x.shape[1], -1)
        base = kwargs.get("mask")
        if base is not None:
            key = key + base.to(x.dtype).repeat(x.shape[0] // base.shape[0], 1, 1)
        kwargs = dict(kwargs)
        kwargs["mask"] = key
        return args, kwargs

    return hook


FAMILY = Family(
    pre=[
        (swin.SwinTransformerBlock, _swin_block_pre, False),
        (swin.WindowAttention, _swin_attention_pre, True),
        (swinv2.SwinTransformerV2Block, _swin_block_pre, False),
        (swinv2.WindowAttention, _swin_attention_pre, True),
        (swinv2cr.SwinTransformerV2CrBlock, _swin_block_pre, False),
        (swinv2cr.WindowMultiHeadAttention, _swin_attention_pre, True),
    ]
)
