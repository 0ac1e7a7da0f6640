"""torchvision's Swin (its ``shifted_window_attention`` replaced by a masked one), MaxViT and
squeeze-excitation."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import maxvit as tv_maxvit
from torchvision.models import swin_transformer as tv_swin
from torchvision.ops import SqueezeExcitation

from greenmim_convert.oracle.hooks import (
    Family,
    HookState,
    SoftmaxKeys,
    attention_post,
    hidden_logit,
    per_sample_post,
    replaced,
    squeeze_excite_pre,
    visibility_map,
)


def _tv_shifted_window_attention(state: "HookState") -> Callable:
    """torchvision's ``shifted_window_attention`` (Swin V1, and V2 when ``logit_scale`` is given) plus the key mask.

    Written from torchvision's definition: pad the (B, H, W, C) map to whole windows, roll by the
    shift (no shift along an axis whose padded size fits in one window), attend inside windows with
    the bias, the seam mask (-100 between regions the roll made neighbours) and the key mask, then
    undo the roll and crop. Key visibility follows the same pad/roll/partition; the padding is the
    model's own and stays visible (it is no image position, like a conv's zero padding).
    """

    def attention(
        input: torch.Tensor,
        qkv_weight: torch.Tensor,
        proj_weight: torch.Tensor,
        relative_position_bias: torch.Tensor,
        window_size: Sequence[int],
        num_heads: int,
        shift_size: Sequence[int],
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        qkv_bias: Optional[torch.Tensor] = None,
        proj_bias: Optional[torch.Tensor] = None,
        logit_scale: Optional[torch.Tensor] = None,
        training: bool = True,
    ) -> torch.Tensor:
        b, h, w, c = input.shape
        wh, ww = int(window_size[0]), int(window_size[1])
        ph, pw = (-h) % wh, (-w) % ww
        hp, wp = h + ph, w + pw
        sh = int(shift_size[0]) if wh < hp else 0
        sw = int(shift_size[1]) if ww < wp else 0
        x = F.pad(input, (0, 0, 0, pw, 0, ph))
        vis = F.pad(visibility_map(state.visible, (h, w)), (0, pw, 0, ph), value=True)
        if sh or sw:
            x = torch.roll(x, (-sh, -sw), (1, 2))
            vis = torch.roll(vis, (-sh, -sw), (1, 2))
        gh, gw, n, d = hp // wh, wp // ww, wh * ww, c // num_heads

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, Hp, Wp, ...) -> (B, gh*gw, wh*ww, ...)
            t = t.reshape(t.shape[0], gh, wh, gw, ww, *t.shape[3:]).transpose(2, 3)
            return t.reshape(t.shape[0], gh * gw, n, *t.shape[5:])

        tokens = windows(x)  # (B, nW, N, C)
        if logit_scale is not None and qkv_bias is not None:
            qkv_bias = torch.cat([qkv_bias[:c], torch.zeros_like(qkv_bias[c : 2 * c]), qkv_bias[2 * c :]])
        qkv = F.linear(tokens, qkv_weight, qkv_bias).reshape(b, gh * gw, n, 3, num_heads, d)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each (B, nW, heads, N, d)
        if logit_scale is None:
            logits = (q * d**-0.5) @ k.transpose(-1, -2)
        else:
            cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            logits = cos * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        logits = logits + relative_position_bias  # (B, nW, heads, N, N) + (1, heads, N, N)
        if sh or sw:
            # the strips the roll wrapped around (last sh rows, last sw cols) are regions of their own;
            # torchvision's other region border (at -window) falls between windows and changes nothing
            rows = (torch.arange(hp, device=x.device) >= hp - sh).long()
            cols = (torch.arange(wp, device=x.device) >= wp - sw).long()
            region = windows((rows[:, None] * 2 + cols[None, :])[None])[0]  # (nW, N)
            seam = torch.where(region[:, :, None] != region[:, None, :], -100.0, 0.0).to(logits.dtype)
            logits = logits + seam[None, :, None]
        keys = windows(vis)  # (B, nW, N)
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        neg = torch.tensor(hidden_logit(logits.dtype), dtype=logits.dtype)
        logits = logits + torch.where(keys, zero, neg)[:, :, None, None, :]
        attn = F.dropout(logits.softmax(-1), p=attention_dropout, training=training)
        y = (attn @ v).transpose(2, 3).reshape(b, gh, gw, wh, ww, c)  # heads back next to channels
        y = F.dropout(F.linear(y, proj_weight, proj_bias), p=dropout, training=training)
        y = y.transpose(2, 3).reshape(b, hp, wp, c)
        if sh or sw:
            y = torch.roll(y, (sh, sw), (1, 2))
        return y[:, :h, :w].contiguous()

    return attention


def _tv_partition_keys_pre(state: HookState) -> Callable:
    """torchvision MaxViT's window or grid attention: key visibility partitioned and swapped by the layer's own ops."""

    def hook(layer: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None].to(x.dtype)
        parts = layer.partition_swap(layer.partition_op(vis, layer.p))  # (B, G, P, 1)
        state.key_masks.append(SoftmaxKeys(parts.permute(0, 1, 3, 2)[:, :, None] > 0.5))  # (B, G, 1, 1, P)

    return hook


FAMILY = Family(
    pre=[
        (tv_maxvit.PartitionAttentionLayer, _tv_partition_keys_pre, False),
        (SqueezeExcitation, squeeze_excite_pre, False),
    ],
    post=[(tv_maxvit.PartitionAttentionLayer, attention_post), (SqueezeExcitation, per_sample_post)],
    install=replaced(tv_swin, "shifted_window_attention", lambda state, original: _tv_shifted_window_attention(state)),
)
