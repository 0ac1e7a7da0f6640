"""A hierarchical ViT written from scratch in plain PyTorch, unlike timm's and torchvision's code.

It is the "researcher's own model" of the equivalence tests: channels-last tokens, SDPA with a float
``attn_mask`` (a full learned bias plus the shift seam mask built in ``forward``), qkv split with
``chunk``, and patch merging by a 2x2 stride-2 conv. ``scratch_masked_reference`` is its oracle.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from greenmim_convert.oracle.reference import KeyMaskFn, dense_masked_reference, visibility_map
from greenmim_convert.runtime.tokens import GreenOutput


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention inside ``window x window`` tiles of a (B, H, W, C) map, tiles moved by ``offset``."""

    def __init__(self, width: int, heads: int, window: int, offset: int):
        super().__init__()
        self.heads, self.window, self.offset = heads, window, offset
        self.to_qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        area = window * window
        self.pair_bias = nn.Parameter(0.5 * torch.randn(heads, area, area))

    def seam_mask(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(tiles, area, area) additive mask keeping the wrapped-around strips of a rolled map apart."""
        w, s = self.window, self.offset
        label = torch.zeros(height, width)
        strips = (slice(0, -w), slice(-w, -s), slice(-s, None))
        n = 0
        for rows in strips:
            for cols in strips:
                label[rows, cols] = n
                n += 1
        label = label.view(height // w, w, width // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        apart = label[:, :, None] != label[:, None, :]
        return torch.zeros(apart.shape, dtype=like.dtype).masked_fill(apart, -1e4).to(like.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        w, s, nh = self.window, self.offset, self.heads
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        tiles_h, tiles_w = height // w, width // w
        tiles = x.view(b, tiles_h, w, tiles_w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, tiles_h * tiles_w, w * w, c)
        q, k, v = self.to_qkv(tiles).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (nh, c // nh)).transpose(2, 3)  # (B, tiles, heads, area, dh)
        mask = self.pair_bias.unsqueeze(0)  # (1, heads, area, area): broadcast over tiles
        if s:
            mask = mask + self.seam_mask(height, width, x).unsqueeze(1)  # (tiles, heads, area, area)
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        y = self.out(y.transpose(2, 3).flatten(-2))
        y = y.view(b, tiles_h, tiles_w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        return y


class Block(nn.Module):
    """Pre-norm residual block: local self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, window: int, offset: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = LocalSelfAttention(width, heads, window, offset)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class ConvMerge(nn.Module):
    """Halve the grid and double the width of a (B, H, W, C) map with a 2x2 stride-2 conv, then LayerNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, 2 * width, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PoolMerge(nn.Module):
    """Halve the grid as an MBConv shortcut does: a 3x3/2 average pool counting its padding and a 1x1 conv, plus a
    3x3/2 conv smoothed by a 3x3/1 average pool that does not count its padding; then LayerNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 2, padding=1)
        self.proj = nn.Conv2d(width, 2 * width, kernel_size=1)
        self.conv = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.smooth = nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)
        self.norm = nn.LayerNorm(2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        return self.norm((self.proj(self.pool(x)) + self.smooth(self.conv(x))).permute(0, 2, 3, 1))


class Stage(nn.Module):
    """Optional merge, then blocks whose tiles alternate between unshifted and shifted by window // 2."""

    def __init__(self, width: int, depth: int, heads: int, window: int, merge: Optional[type]):
        super().__init__()
        self.merge = merge(width // 2) if merge is not None else nn.Identity()
        self.blocks = nn.ModuleList(Block(width, heads, window, (i % 2) * (window // 2)) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.merge(x)
        for block in self.blocks:
            x = block(x)
        return x


class ScratchViT(nn.Module):
    """Hierarchical window ViT: 4x4 conv patches, stages at strides 4, 8, 16, ...; returns the NCHW final map.

    Embed 24: no stage's width divides the image size, so ``feature_layout`` reads every
    channels-last stage output as NHWC without a hint.
    """

    def __init__(
        self,
        embed: int = 24,
        depths: Sequence[int] = (2, 2, 2),
        heads: Sequence[int] = (1, 2, 4),
        window: int = 4,
        img_size: int = 128,
        merge: type = ConvMerge,
    ):
        super().__init__()
        self.img_size = img_size
        self.patchify = nn.Conv2d(3, embed, kernel_size=4, stride=4)
        self.patch_norm = nn.LayerNorm(embed)
        self.stages = nn.ModuleList(
            Stage(embed * 2**i, d, h, window, merge if i > 0 else None) for i, (d, h) in enumerate(zip(depths, heads))
        )
        self.final_norm = nn.LayerNorm(embed * 2 ** (len(depths) - 1))
        self.stage_names = [f"stages.{i}" for i in range(len(depths))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patchify(x).permute(0, 2, 3, 1))
        for stage in self.stages:
            x = stage(x)
        return self.final_norm(x).permute(0, 3, 1, 2)


def scratch_key_mask_for(module: nn.Module) -> Optional[KeyMaskFn]:
    """Key visibility of a ``LocalSelfAttention`` call: its tiles' visibility, rolled as its input is."""
    if not isinstance(module, LocalSelfAttention):
        return None

    def keys(args: Tuple, visible: torch.Tensor) -> torch.Tensor:
        b, height, width, _ = args[0].shape
        w, s = module.window, module.offset
        vis = torch.roll(visibility_map(visible, (height, width)), shifts=(-s, -s), dims=(1, 2))
        vis = vis.view(b, height // w, w, width // w, w).transpose(2, 3).reshape(b, -1, 1, 1, w * w)
        return vis  # (B, tiles, 1, 1, area) against logits (B, tiles, heads, area, area)

    return keys


def scratch_masked_reference(model: ScratchViT, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    """The dense masked oracle of a ``ScratchViT``: its SDPA calls get the key mask, its convs the zeroing hook."""
    return dense_masked_reference(model, images, visible, stages=model.stage_names, key_mask_for=scratch_key_mask_for)
