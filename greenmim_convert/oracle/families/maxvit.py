"""timm's MaxViT / CoAtNet: block and grid attention, keys partitioned by timm's own partition functions."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from timm.models import maxxvit

from greenmim_convert.oracle.hooks import Family, GivenKeys, HookState, attention_post, visibility_map


def _partition_keys_pre(state: HookState) -> Callable:
    """MaxViT's block or grid attention: key visibility partitioned by timm's own partition functions."""

    def hook(module: nn.Module, args):
        x = args[0]
        nchw = isinstance(module, maxxvit.PartitionAttention2d)
        grid = tuple(x.shape[-2:]) if nchw else tuple(x.shape[1:3])
        vis = visibility_map(state.visible, grid).to(x.dtype)
        if nchw:
            part = maxxvit.window_partition_nchw if module.partition_block else maxxvit.grid_partition_nchw
            wins = part(vis[:, None], module.partition_size)
        else:
            part = maxxvit.window_partition if module.partition_block else maxxvit.grid_partition
            wins = part(vis[..., None], module.partition_size)
        state.key_masks.append(GivenKeys(wins.reshape(wins.shape[0], 1, 1, -1) > 0.5))

    return hook


FAMILY = Family(
    pre=[
        (maxxvit.PartitionAttentionCl, _partition_keys_pre, False),
        (maxxvit.PartitionAttention2d, _partition_keys_pre, False),
    ],
    post=[(maxxvit.PartitionAttentionCl, attention_post), (maxxvit.PartitionAttention2d, attention_post)],
    fused=(maxxvit.AttentionCl, maxxvit.Attention2d),
)
