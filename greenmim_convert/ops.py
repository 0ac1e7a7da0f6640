"""Runtime operations that the passes insert into the rewritten graph.

Each takes packed features ``(T, C)`` plus the ``Sites`` they live on, and computes at the visible
positions what the dense op computes under masked-dense semantics. Weights arrive as the source
model's own Parameters (graph inputs), so the converted model shares every Parameter with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .kernels.grouping import plan_buckets
from .kernels.sparse_conv import cached_neighbor_map, sparse_conv2d
from .attention import term_offsets
from .kernels.windows import DigitWindows, WindowSpec, digit_segments, digit_sum, window_segments
from .gather import RowMap
from .sites import PrefixedSites, Sites
from .table_einsum import PositionBuckets, table_einsum
from .tokens import GreenOutput, VisibleTokens


def recompute(subgraph: torch.nn.Module, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``subgraph(*inputs)`` keeping only ``inputs`` for backward: when a gradient is needed, the subgraph runs
    again in backward with the same random draws (``torch.utils.checkpoint``); without grad it just runs."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return checkpoint(subgraph, *inputs, use_reentrant=False)
    return subgraph(*inputs)


def dropout_noise(like: torch.Tensor, shape: Sequence[int], p: float) -> torch.Tensor:
    """The scaled keep mask a training-mode ``dropout(x, p)`` of ``shape`` multiplies ``x`` by, on ``like``'s device
    and dtype: ``aten.dropout``'s own draw, so the random stream and the kept elements are the unconverted model's.

    On the CPU that is ``empty.bernoulli_(1 - p).div_(1 - p)``, exactly what ATen's dropout computes; elsewhere it is
    ``dropout`` of ones (the fused kernel's draw).
    """
    if like.device.type == "cpu":
        return torch.empty(shape, dtype=like.dtype).bernoulli_(1 - p).div_(1 - p)
    return torch.dropout(torch.ones(shape, dtype=like.dtype, device=like.device), p, True)


def visible_sites(visible: torch.Tensor, grid: Tuple[int, int], stride: int) -> Sites:
    """The visible cells of a grid at ``stride`` pixels per cell."""
    return Sites.from_mask(visible, grid, stride)


def padded_sites(sites: Sites, border: Tuple[int, int, int, int]) -> Sites:
    """The sites of a grid padded by ``border`` (rows before and after, columns before and after): the visible
    sites, moved by the rows and columns added before them, and every padded position of every sample (the
    constant tokens a pad adds are always present), in canonical order."""
    top, bottom, left, right = border
    h, w = sites.grid
    grid = (h + top + bottom, w + left + right)

    def pads() -> torch.Tensor:
        inside = torch.zeros(grid, dtype=torch.bool, device=sites.device)
        inside[top:top + h, left:left + w] = True
        return (~inside).nonzero()

    pad = sites.memo(("padded positions", tuple(border)), pads)
    b = sites.batch_size
    batch = torch.cat([sites.batch, torch.arange(b, device=sites.device).repeat_interleave(pad.shape[0])])
    coords = torch.cat([sites.coords + torch.tensor([top, left], device=sites.device), pad.repeat(b, 1)])
    order = torch.argsort((batch * grid[0] + coords[:, 0]) * grid[1] + coords[:, 1])
    return Sites(batch[order], coords[order], grid, b, sites.stride)


def move_rows(feats: torch.Tensor, src: Sites, dst: Sites, shift: Tuple[int, int], fill: float) -> torch.Tensor:
    """Rows of ``dst``'s sites read from ``src``'s: the site at ``(row, col)`` reads ``src``'s at
    ``(row - shift[0], col - shift[1])``, or ``fill`` where that lies outside ``src``'s grid (a pad of the grid
    by ``shift`` before, or a crop by ``-shift``); every source row is read at most once."""
    def plan() -> Tuple[torch.Tensor, RowMap]:
        rows = dst.coords[:, 0] - shift[0]
        cols = dst.coords[:, 1] - shift[1]
        inside = (rows >= 0) & (rows < src.grid[0]) & (cols >= 0) & (cols < src.grid[1])
        found = src.index_grid()[dst.batch, rows.clamp(0, src.grid[0] - 1), cols.clamp(0, src.grid[1] - 1)]
        found = torch.where(inside, found, -1)
        return found < 0, RowMap.from_index(found, src.num_tokens)

    outside, rows = dst.memo(("rows from", id(src), tuple(shift)), plan)
    out = rows(feats)
    return torch.where(outside[:, None], torch.full_like(out, fill), out) if fill else out


def patch_embed(images: torch.Tensor, sites: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Conv2d with kernel == stride evaluated only on the patches at ``sites``: a per-patch linear."""
    b, c, h, w = images.shape
    ph, pw = weight.shape[2:]
    gh, gw = sites.grid
    cells = images[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    patches = cells[sites.batch, sites.coords[:, 0], sites.coords[:, 1]].reshape(sites.num_tokens, c * ph * pw)
    out = patches.matmul(weight.reshape(weight.shape[0], -1).t())
    return out + bias if bias is not None else out


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


def _rows_or_fill(feats: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    """``feats[index]`` with ``fill`` rows where ``index`` is -1; entries may repeat (overlapping pooling windows)."""
    padded = torch.cat([feats, feats.new_full((1, feats.shape[1]), fill)])
    rows = padded.index_select(0, torch.where(index >= 0, index, feats.shape[0]).reshape(-1))
    return rows.view(*index.shape, feats.shape[1])


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


def conv_per_unit(feats: torch.Tensor, fine: Sites, coarse: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Kernel == stride Conv2d on packed tokens: gather each output's k x k inputs, then one GEMM."""
    kh, kw = weight.shape[2:]
    offsets = [(dh, dw) for dh in range(kh) for dw in range(kw)]
    patches = space_to_depth(feats, fine, coarse, (kh, kw), offsets)
    out = patches.matmul(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t())
    return out + bias if bias is not None else out


def sparse_conv(feats: torch.Tensor, in_sites: Sites, out_sites: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride, padding, dilation, groups: int) -> torch.Tensor:
    """Any Conv2d on packed tokens: masked inputs read zero, evaluated at the visible output sites."""
    return sparse_conv2d(feats, in_sites, out_sites, weight, bias, stride, padding, dilation, groups)


def folded_depthwise_conv(feats: torch.Tensor, in_sites: Sites, out_sites: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          channel_index: Tuple[int, ...], stride, padding, dilation) -> torch.Tensor:
    """A depthwise Conv2d applied densely to heads folded into the batch: packed column ``j`` is filtered by
    channel ``channel_index[j]`` of the conv."""
    index = torch.tensor(channel_index, dtype=torch.long, device=feats.device)
    w = weight.index_select(0, index)
    b = bias.index_select(0, index) if bias is not None else None
    return sparse_conv(feats, in_sites, out_sites, w, b, stride, padding, dilation, len(channel_index))


def image_sparse_conv(images: torch.Tensor, pixels: Sites, out_sites: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      stride, padding, dilation, groups: int) -> torch.Tensor:
    """A Conv2d on the image that is not a patchify conv: the visible pixels are its input sites."""
    feats = images.permute(0, 2, 3, 1)[pixels.batch, pixels.coords[:, 0], pixels.coords[:, 1]]
    return sparse_conv(feats, pixels, out_sites, weight, bias, stride, padding, dilation, groups)


def mean_pool(feats: torch.Tensor, fine: Sites, coarse: Sites, factor: int) -> torch.Tensor:
    """Kernel == stride average pooling that averages the visible positions of each cell."""
    if factor == 1:
        return feats
    nbr = neighbours(fine, coarse, (factor, factor), [(dh, dw) for dh in range(factor) for dw in range(factor)])
    valid = nbr >= 0
    summed = _rows_or_zero(feats, nbr).sum(1)
    return summed / valid.sum(1, keepdim=True).clamp_min(1).to(feats.dtype)


def position_einsum(feats: torch.Tensor, sites: Sites, table: torch.Tensor, spec) -> torch.Tensor:
    """``einsum`` of packed tokens with a table whose leading axes are read at each token's position digits
    (``spec.spatial``, after the roll ``spec.offset``); ``spec`` names the packed channel digits (``EinsumSpec``)."""
    x = feats.reshape(feats.shape[0], *spec.sizes)
    if spec.spatial:
        digits = tuple(digit for _, digit in spec.spatial)
        lead = tuple(table.shape[:len(digits)])

        def index() -> Tuple[torch.Tensor, ...]:
            return tuple(digit_sum(sites.coords, sites.grid, spec.offset, [(*d, 1)]) for d in digits)

        found = sites.memo(("position digits", digits, tuple(spec.offset)), index)
        buckets = sites.memo(("position buckets", digits, tuple(spec.offset), lead),
                             lambda: PositionBuckets.from_index(found, lead))
        return table_einsum(spec.equation, x, table, found, buckets).reshape(feats.shape[0], -1)
    return torch.einsum(spec.equation, x, table).reshape(feats.shape[0], -1)


def channel_slice(feats: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of packed features (one part of a fused q/k/v projection)."""
    return feats[:, start:stop]


def channel_split(feats: torch.Tensor, sizes: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
    """Consecutive column ranges of packed features, all at once (so their gradients meet in one ``cat``)."""
    return torch.split(feats, list(sizes), dim=1)


def channel_gather(feats: torch.Tensor, columns: Tuple[int, ...]) -> torch.Tensor:
    """Columns of packed features that are not contiguous (a split of a minor channel digit)."""
    return feats.index_select(1, torch.tensor(columns, dtype=torch.long, device=feats.device))


def channel_op(op, feats: torch.Tensor, sizes: Sequence[int], positions: Sequence[int], kwargs: dict, out_channels: int) -> torch.Tensor:
    """A reduction or softmax over channel digits of packed rows: view the digits, apply ``op`` over them."""
    x = feats.reshape(feats.shape[0], *sizes)
    if not positions:  # over a size-one axis (a softmax of one logit per token)
        x, positions = x.unsqueeze(-1), [x.dim()]
    dim_arg = next(a for a in op._schema.arguments if a.name == "dim")
    dim = positions[0] if str(dim_arg.type) == "int" else list(positions)
    return op(x, dim=dim, **kwargs).reshape(feats.shape[0], out_channels)


def per_sample_creation(op, visible: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    """``torch.empty((B, 1, ..., 1))`` and friends as packed per-sample rows ``(B, 1)``."""
    return op([visible.shape[0], 1], *rest, **kwargs)


def per_sample_factory(op, like: torch.Tensor, sites: Sites, rest: tuple, kwargs: dict) -> torch.Tensor:
    """``new_empty``/``new_zeros``/... of one value per sample: ``(B, 1)`` packed per-sample rows."""
    return op(like, [sites.batch_size, 1], *rest, **kwargs)


@dataclass
class Bucket:
    """Groups of one size: ``(G, g)`` slots with the token, window id and in-window position of each."""

    group_size: int
    num_groups: int
    index: torch.Tensor      # (G*g,) token of each slot; padding slots read token 0 (no real query sees them)
    segment: torch.Tensor    # (G, g) window id per slot; unique negative ids on padding
    position: torch.Tensor   # (G, g) in-window position per slot

    @property
    def num_slots(self) -> int:
        return self.group_size * self.num_groups


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
    sites: Optional[Sites] = None
    windows: Optional[DigitWindows] = None
    _cache: dict = field(default_factory=dict, repr=False)

    def term_index(self, bucket: int, plan, head_sizes: Sequence[int], masked: Optional[int] = None) -> torch.Tensor:
        """``(G * g * g,)`` offset of a term's element, past its head's offset, for every (query slot, key slot)
        of a bucket (see ``attention.head_table``).

        With ``masked``, pairs of slots in different windows (or padding) read that offset instead.
        """
        key = ("term", bucket, plan, tuple(head_sizes), masked)
        if key not in self._cache:
            b = self.buckets[bucket]
            coords = self.sites.coords.index_select(0, b.index)
            _, q, k = term_offsets(plan, head_sizes, coords, self.windows.grid, self.windows.offset)
            g, n = b.group_size, b.num_groups
            index = q.view(n, g, 1) + k.view(n, 1, g)
            if masked is not None:
                index = index.masked_fill(self.cross_mask(bucket), masked)
            self._cache[key] = index.reshape(-1)
        return self._cache[key]

    def cross_mask(self, bucket: int) -> torch.Tensor:
        """``(G, g, g)`` True where query and key slot belong to different windows (or padding)."""
        key = ("cross", bucket)
        if key not in self._cache:
            seg = self.buckets[bucket].segment
            self._cache[key] = seg[:, :, None] != seg[:, None, :]
        return self._cache[key]

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


def digit_grouping(sites: Sites, windows: DigitWindows, labels: Optional[torch.Tensor], strategy: str) -> Grouping:
    """Segment the visible tokens into windows described by layout digits and pack them into groups."""
    if labels is not None:
        labels = labels.to(sites.device)
    seg, pos, num_seg = digit_segments(sites.batch, sites.coords, sites.batch_size, windows, labels)
    grouping = group_segments(seg, pos, num_seg, windows.area, strategy)
    grouping.sites, grouping.windows = sites, windows
    return grouping


def window_grouping(sites: Sites, window: Tuple[int, int], shift: Tuple[int, int], split_seam: bool, strategy: str) -> Grouping:
    """Segment the visible tokens into (shifted) rectangular windows and pack the windows into groups."""
    spec = WindowSpec(tuple(window), tuple(shift), split_seam)
    seg, pos, num_seg = window_segments(sites.batch, sites.coords, sites.grid, sites.batch_size, spec)
    return group_segments(seg, pos, num_seg, window[0] * window[1], strategy)


def group_segments(seg: torch.Tensor, pos: torch.Tensor, num_seg: int, area: int, strategy: str) -> Grouping:
    """Pack segments (windows) of at most ``area`` tokens into buckets of equal-size groups."""
    t = seg.shape[0]
    dev = seg.device
    counts = torch.bincount(seg, minlength=num_seg)
    overhead = CALL_OVERHEAD_LOGITS.get(dev.type, CALL_OVERHEAD_LOGITS["cpu"])
    packings = plan_buckets(counts, area, strategy=strategy, call_overhead=overhead) if t else []
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


def tokens(feats: torch.Tensor, sites: Sites) -> VisibleTokens:
    return VisibleTokens(feats, sites)


def green_output(last: VisibleTokens, stages: List[VisibleTokens]) -> GreenOutput:
    return GreenOutput(last, list(stages))


def sample_mean(feats: torch.Tensor, sites: Sites) -> torch.Tensor:
    """``(B, C)`` mean of every sample's visible tokens (a global average under masked-dense semantics)."""
    summed = feats.new_zeros(sites.batch_size, feats.shape[1]).index_add(0, sites.batch, feats)
    return summed / sites.counts().clamp_min(1).to(feats.dtype)[:, None]


def sample_reduce(op, feats: torch.Tensor, sites: Sites, kwargs: dict, sizes: Sequence[int] = (),
                  digits: Sequence[int] = ()) -> torch.Tensor:
    """A reduction over the whole grid (``sum``, ``mean``, ``linalg_vector_norm``, ``amax``, ``amin``)
    taken over each sample's visible tokens: ``(B, C)``. Padding rows are the op's neutral element.
    ``digits`` (indices into the channel digit ``sizes``) are reduced too: a group norm's statistics, over
    the visible positions and the channels of each group (every token holds all channels, so the two
    reductions compose)."""
    name = op.__name__.split(".")[0]
    if name == "mean":
        out = sample_mean(feats, sites)
    else:
        fill = {"amax": float("-inf"), "amin": float("inf")}.get(name, 0.0)
        padded, valid = sites.pad(feats)
        if fill:
            padded = padded.masked_fill(~valid[:, :, None], fill)
        out = op(padded, dim=[1], **kwargs)
    if not digits:
        return out
    return op(out.view(out.shape[0], *sizes), dim=[1 + d for d in digits]).reshape(out.shape[0], -1)


def cell_reduce(kind: str, feats: torch.Tensor, fine: Sites, coarse: Sites, factor: int) -> torch.Tensor:
    """``amax``, ``mean`` or ``sum`` over the visible positions of every ``factor`` x ``factor`` cell."""
    if kind == "mean":
        return mean_pool(feats, fine, coarse, factor)
    nbr = neighbours(fine, coarse, (factor, factor), [(dh, dw) for dh in range(factor) for dw in range(factor)])
    rows = _rows_or_fill(feats, nbr, float("-inf") if kind == "amax" else 0.0)
    return rows.amax(1) if kind == "amax" else rows.sum(1)


def max_pool(feats: torch.Tensor, in_sites: Sites, out_sites: Sites, kernel, stride, padding, dilation) -> torch.Tensor:
    """Max pooling at the visible output sites over the visible positions of each window."""
    nmap = cached_neighbor_map(in_sites, out_sites, kernel, stride, padding, dilation)
    return _rows_or_fill(feats, nmap, float("-inf")).amax(0)


def avg_pool(feats: torch.Tensor, in_sites: Sites, out_sites: Sites, kernel, stride, padding, count_include_pad: bool,
             divisor_override: Optional[int]) -> torch.Tensor:
    """Average pooling at the visible output sites: the sum over the visible positions of each window divided by
    their count (plus the window's padding positions when ``count_include_pad``, or ``divisor_override``)."""
    nmap = cached_neighbor_map(in_sites, out_sites, kernel, stride, padding)
    summed = _rows_or_fill(feats, nmap, 0.0).sum(0)
    if divisor_override:
        return summed / divisor_override
    count = (nmap >= 0).sum(0)
    if count_include_pad:
        count = count + _padding_positions(out_sites, in_sites.grid, kernel, stride, padding)
    return summed / count.clamp_min(1).to(feats.dtype)[:, None]


def _padding_positions(out_sites: Sites, grid: Tuple[int, int], kernel, stride, padding) -> torch.Tensor:
    """``(T_out,)`` number of positions of each output site's window that fall on the padding, outside the grid."""
    k, s, p = (kernel[0], kernel[1]), (stride[0], stride[1]), (padding[0], padding[1])
    inside = []
    for axis in range(2):
        first = out_sites.coords[:, axis] * s[axis] - p[axis]
        lo, hi = first.clamp_min(0), (first + k[axis]).clamp_max(grid[axis])
        inside.append((hi - lo).clamp_min(0))
    return k[0] * k[1] - inside[0] * inside[1]


def gather_constant(const: torch.Tensor, sites: Sites, spatial, roll: Tuple[int, int], channel_offsets: torch.Tensor) -> torch.Tensor:
    """A constant varying over positions (a position embedding), read at every visible token: ``(T, C)``.

    ``spatial`` lists ``(kind, size, inner, stride)`` digits of the dense index (rows ``h``, columns
    ``w``, after the layout's ``roll``) and where each sits in the constant.
    """
    offset = digit_sum(sites.coords, sites.grid, roll, spatial)
    index = offset[:, None] + channel_offsets.to(sites.device)[None, :]
    return const.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)


def sample_to_tokens(per_sample: torch.Tensor, sites: Sites) -> torch.Tensor:
    """Broadcast ``(B, C)`` per-sample values to the ``(T, C)`` tokens of their samples."""
    return per_sample.index_select(0, sites.batch)


def scatter_dense(feats: torch.Tensor, sites: Sites, perm: Tuple[int, ...]) -> torch.Tensor:
    """Packed tokens ``(T, C)`` -> the dense map whose axes hold (sample, row, column, channel) in the order
    ``perm`` (indices into b, h, w, c), zeros at masked positions: the input of a dense island."""
    h, w = sites.grid
    dense = feats.new_zeros(sites.batch_size, h, w, feats.shape[1])
    dense = dense.index_put((sites.batch, sites.coords[:, 0], sites.coords[:, 1]), feats)
    return dense.permute(*perm)


def gather_window_map(dense: torch.Tensor, sites: Sites, order: Tuple[int, ...]) -> torch.Tensor:
    """A per-sample window-sized map (axes brought to (b, h, w, c) by ``order``) read by every visible token
    at its in-window position: ``(T, C)`` rows ``map[sample, row % mh, col % mw]``."""
    m = dense.permute(*order)
    mh, mw = m.shape[1], m.shape[2]
    return m[sites.batch, sites.coords[:, 0] % mh, sites.coords[:, 1] % mw]


def mul_per_sample(feats: torch.Tensor, per_sample: torch.Tensor, sites: Sites) -> torch.Tensor:
    """``feats * sample_to_tokens(per_sample, sites)`` keeping ``feats`` and the ``(B, C)`` factor for backward,
    not the factor broadcast to every token (a squeeze-excite scale, GRN's normalised norm, a global context)."""
    return _MulPerSample.apply(feats, per_sample, sites.batch)


class _MulPerSample(torch.autograd.Function):
    """Autograd of :func:`mul_per_sample`: the factor is broadcast again in backward, its gradient summed per sample."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, per_sample: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(feats, per_sample, batch)
        return feats * per_sample.index_select(0, batch)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        feats, per_sample, batch = ctx.saved_tensors
        dfeats = dfactor = None
        if ctx.needs_input_grad[0]:
            dfeats = grad * per_sample.index_select(0, batch)
            if dfeats.shape != feats.shape:
                dfeats = dfeats.sum_to_size(feats.shape)
        if ctx.needs_input_grad[1]:
            prod = grad * feats
            dfactor = prod.new_zeros(per_sample.shape[0], *prod.shape[1:]).index_add_(0, batch, prod)
            if dfactor.shape != per_sample.shape:
                dfactor = dfactor.sum_to_size(per_sample.shape)
        return dfeats, dfactor, None


def pointwise_conv(feats: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution (stride 1, groups 1) is a Linear over the channels of every token."""
    return F.linear(feats, weight.flatten(1), bias)


def to_padded_dense(x: torch.Tensor, sites: Sites, spec: Tuple[Tuple, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
    """Packed tokens ``(T, C)`` or per-sample rows ``(B, C)`` -> the dense operand, tokens padded per sample."""
    tokens = any(ax == ("t",) for ax in spec)
    if tokens:
        x, _ = sites.pad(x)
        lead = [0, 1]
    else:
        lead = [0]
    x = x.reshape(*x.shape[: len(lead)], *sizes)
    place = {"b": 0, "t": 1}
    perm, shape = [], []
    for ax in spec:
        dims = [place[ax[0]]] if ax and isinstance(ax[0], str) else [len(lead) + j for j in ax]
        perm.extend(dims)
        size = 1
        for d in dims:
            size *= x.shape[d]
        shape.append(size)
    return x.permute(*perm).reshape(shape)


def from_padded_dense(x: torch.Tensor, sites: Sites, spec: Tuple[Tuple, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
    """The dense result of a per-sample matmul -> packed tokens ``(T, C)`` or per-sample rows ``(B, C)``."""
    tokens = any(ax == ("t",) for ax in spec)
    split, order = [], []
    for ax, size in zip(spec, x.shape):
        if ax and isinstance(ax[0], str):
            split.append(size)
            order.append(ax[0])
        else:
            split.extend(sizes[j] for j in ax)
            order.extend(ax)
    x = x.reshape(split)
    lead = ["b", "t"] if tokens else ["b"]
    perm = [order.index(k) for k in lead] + [order.index(j) for j in range(len(sizes))]
    channels = 1
    for s in sizes:
        channels *= s
    x = x.permute(*perm).reshape(*x.shape[:0], *[x.shape[order.index(k)] for k in lead], channels)
    return sites.unpad(x) if tokens else x


def prefixed_sites(sites: Sites, prefix: int) -> PrefixedSites:
    """The sites of a grid followed by ``prefix`` tokens per sample (rows of a layout holding a class token)."""
    return PrefixedSites(sites, prefix)


def grid_rows(x: torch.Tensor, visible: torch.Tensor, prefix: int) -> torch.Tensor:
    """``x[:, prefix:]`` on packed rows: the grid tokens, which come first."""
    return x[: x.shape[0] - visible.shape[0] * prefix]


def prefix_rows(x: torch.Tensor, visible: torch.Tensor, prefix: int) -> torch.Tensor:
    """``x[:, :prefix]`` on packed rows: every sample's prefix tokens, ``(B * prefix, C)``, which come last."""
    return x[x.shape[0] - visible.shape[0] * prefix:]


def stack_columns(parts: List[torch.Tensor], below: int) -> torch.Tensor:
    """Packed ``(rows, C)`` parts as the values of a new channel digit sitting above the lowest ``below`` columns:
    ``stack`` of channel values on packed rows."""
    rows = parts[0].shape[0]
    return torch.stack([p.reshape(rows, -1, below) for p in parts], 2).reshape(rows, -1)


def join_prefix(grid: torch.Tensor, parts: List[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
    """``cat((*parts, grid), token axis)`` on packed rows: grid tokens first, then every sample's prefix rows
    (sample-major; ``parts`` hold ``(B * count, C)`` rows each)."""
    batch, channels = visible.shape[0], grid.shape[1]
    own = torch.cat([p.to(grid.dtype).reshape(batch, -1, channels) for p in parts], 1)
    return torch.cat([grid, own.reshape(-1, channels)])


def constant_prefix_rows(const: torch.Tensor, token_axis: int, channel_axis: int,
                         visible: torch.Tensor) -> torch.Tensor:
    """Constant prefix tokens (``cls_token.expand(B, -1, -1)``'s source, or a position embedding's prefix rows) as
    ``(B * count, C)`` packed rows: every sample's copy, sample-major."""
    order = [token_axis] + [d for d in range(const.dim()) if d not in (token_axis, channel_axis)] + [channel_axis]
    rows = const.permute(order).reshape(const.shape[token_axis], const.shape[channel_axis])
    return rows.unsqueeze(0).expand(visible.shape[0], *rows.shape).reshape(-1, rows.shape[1])
