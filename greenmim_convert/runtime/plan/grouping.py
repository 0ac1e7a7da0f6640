"""Window groupings: the visible tokens of each window, packed into groups of equal size (the DP plan).

Swin-style (shifted) window attention lets a token attend to the tokens of its window. On packed
tokens a window is a *segment*: a set of token indices. Shifted windows are expressed by window ids
computed on shifted coordinates, with no cyclic roll: a token at row ``r`` sits at rolled position
``p = (r - s) mod H``; timm's shifted-window mask further splits the last window row/column into the
tokens that wrapped around (``r < s``) and those that did not, which is the same as windowing the
*unwrapped* coordinate ``r - s`` with ``floor``. Both views are implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from greenmim_convert.runtime.gather import RowMap
from greenmim_convert.runtime.plan.packing import plan_buckets
from greenmim_convert.runtime.plan.sites import Sites, digit_sum
from greenmim_convert.runtime.plan.terms import term_offsets


@dataclass(frozen=True)
class WindowSpec:
    """Window attention geometry on one grid: window size, cyclic shift and whether the seam splits windows."""

    window: Tuple[int, int]
    shift: Tuple[int, int] = (0, 0)
    split_seam: bool = True  # timm's -100 shifted-window mask: wrapped tokens form their own region

    def segments_per_dim(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """Number of segment rows and columns of a sample's grid."""
        out = []
        for size, win, sh in zip(grid, self.window, self.shift):
            n = size // win
            out.append(n + 1 if (sh and self.split_seam) else n)
        return out[0], out[1]


def _axis_segment(coord: torch.Tensor, size: int, win: int, shift: int, split_seam: bool) -> torch.Tensor:
    if shift and split_seam:
        return torch.div(coord - shift, win, rounding_mode="floor") + 1
    return torch.remainder(coord - shift, size) // win


def window_segments(
    batch: torch.Tensor, coords: torch.Tensor, grid: Tuple[int, int], batch_size: int, spec: WindowSpec
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Segment id and in-window position of every token.

    Returns ``(segment (T,), position (T,), num_segments)``. Segment ids are sample-major and raster
    ordered, so sorting by them is deterministic; ``position`` is ``row * window_w + col`` inside the
    (rolled) window, the index timm's relative-position tables use.
    """
    (h, w), (wh, ww), (sh, sw) = grid, spec.window, spec.shift
    if h % wh or w % ww:
        raise ValueError(f"grid {grid} is not divisible by window {spec.window}")
    nr, nc = spec.segments_per_dim(grid)
    r, c = coords[:, 0], coords[:, 1]
    seg_r = _axis_segment(r, h, wh, sh, spec.split_seam)
    seg_c = _axis_segment(c, w, ww, sw, spec.split_seam)
    segment = (batch * nr + seg_r) * nc + seg_c
    position = torch.remainder(r - sh, wh) * ww + torch.remainder(c - sw, ww)
    return segment, position, batch_size * nr * nc


@dataclass(frozen=True)
class DigitWindows:
    """Windows described by layout digits: the digits shared by a query and its keys index the window,
    the digits of the token axis index the position inside it (any order, any stride: blocks,
    dilated grids). A digit is ``(kind, size, inner)`` with kind ``h`` or ``w``; ``offset`` is the
    roll: dense row ``p`` holds grid row ``(p + offset) mod H``."""

    grid: Tuple[int, int]
    offset: Tuple[int, int]
    shared: Tuple[Tuple[str, int, int], ...]
    token: Tuple[Tuple[str, int, int], ...]

    @property
    def area(self) -> int:
        out = 1
        for _, size, _ in self.token:
            out *= size
        return out

    @property
    def windows_per_sample(self) -> int:
        out = 1
        for _, size, _ in self.shared:
            out *= size
        return out

    def digits(self, coords: torch.Tensor, digits: Tuple[Tuple[str, int, int], ...]) -> torch.Tensor:
        """Mixed-radix value of ``digits`` (major first) at every coordinate."""
        weighted, place = [], 1
        for kind, size, inner in reversed(digits):
            weighted.append((kind, size, inner, place))
            place *= size
        return digit_sum(coords, self.grid, self.offset, weighted)


def digit_segments(
    batch: torch.Tensor,
    coords: torch.Tensor,
    batch_size: int,
    windows: DigitWindows,
    labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Segment id (sample-major) and in-window position of every token for digit-described windows.

    ``labels`` ``(H, W)`` splits windows further into regions (a block mask such as the shifted
    window seam); labels are small non-negative ints, at most ``area`` of them per window.
    """
    window = windows.digits(coords, windows.shared)
    position = windows.digits(coords, windows.token)
    per_sample = windows.windows_per_sample
    segment = batch * per_sample + window
    count = batch_size * per_sample
    if labels is not None:
        region = labels[coords[:, 0], coords[:, 1]]
        segment = segment * windows.area + region
        count *= windows.area
    return segment, position, count


@dataclass
class Bucket:
    """Groups of one size: ``(G, g)`` slots with the token, window id and in-window position of each."""

    group_size: int
    num_groups: int
    index: torch.Tensor  # (G*g,) token of each slot; padding slots read token 0 (no real query sees them)
    segment: torch.Tensor  # (G, g) window id per slot; unique negative ids on padding
    position: torch.Tensor  # (G, g) in-window position per slot

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
    logits: int  # sum over buckets of G * g^2: attention logits per head
    lower_bound: int  # sum of squared window counts: every window alone, no padding
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


def _bucket(
    packing, seg: torch.Tensor, pos: torch.Tensor, rank: torch.Tensor, offset: int
) -> Tuple[Bucket, torch.Tensor, torch.Tensor]:
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


def window_grouping(
    sites: Sites, window: Tuple[int, int], shift: Tuple[int, int], split_seam: bool, strategy: str
) -> Grouping:
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
