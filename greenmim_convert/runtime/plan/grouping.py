"""Window groupings: the visible tokens of each window, packed into groups of equal size (the DP plan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from greenmim_convert.runtime.gather import RowMap
from greenmim_convert.runtime.plan.packing import plan_buckets
from greenmim_convert.runtime.plan.segments import DigitWindows, WindowSpec, digit_segments, window_segments
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.plan.terms import term_offsets


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
