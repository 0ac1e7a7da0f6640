"""Runtime operations that the passes insert into the rewritten graph.

Each takes packed features ``(T, C)`` plus the ``Sites`` they live on, and computes at the visible
positions what the dense op computes under masked-dense semantics. They read parameters from the
original timm modules, so the converted model shares every Parameter with the timm model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.attention_dispatch import requested_backend, resolve_backend
from .kernels.grouping import plan_buckets
from .kernels.sparse_conv import sparse_conv2d
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


def neighbours(fine: Sites, coarse: Sites, factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``(T_coarse, K)``: the fine token at each offset (dh, dw) of every coarse site's cell, -1 when masked."""
    off = torch.tensor(offsets, dtype=torch.long, device=coarse.device)
    rows = coarse.coords[:, :1] * factor[0] + off[None, :, 0]
    cols = coarse.coords[:, 1:] * factor[1] + off[None, :, 1]
    return fine.index_grid()[coarse.batch[:, None], rows, cols]


def _rows_or_zero(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``feats[index]`` with zero rows where ``index`` is -1 (masked positions read zeros)."""
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    return padded[torch.where(index < 0, torch.full_like(index, feats.shape[0]), index)]


def space_to_depth(
    feats: torch.Tensor, fine: Sites, coarse: Sites, factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]],
    channel_index: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Gather the ``factor`` neighbourhood of each coarse site into its features (patch merging).

    ``offsets`` lists the fine neighbours (dh, dw) in feature order; masked neighbours read zeros.
    ``channel_index`` reorders the gathered ``(offset, channel)`` features when they are not
    offset-major (None for the usual layout).
    """
    nbr = neighbours(fine, coarse, factor, offsets)
    out = _rows_or_zero(feats, nbr).reshape(coarse.num_tokens, len(offsets) * feats.shape[1])
    if channel_index is None:
        return out
    return out.index_select(1, torch.tensor(channel_index, dtype=torch.long, device=feats.device))


def conv_per_unit(feats: torch.Tensor, fine: Sites, coarse: Sites, conv: nn.Conv2d) -> torch.Tensor:
    """Kernel == stride Conv2d on packed tokens: gather each output's k x k inputs, then one GEMM."""
    kh, kw = conv.kernel_size
    offsets = [(dh, dw) for dh in range(kh) for dw in range(kw)]
    patches = space_to_depth(feats, fine, coarse, (kh, kw), offsets)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    out = patches.matmul(weight.t())
    return out + conv.bias if conv.bias is not None else out


def sparse_conv(feats: torch.Tensor, in_sites: Sites, out_sites: Sites, conv: nn.Conv2d) -> torch.Tensor:
    """Any Conv2d on packed tokens: masked inputs read zero, evaluated at the visible output sites."""
    return sparse_conv2d(
        feats, in_sites, out_sites, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


def image_sparse_conv(images: torch.Tensor, pixels: Sites, out_sites: Sites, conv: nn.Conv2d) -> torch.Tensor:
    """A Conv2d on the image that is not a patchify conv: the visible pixels are its input sites."""
    feats = images.permute(0, 2, 3, 1)[pixels.batch, pixels.coords[:, 0], pixels.coords[:, 1]]
    return sparse_conv(feats, pixels, out_sites, conv)


def mean_pool(feats: torch.Tensor, fine: Sites, coarse: Sites, factor: int) -> torch.Tensor:
    """Kernel == stride average pooling that averages the visible positions of each cell."""
    if factor == 1:
        return feats
    nbr = neighbours(fine, coarse, (factor, factor), [(dh, dw) for dh in range(factor) for dw in range(factor)])
    valid = nbr >= 0
    summed = _rows_or_zero(feats, nbr).sum(1)
    return summed / valid.sum(1, keepdim=True).clamp_min(1).to(feats.dtype)


def channel_slice(feats: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of packed features (one part of a fused q/k/v projection)."""
    return feats[:, start:stop]


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
class Bucket:
    """Groups of one size: ``(G, g)`` slots with the token, window id and in-window position of each."""

    group_size: int
    num_groups: int
    index: torch.Tensor      # (G*g,) token of each slot; padding slots read token 0 (no real query sees them)
    segment: torch.Tensor    # (G, g) window id per slot; unique negative ids on padding
    position: torch.Tensor   # (G, g) in-window position per slot
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        return self.group_size * self.num_groups

    def pair_index(self, window_area: int) -> torch.Tensor:
        """``(G*g*g,)`` index into a flattened ``(N, N)`` window bias for every (query, key) slot pair."""
        key = ("pair", window_area)
        if key not in self._cache:
            pos = self.position
            self._cache[key] = (pos[:, :, None] * window_area + pos[:, None, :]).reshape(-1)
        return self._cache[key]

    def block_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``(G*g*g,)`` additive mask: 0 for slot pairs of one window, -inf across windows and padding."""
        key = ("mask", dtype)
        if key not in self._cache:
            seg = self.segment
            same = (seg[:, :, None] == seg[:, None, :]).reshape(-1)
            mask = torch.zeros(same.shape, dtype=dtype, device=seg.device)
            self._cache[key] = mask.masked_fill_(~same, float("-inf"))
        return self._cache[key]


@dataclass
class Grouping:
    """Packed groups of one (grid, window, shift), in buckets of one group size each.

    Computed once per forward and shared by every attention block of that stage and shift.
    ``slot`` maps every token to its slot in the concatenation of the buckets' slots.
    """

    buckets: List[Bucket]
    slot: torch.Tensor
    num_tokens: int
    logits: int              # sum over buckets of G * g^2: attention logits per head
    lower_bound: int         # sum of squared window counts: every window alone, no padding

    @property
    def num_groups(self) -> int:
        return sum(b.num_groups for b in self.buckets)

    def describe(self) -> str:
        return " + ".join(f"{b.num_groups}x{b.group_size}" for b in self.buckets) or "empty"


def _bucket(packing, seg: torch.Tensor, pos: torch.Tensor, rank: torch.Tensor, offset: int) -> Tuple[Bucket, torch.Tensor, torch.Tensor]:
    """One packing's slots; returns the bucket, its tokens and their global slots."""
    g, n = int(packing.group_size), int(packing.num_groups)
    group = packing.seg_group[seg]
    tokens = (group >= 0).nonzero().squeeze(1)
    local = group[tokens] * g + packing.seg_offset[seg[tokens]] + rank[tokens]
    dev = seg.device
    index = torch.zeros(n * g, dtype=torch.long, device=dev)
    index[local] = tokens
    segment = -1 - torch.arange(n * g, device=dev)
    segment[local] = seg[tokens]
    position = torch.zeros(n * g, dtype=torch.long, device=dev)
    position[local] = pos[tokens]
    return Bucket(g, n, index, segment.view(n, g), position.view(n, g)), tokens, local + offset


# Cost of one more attention bucket per block, forward and backward, in logits per head: on the CPU
# the ~15 extra small ops of a bucket cost about 1 ms, the time of ~2e4 logits per head of Swin-T's
# first stage; on CUDA a bucket is ~15 kernel launches (a first estimate, not measured here).
CALL_OVERHEAD_LOGITS = {"cpu": 20000.0, "cuda": 4096.0}


def window_grouping(sites: Sites, window: Tuple[int, int], shift: Tuple[int, int], split_seam: bool, strategy: str) -> Grouping:
    """Segment the visible tokens into (shifted) windows and pack the windows into groups."""
    spec = WindowSpec(tuple(window), tuple(shift), split_seam)
    seg, pos, num_seg = window_segments(sites.batch, sites.coords, sites.grid, sites.batch_size, spec)
    t = sites.num_tokens
    dev = seg.device
    counts = torch.bincount(seg, minlength=num_seg)
    overhead = CALL_OVERHEAD_LOGITS.get(dev.type, CALL_OVERHEAD_LOGITS["cpu"])
    packings = plan_buckets(counts, window[0] * window[1], strategy=strategy, call_overhead=overhead) if t else []
    order = torch.argsort(seg, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(t, dtype=torch.long, device=dev)
    rank[order] = torch.arange(t, device=dev) - starts[seg[order]]
    slot = torch.empty(t, dtype=torch.long, device=dev)
    buckets, offset = [], 0
    for packing in packings:
        if int(packing.num_groups) == 0:
            continue
        bucket, tokens, slots = _bucket(packing, seg, pos, rank, offset)
        slot[tokens] = slots
        buckets.append(bucket)
        offset += bucket.num_slots
    logits = sum(b.num_slots * b.group_size for b in buckets)
    return Grouping(buckets, slot, t, logits, int((counts * counts).sum().item()))


def group_attention_triton(*args, **kwargs) -> torch.Tensor:
    """The fused Triton kernel, imported on first use so CPU-only installs never load it."""
    from .kernels.triton_group_attention import group_attention_triton as fused

    return fused(*args, **kwargs)


Scores = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _window_attention(
    qkv: torch.Tensor, grouping: Grouping, heads: int, window_bias: Optional[torch.Tensor], area: int,
    scores: Scores, dropout_p: float, fused: Optional[Callable] = None,
) -> torch.Tensor:
    """Attention of packed tokens inside their windows, bucket by bucket; returns ``(T, heads * d)``.

    ``qkv`` is ``(T, 3 * heads * d)``; ``window_bias`` ``(heads, N * N)`` is the relative-position
    bias of one window; ``scores(q, k, G)`` gives the ``(heads * G, g, g)`` logits before the bias;
    ``fused``, when given, runs a bucket in one kernel instead. Groups are laid out heads-major,
    ``(heads * G, g, d)``, so q, k, v come out of one gather per bucket contiguous.
    """
    t = qkv.shape[0]
    dim = qkv.shape[-1] // (3 * heads)
    qkv = qkv.view(t, 3 * heads, dim).transpose(0, 1)
    outs = []
    for b in grouping.buckets:
        g, n = b.group_size, b.num_groups
        q, k, v = qkv.index_select(1, b.index).view(3, heads * n, g, dim).unbind(0)
        if fused is not None:
            q4, k4, v4 = (x.view(heads, n, g, dim).transpose(0, 1) for x in (q, k, v))
            out = fused(q4, k4, v4, b.segment, b.position, window_bias.view(heads, area, area))
            outs.append(out.transpose(0, 1).reshape(heads, n * g, dim))
            continue
        if window_bias is None:
            bias = b.block_mask(qkv.dtype).view(1, n, g, g).expand(heads, n, g, g).reshape(heads * n, g, g)
        else:
            bias = (window_bias.index_select(1, b.pair_index(area)) + b.block_mask(qkv.dtype)).view(heads * n, g, g)
        probs = (scores(q, k, n) + bias).softmax(dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, dropout_p, training=True)
        outs.append(torch.bmm(probs, v).view(heads, n * g, dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.index_select(1, grouping.slot).transpose(0, 1).reshape(t, heads * dim)


def _window_bias(table: torch.Tensor, index: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``(heads, N * N)`` bias of a window from a per-relative-position table and timm's index."""
    area = index.shape[0]
    return table[index.view(-1)].view(area * area, heads).t().to(dtype)


def swin_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm Swin ``WindowAttention`` on packed tokens: qkv/proj on (T, C), attention on padded groups."""
    if not grouping.buckets:
        return attn.proj_drop(attn.proj(x.new_zeros(0, attn.proj.in_features)))
    heads, scale = attn.num_heads, attn.scale
    qkv = attn.qkv(x)
    area = attn.relative_position_index.shape[0]
    bias = _window_bias(attn.relative_position_bias_table, attn.relative_position_index, heads, x.dtype)
    p = attn.attn_drop.p if attn.training else 0.0
    probe = qkv.new_empty(0, 0, 0, qkv.shape[-1] // (3 * heads))
    fused = None
    if resolve_backend(probe, p, backend) == "triton":
        fused = lambda q, k, v, seg, pos, b: group_attention_triton(q, k, v, seg, pos, b, scale)  # noqa: E731

    def scores(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        return torch.bmm(q, k.transpose(1, 2)).mul_(scale)

    out = _window_attention(qkv, grouping, heads, bias, area, scores, p, fused)
    return attn.proj_drop(attn.proj(out))


def swinv2_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm Swin V2 ``WindowAttention``: cosine attention, learned logit scale, continuous position bias."""
    if not grouping.buckets:
        return attn.proj_drop(attn.proj(x.new_zeros(0, attn.proj.in_features)))
    if requested_backend(backend) == "triton":
        raise RuntimeError("the fused Triton kernel computes dot-product attention; Swin V2's cosine attention "
                           "runs on the PyTorch path (attention_backend='auto' or 'torch')")
    heads = attn.num_heads
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + qkv_bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, qkv_bias)
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
    area = attn.relative_position_index.shape[0]
    bias = 16 * torch.sigmoid(_window_bias(table, attn.relative_position_index, heads, x.dtype))
    p = attn.attn_drop.p if attn.training else 0.0
    out = _window_attention(qkv, grouping, heads, bias, area, _cosine_scores(attn.logit_scale, heads, x.dtype), p)
    return attn.proj_drop(attn.proj(out))


def swinv2cr_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm Swin V2 CR ``WindowMultiHeadAttention``: cosine attention with a meta-MLP position bias."""
    if requested_backend(backend) == "triton":
        raise RuntimeError("the fused Triton kernel computes dot-product attention; Swin V2 CR's cosine attention "
                           "runs on the PyTorch path (attention_backend='auto' or 'torch')")
    if not grouping.buckets:
        return attn.proj_drop(attn.proj(x.new_zeros(0, attn.proj.in_features)))
    heads = attn.num_heads
    area = attn.window_size[0] * attn.window_size[1]
    bias = attn.meta_mlp(attn.relative_coordinates_log).transpose(1, 0).reshape(heads, area * area).to(x.dtype)
    p = attn.attn_drop.p if attn.training else 0.0
    out = _window_attention(attn.qkv(x), grouping, heads, bias, area, _cosine_scores(attn.logit_scale, heads, x.dtype), p)
    return attn.proj_drop(attn.proj(out))


def twins_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm Twins ``LocallyGroupedAttn``: plain attention inside ws x ws windows of the token grid."""
    if not grouping.buckets:
        return attn.proj_drop(attn.proj(x.new_zeros(0, attn.proj.in_features)))
    heads, scale = attn.num_heads, attn.scale
    p = attn.attn_drop.p if attn.training else 0.0
    if requested_backend(backend) == "triton":
        raise RuntimeError("the fused Triton kernel needs a relative-position bias; Twins' locally-grouped "
                           "attention runs on the PyTorch path (attention_backend='auto' or 'torch')")

    def scores(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        return torch.bmm(q, k.transpose(1, 2)).mul_(scale)

    out = _window_attention(attn.qkv(x), grouping, heads, None, attn.ws * attn.ws, scores, p)
    return attn.proj_drop(attn.proj(out))


def _cosine_scores(logit_scale: torch.Tensor, heads: int, dtype: torch.dtype) -> Scores:
    """Scaled cosine similarity of queries and keys (Swin V2), with the per-head learned, clamped scale."""
    scale = torch.clamp(logit_scale.reshape(heads), max=math.log(1.0 / 0.01)).exp().view(heads, 1, 1, 1).to(dtype)

    def scores(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        cos = torch.bmm(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(1, 2))
        return (cos.view(heads, n, *cos.shape[1:]) * scale).view_as(cos)

    return scores


def global_attention(
    q: torch.Tensor, q_sites: Sites, k: torch.Tensor, k_sites: Sites, v: torch.Tensor, heads: int,
    scale: Optional[float] = None, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Every visible query of a sample attends to the visible keys of that sample (padded per sample)."""
    qp, _ = q_sites.pad(q)
    kp, kvalid = k_sites.pad(k)
    vp, _ = k_sites.pad(v)
    b, nq, nk = qp.shape[0], qp.shape[1], kp.shape[1]
    qh = qp.view(b, nq, heads, -1).transpose(1, 2)
    kh = kp.view(b, nk, heads, -1).transpose(1, 2)
    vh = vp.view(b, nk, heads, -1).transpose(1, 2)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    neg = torch.tensor(torch.finfo(q.dtype).min / 2, dtype=q.dtype, device=q.device)
    mask = torch.where(kvalid, zero, neg)[:, None, None, :]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return q_sites.unpad(out.transpose(1, 2).reshape(b, nq, -1))


def tokens(feats: torch.Tensor, sites: Sites) -> VisibleTokens:
    return VisibleTokens(feats, sites)


def green_output(last: VisibleTokens, stages: List[VisibleTokens]) -> GreenOutput:
    return GreenOutput(last, list(stages))


def davit_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm DaViT ``WindowAttention``: plain scaled dot-product attention inside windows, no bias."""
    if requested_backend(backend) == "triton":
        raise RuntimeError("the fused Triton kernel needs a relative-position bias; DaViT's window attention "
                           "runs on the PyTorch path (attention_backend='auto' or 'torch')")
    if not grouping.buckets:
        return attn.proj(x.new_zeros(0, attn.proj.in_features))
    heads, scale = attn.num_heads, attn.scale

    def scores(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        return torch.bmm(q, k.transpose(1, 2)).mul_(scale)

    area = attn.window_size[0] * attn.window_size[1]
    return attn.proj(_window_attention(attn.qkv(x), grouping, heads, None, area, scores, 0.0))


def channel_attention(x: torch.Tensor, sites: Sites, attn: nn.Module) -> torch.Tensor:
    """timm DaViT ``ChannelAttention`` / ``ChannelAttentionV2`` with token sums over each sample's visible tokens.

    q, k, v are padded per sample after the qkv projection, so padding rows are exact zeros and add
    nothing to the ``(head_dim, head_dim)`` channel logits.
    """
    v2 = hasattr(attn, "dynamic_scale")
    heads = attn.groups if v2 else attn.num_heads
    qkv, _ = sites.pad(attn.qkv(x))
    b, n, c3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    if not v2:
        logits, values = (k * attn.scale).transpose(-1, -2) @ v, q
    else:
        if attn.dynamic_scale:
            scale = sites.counts().clamp_min(1).to(q.dtype).rsqrt().view(b, 1, 1, 1)
        else:
            scale = attn.head_dim ** -0.5
        logits, values = (q * scale).transpose(-1, -2) @ k, v
    out = values @ logits.softmax(dim=-1).transpose(-1, -2)
    return attn.proj(sites.unpad(out.transpose(1, 2).reshape(b, n, c3 // 3)))


def sample_mean(feats: torch.Tensor, sites: Sites) -> torch.Tensor:
    """``(B, C)`` mean of every sample's visible tokens (a global average under masked-dense semantics)."""
    summed = feats.new_zeros(sites.batch_size, feats.shape[1]).index_add(0, sites.batch, feats)
    return summed / sites.counts().clamp_min(1).to(feats.dtype)[:, None]


def sample_to_tokens(per_sample: torch.Tensor, sites: Sites) -> torch.Tensor:
    """Broadcast ``(B, C)`` per-sample values to the ``(T, C)`` tokens of their samples."""
    return per_sample.index_select(0, sites.batch)


def pointwise_conv(feats: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution (stride 1, groups 1) is a Linear over the channels of every token."""
    return F.linear(feats, conv.weight.flatten(1), conv.bias)
