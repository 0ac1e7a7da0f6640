"""Runtime operations that the passes insert into the rewritten graph.

Each takes packed features ``(T, C)`` plus the ``Sites`` they live on, and computes at the visible
positions what the dense op computes under masked-dense semantics. They read parameters from the
original timm modules, so the converted model shares every Parameter with the timm model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .kernels.grouping import pack_segments
from .kernels.windows import WindowSpec, window_segments
from .sites import Sites
from .tokens import GreenOutput, VisibleTokens


def visible_sites(visible: torch.Tensor, grid: Tuple[int, int], stride: int) -> Sites:
    """The visible cells of a grid at ``stride`` pixels per cell."""
    return Sites.from_mask(visible, grid, stride)


def patch_embed(images: torch.Tensor, sites: Sites, conv: nn.Conv2d) -> torch.Tensor:
    """Conv2d with kernel == stride evaluated only on the patches at ``sites``: a per-patch linear."""
    b, c, h, w = images.shape
    ph, pw = conv.kernel_size
    gh, gw = sites.grid
    cells = images[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    patches = cells[sites.batch, sites.coords[:, 0], sites.coords[:, 1]].reshape(sites.num_tokens, c * ph * pw)
    weight = conv.weight.reshape(conv.out_channels, -1)
    out = patches.matmul(weight.t())
    return out + conv.bias if conv.bias is not None else out


def space_to_depth(
    feats: torch.Tensor, fine: Sites, coarse: Sites, factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]],
    channel_index: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Gather the ``factor`` neighbourhood of each coarse site into its features (patch merging).

    ``offsets`` lists the fine neighbours (dh, dw) in feature order; masked neighbours read zeros.
    ``channel_index`` reorders the gathered ``(offset, channel)`` features when they are not
    offset-major (None for the usual layout).
    """
    fh, fw = factor
    grid = fine.index_grid()
    off = torch.tensor(offsets, dtype=torch.long, device=feats.device)
    rows = coarse.coords[:, :1] * fh + off[None, :, 0]
    cols = coarse.coords[:, 1:] * fw + off[None, :, 1]
    nbr = grid[coarse.batch[:, None], rows, cols]
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    nbr = torch.where(nbr < 0, torch.full_like(nbr, feats.shape[0]), nbr)
    out = padded[nbr].reshape(coarse.num_tokens, len(offsets) * feats.shape[1])
    if channel_index is None:
        return out
    return out.index_select(1, torch.tensor(channel_index, dtype=torch.long, device=feats.device))


def drop_path(feats: torch.Tensor, sites: Sites, module: nn.Module) -> torch.Tensor:
    """Stochastic depth per *sample* (as timm's DropPath), applied to that sample's tokens."""
    p = float(getattr(module, "drop_prob", 0.0))
    if not module.training or p == 0.0:
        return feats
    keep = 1.0 - p
    mask = feats.new_empty((sites.batch_size,)).bernoulli_(keep)
    if getattr(module, "scale_by_keep", True) and keep > 0.0:
        mask.div_(keep)
    return feats * mask[sites.batch][:, None]


@dataclass
class Grouping:
    """Packed groups of one (grid, window, shift): shared by every attention block that uses them."""

    group_size: int
    num_groups: int
    index: torch.Tensor      # (G*g,) token of each slot; num_tokens for padding (reads a zero row)
    slot: torch.Tensor       # (T,) slot of each token
    segment: torch.Tensor    # (G, g) window id per slot; unique negative ids on padding
    position: torch.Tensor   # (G, g) in-window position per slot
    num_tokens: int
    logits: int              # g^2 * G: attention logits per head
    lower_bound: int         # sum of squared window counts

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        return padded.index_select(0, self.index)

    def scatter(self, slots: torch.Tensor) -> torch.Tensor:
        return slots.index_select(0, self.slot)


def window_grouping(sites: Sites, window: Tuple[int, int], shift: Tuple[int, int], split_seam: bool, strategy: str) -> Grouping:
    """Segment the visible tokens into (shifted) windows and pack the windows into groups."""
    spec = WindowSpec(tuple(window), tuple(shift), split_seam)
    seg, pos, num_seg = window_segments(sites.batch, sites.coords, sites.grid, sites.batch_size, spec)
    t = sites.num_tokens
    dev = seg.device
    counts = torch.bincount(seg, minlength=num_seg)
    packing = pack_segments(counts, window[0] * window[1], strategy)
    g, n_groups = int(packing.group_size), int(packing.num_groups)
    order = torch.argsort(seg, stable=True)
    seg_sorted = seg[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(t, device=dev) - starts[seg_sorted]
    slot = torch.empty(t, dtype=torch.long, device=dev)
    slot[order] = packing.seg_group[seg_sorted] * g + packing.seg_offset[seg_sorted] + rank
    n_slots = n_groups * g
    index = torch.full((n_slots,), t, dtype=torch.long, device=dev)
    index[slot] = torch.arange(t, device=dev)
    segment = -1 - torch.arange(n_slots, device=dev)
    segment[slot] = seg
    position = torch.zeros(n_slots, dtype=torch.long, device=dev)
    position[slot] = pos
    return Grouping(
        g, n_groups, index, slot, segment.view(n_groups, g), position.view(n_groups, g), t,
        logits=n_slots * g, lower_bound=int((counts * counts).sum().item()),
    )


def _group_attention(q, k, v, segment, position, bias, scale, dropout_p, backend):
    from .kernels.group_attention import group_attention_reference

    return group_attention_reference(q, k, v, segment, position, bias, scale, dropout_p)


def swin_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm ``WindowAttention`` on packed tokens: qkv/proj on (T, C), attention on padded groups."""
    if grouping.num_groups == 0:
        return attn.proj_drop(attn.proj(x.new_zeros(0, attn.proj.in_features)))
    heads = attn.num_heads
    qkv = attn.qkv(x)
    dim = qkv.shape[-1] // (3 * heads)
    g, n = grouping.group_size, grouping.num_groups
    q, k, v = grouping.gather(qkv).view(n, g, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    area = attn.relative_position_index.shape[0]
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    bias = bias.view(area, area, heads).permute(2, 0, 1)
    p = attn.attn_drop.p if attn.training else 0.0
    out = _group_attention(q, k, v, grouping.segment, grouping.position, bias, attn.scale, p, backend)
    out = grouping.scatter(out.transpose(1, 2).reshape(n * g, heads * dim))
    return attn.proj_drop(attn.proj(out))


def tokens(feats: torch.Tensor, sites: Sites) -> VisibleTokens:
    return VisibleTokens(feats, sites)


def green_output(last: VisibleTokens, stages: List[VisibleTokens]) -> GreenOutput:
    return GreenOutput(last, list(stages))
