"""DaViT: window attention (timm's own partition) and channel attention with token sums over visible tokens."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.models import davit

from greenmim_convert.oracle.hooks import Family, HookState, attention_post, attention_pre, visibility_map


def _davit_window_keys(module: nn.Module) -> Callable:
    """(B * windows, 1, 1, wh*ww) key visibility of DaViT's window attention (timm's own partition)."""

    def keys(state: HookState, k: torch.Tensor) -> torch.Tensor:
        b = state.visible.shape[0]
        n = k.shape[-2]
        vis = visibility_map(state.visible, state.grid_of(k.shape[0] // b * n))
        wins = davit.window_partition(vis[..., None].to(k.dtype), module.window_size)
        return wins.reshape(k.shape[0], 1, 1, n) > 0.5

    return keys


def _channel_attention_post(state: HookState) -> Callable:
    """DaViT channel attention recomputed with its token sums over visible tokens only.

    Written from the module's definition: the (head_dim x head_dim) logits sum k^T v (V2: q^T k,
    scaled by ``N ** -0.5`` with N the dense token count, a number the module reads from the input's
    shape) over the tokens; masked tokens are zeroed before the sum.
    """

    def hook(module: nn.Module, args, out):
        x = args[0]
        b, n, c = x.shape
        vis = visibility_map(state.visible, state.grid_of(n)).reshape(b, 1, n, 1)
        v2 = isinstance(module, davit.ChannelAttentionV2)
        heads = module.groups if v2 else module.num_heads
        q, k, v = module.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        zero = torch.zeros((), dtype=x.dtype)
        if v2:
            q = torch.where(vis, q * (n**-0.5 if module.dynamic_scale else module.head_dim**-0.5), zero)
            attn = torch.matmul(q.transpose(-1, -2), k).softmax(dim=-1)
            y = torch.matmul(attn, v.transpose(-1, -2)).transpose(-1, -2)
        else:
            k = torch.where(vis, k * module.scale, zero)
            attn = torch.matmul(k.transpose(-1, -2), v).softmax(dim=-1)
            y = torch.matmul(attn, q.transpose(-1, -2)).transpose(-1, -2)
        return module.proj(y.transpose(1, 2).reshape(b, n, c))

    return hook


FAMILY = Family(
    pre=[(davit.WindowAttention, attention_pre(_davit_window_keys), False)],
    post=[
        (davit.WindowAttention, attention_post),
        (davit.ChannelAttention, _channel_attention_post),
        (davit.ChannelAttentionV2, _channel_attention_post),
    ],
    fused=(davit.WindowAttention,),
)
