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
from .gather import RowMap
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
    """``feats[index]`` with zero rows where ``index`` is -1 (masked positions read zeros).

    The valid entries must be distinct (cells of a kernel == stride neighbourhood), so the gather
    is a partial permutation and its backward a gather too (``RowMap``).
    """
    rows = RowMap.from_index(index, feats.shape[0])(feats)
    return rows.view(*index.shape, *feats.shape[1:])


def _check_cell_offsets(factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]]) -> None:
    """Offsets must be distinct cells of the ``factor`` cell: every fine token then feeds one output row."""
    inside = all(0 <= dh < factor[0] and 0 <= dw < factor[1] for dh, dw in offsets)
    if not inside or len(set(map(tuple, offsets))) != len(offsets):
        raise ValueError(f"offsets {list(offsets)} are not distinct cells of a {tuple(factor)} neighbourhood")


def space_to_depth(
    feats: torch.Tensor, fine: Sites, coarse: Sites, factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]],
    channel_index: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Gather the ``factor`` neighbourhood of each coarse site into its features (patch merging).

    ``offsets`` lists the fine neighbours (dh, dw) in feature order; masked neighbours read zeros.
    ``channel_index`` reorders the gathered ``(offset, channel)`` features when they are not
    offset-major (None for the usual layout).
    """
    _check_cell_offsets(factor, offsets)
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

    def bias_columns(self, window_index: Optional[torch.Tensor], area: int, masked: int) -> torch.Tensor:
        """``(G*g*g,)`` column of every slot pair in a bias table whose column ``masked`` holds -inf.

        Pairs of one window read ``window_index[pos_i * area + pos_j]`` (that pair index itself
        when None), the others ``masked``: one gather then gives the bias and the block-diagonal
        mask together. Blocks of a stage pass equal index buffers, so a cached entry is found by
        value as well as by identity.
        """
        entries = self._cache.setdefault(("columns", area, masked), [])
        for key, columns in entries:
            if key is window_index or (key is not None and window_index is not None and key.shape == window_index.shape
                                       and torch.equal(key, window_index)):
                return columns
        pos, seg = self.position, self.segment
        columns = (pos[:, :, None] * area + pos[:, None, :]).reshape(-1)
        if window_index is not None:
            columns = window_index.reshape(-1).index_select(0, columns)
        columns.masked_fill_((seg[:, :, None] != seg[:, None, :]).reshape(-1), masked)
        entries.append((window_index, columns))
        return columns


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
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_groups(self) -> int:
        return sum(b.num_groups for b in self.buckets)

    def describe(self) -> str:
        return " + ".join(f"{b.num_groups}x{b.group_size}" for b in self.buckets) or "empty"

    def slot_rows(self, heads: int, parts: int) -> RowMap:
        """Rows of ``(T * parts * heads, d)`` token features into bucket layout, and back by ``.t()``.

        Bucket after bucket, the rows are ordered ``(parts, heads, G * g)``, so a bucket's block is
        ``(parts, heads * G, g, d)``: q, k, v (parts=3) or the output (parts=1) of every group,
        heads-major. Padding slots read zero rows. Slot ``s`` of a bucket starting at slot ``o`` with
        ``n`` slots holds lane ``l`` at row ``(width - 1) * o + s + l * n``: both directions of the
        map are closed-form, with no scatter or search per call.
        """
        key = (heads, parts)
        if key not in self._cache:
            width = parts * heads
            lanes = torch.arange(width, device=self.slot.device)
            index = torch.cat([(b.index[None, :] * width + lanes[:, None]).reshape(-1) for b in self.buckets])
            (slot, first, span), pad = self._slot_layout()
            inverse = torch.addcmul(((width - 1) * first + slot)[:, None], lanes, span[:, None])
            empty = None
            if pad[0].numel():
                empty = torch.addcmul(((width - 1) * pad[1] + pad[0])[None, :], lanes[:, None], pad[2]).reshape(-1)
            self._cache[key] = RowMap(index, empty, inverse.reshape(-1), None)
        return self._cache[key]

    def _slot_layout(self) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
        """(slot, first slot of its bucket, slot count of its bucket) of every token, then of every padding slot."""
        if "layout" not in self._cache:
            dev = self.slot.device
            starts = [0]
            for b in self.buckets:
                starts.append(starts[-1] + b.num_slots)
            first = torch.cat([torch.full((b.num_slots,), o, device=dev) for b, o in zip(self.buckets, starts)])
            span = torch.cat([torch.full((b.num_slots,), b.num_slots, device=dev) for b in self.buckets])
            pad = (torch.cat([b.segment.reshape(-1) for b in self.buckets]) < 0).nonzero().squeeze(1)
            tokens = tuple(x.index_select(0, self.slot) for x in (first, span))
            pads = tuple(x.index_select(0, pad) for x in (first, span))
            self._cache["layout"] = ((self.slot, *tokens), (pad, *pads))
        return self._cache["layout"]


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


@dataclass(frozen=True)
class DotScores:
    """Scaled dot-product logits ``scale * q k^T``; with a bias they fuse into one ``baddbmm``."""

    scale: float

    def __call__(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        return torch.bmm(q, k.transpose(1, 2)).mul_(self.scale)

    def with_bias(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias + scale * q k^T`` in one GEMM (one pass over the logits less, forward and backward)."""
        return torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale)


def _bias_table(window_bias: Optional[torch.Tensor], window_index: Optional[torch.Tensor], heads: int, area: int,
                like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(heads, K + 1)`` bias table with -inf in its last column, and the ``(N * N,)`` column of each window pair."""
    if window_bias is None:
        window_bias = like.new_zeros(heads, 1)
        window_index = torch.zeros(area * area, dtype=torch.long, device=like.device)
    elif window_index is None:
        window_index = torch.arange(area * area, device=like.device)
    table = window_bias.to(like.dtype)
    return torch.cat([table, table.new_full((heads, 1), float("-inf"))], dim=1), window_index.reshape(-1)


def _window_attention(
    qkv: torch.Tensor, grouping: Grouping, heads: int, window_bias: Optional[torch.Tensor], area: int,
    scores: Scores, dropout_p: float, fused: Optional[Callable] = None, window_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of packed tokens inside their windows, bucket by bucket; returns ``(T, heads * d)``.

    ``qkv`` is ``(T, 3 * heads * d)``; ``window_bias`` ``(heads, N * N)`` is the relative-position
    bias of one window, or, with ``window_index`` ``(N * N,)``, a ``(heads, K)`` table read at those
    columns (None: no bias); ``scores(q, k, G)`` gives the ``(heads * G, g, g)`` logits before the
    bias; ``fused``, when given, runs a bucket in one kernel instead. Groups are laid out
    heads-major, ``(heads * G, g, d)``, and q, k, v of every bucket come out of one row gather.
    """
    t = qkv.shape[0]
    dim = qkv.shape[-1] // (3 * heads)
    sizes = [heads * b.num_slots for b in grouping.buckets for _ in range(3)]
    blocks = grouping.slot_rows(heads, 3).split(qkv.reshape(t * 3 * heads, dim), sizes)
    table, window_index = _bias_table(window_bias, window_index, heads, area, qkv)
    if fused is not None:
        one_window = table.index_select(1, window_index).view(heads, area, area)
    outs = []
    for i, b in enumerate(grouping.buckets):
        g, n = b.group_size, b.num_groups
        q, k, v = (x.view(heads * n, g, dim) for x in blocks[3 * i: 3 * i + 3])
        if fused is not None:
            q4, k4, v4 = (x.view(heads, n, g, dim).transpose(0, 1) for x in (q, k, v))
            out = fused(q4, k4, v4, b.segment, b.position, one_window)
            outs.append(out.transpose(0, 1).reshape(heads * n * g, dim))
            continue
        columns = b.bias_columns(window_index, area, table.shape[1] - 1)
        bias = table.index_select(1, columns).view(heads * n, g, g)
        logits = scores.with_bias(q, k, bias) if isinstance(scores, DotScores) else scores(q, k, n) + bias
        probs = logits.softmax(dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, dropout_p, training=True)
        outs.append(torch.bmm(probs, v).view(heads * n * g, dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return grouping.slot_rows(heads, 1).t()(out).view(t, heads * dim)


def swin_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm Swin ``WindowAttention`` on packed tokens: qkv/proj on (T, C), attention on padded groups."""
    if not grouping.buckets:
        return attn.proj_drop(attn.proj(x.new_zeros(0, attn.proj.in_features)))
    heads, scale = attn.num_heads, attn.scale
    qkv = attn.qkv(x)
    area = attn.relative_position_index.shape[0]
    table = attn.relative_position_bias_table.t()
    p = attn.attn_drop.p if attn.training else 0.0
    probe = qkv.new_empty(0, 0, 0, qkv.shape[-1] // (3 * heads))
    fused = None
    if resolve_backend(probe, p, backend) == "triton":
        fused = lambda q, k, v, seg, pos, b: group_attention_triton(q, k, v, seg, pos, b, scale)  # noqa: E731
    out = _window_attention(qkv, grouping, heads, table, area, DotScores(scale), p, fused,
                            window_index=attn.relative_position_index)
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
    bias = 16 * torch.sigmoid(table.t())
    p = attn.attn_drop.p if attn.training else 0.0
    out = _window_attention(qkv, grouping, heads, bias, area, _cosine_scores(attn.logit_scale, heads, x.dtype), p,
                            window_index=attn.relative_position_index)
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


def _plain_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, area: int, dropout_p: float,
                            backend: str, family: str) -> torch.Tensor:
    """Scaled dot-product attention inside windows with no position bias (Twins, DaViT), before ``proj``."""
    if requested_backend(backend) == "triton":
        raise RuntimeError(f"the fused Triton kernel needs a relative-position bias; {family} "
                           "runs on the PyTorch path (attention_backend='auto' or 'torch')")
    if not grouping.buckets:
        return x.new_zeros(0, attn.proj.in_features)
    return _window_attention(attn.qkv(x), grouping, attn.num_heads, None, area, DotScores(attn.scale), dropout_p)


def twins_window_attention(x: torch.Tensor, grouping: Grouping, attn: nn.Module, backend: str = "auto") -> torch.Tensor:
    """timm Twins ``LocallyGroupedAttn``: plain attention inside ws x ws windows of the token grid."""
    p = attn.attn_drop.p if attn.training else 0.0
    out = _plain_window_attention(x, grouping, attn, attn.ws * attn.ws, p, backend, "Twins' locally-grouped attention")
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
    area = attn.window_size[0] * attn.window_size[1]
    return attn.proj(_plain_window_attention(x, grouping, attn, area, 0.0, backend, "DaViT's window attention"))


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
