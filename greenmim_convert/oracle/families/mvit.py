"""MViTv2: keys masked where it adds its decomposed relative positions (``cal_rel_pos_type``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.models import mvitv2

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.oracle.hooks import Family, HookState, hidden_logit, replaced, visibility_map


def _mvit_rel_pos(state: HookState, rel_pos: Callable) -> Callable:
    """MViTv2's relative-position step, then the key mask: the logits (B, heads, Nq, Nk) leave it for the softmax,
    the keys are the class token (always visible) and the ``k_size`` grid of pooled keys."""

    def run(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w):
        attn = rel_pos(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w)
        vis = visibility_map(state.visible, tuple(k_size)).reshape(attn.shape[0], -1)
        if has_cls_token:
            vis = torch.cat([torch.ones_like(vis[:, :1]), vis], 1)
        state.masked_rel_pos[-1] = True
        neg = torch.tensor(hidden_logit(attn.dtype), dtype=attn.dtype)
        return attn + torch.where(vis, torch.zeros((), dtype=attn.dtype), neg)[:, None, None, :]

    return run


def _mvit_attention_pre(state: HookState) -> Callable:
    def hook(module: nn.Module, args):
        state.masked_rel_pos.append(False)

    return hook


def _mvit_attention_post(state: HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        if not state.masked_rel_pos.pop():
            raise InvalidInputError(
                f"{type(module).__name__} with rel_pos_type={module.rel_pos_type!r}: the oracle masks "
                "MViTv2's keys where it adds its spatial relative positions"
            )

    return hook


FAMILY = Family(
    pre=[
        (mvitv2.MultiScaleAttention, _mvit_attention_pre, False),
        (mvitv2.MultiScaleAttentionPoolFirst, _mvit_attention_pre, False),
    ],
    post=[
        (mvitv2.MultiScaleAttention, _mvit_attention_post),
        (mvitv2.MultiScaleAttentionPoolFirst, _mvit_attention_post),
    ],
    install=replaced(mvitv2, "cal_rel_pos_type", _mvit_rel_pos),
)
