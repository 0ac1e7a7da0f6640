"""Packing window segments into equal-size groups for Group Window Attention.

A *packing* assigns every non-empty segment (the visible tokens of one window) a group and a slot
offset inside it, so that the segments of a group occupy disjoint slot ranges of ``[0, g)``.
Attention then runs on ``(G, g)`` padded groups under a block-diagonal mask.

Cost model (per head, in attention logits): a packing costs ``G * (g^2 + GROUP_OVERHEAD)``. The
lower bound is ``sum_i c_i^2``: every window alone, no padding. ``tile`` is the device preference:
the Triton kernel needs ``g`` to be a multiple of its tile (16); on the CPU ``tile = 1``.

Strategies:

* ``"window"``: every non-empty segment alone in a group, ``g`` = largest count.
* ``"max"``: GreenMIM's choice, ``g`` = largest count, each group filled with the max-fill subset of
  the remaining windows (their per-group 0/1 knapsack). Here it runs on the histogram of counts: a
  max-fill pattern is repeated as long as the remaining windows allow, so identical groups are
  emitted at once, and ties are broken towards larger windows rather than by window order (which
  strands fewer large windows than the original, so this baseline is, if anything, stronger).
* ``"dp"``: choose ``g`` and the packing together, minimising the cost model.

The ``"dp"`` recurrence. Counts are small integers, so everything runs on the histogram ``h[c]``
(number of segments with ``c`` visible tokens). For one group size ``g`` a group is anchored on the
largest remaining count ``a`` and filled by a bounded subset-sum DP over the remaining histogram::

    R_0 = {0},   R_j = { s + k * c_j : s in R_{j-1}, 0 <= k <= h[c_j], s + k * c_j <= g - a }

(sizes ``c_j`` in decreasing order, stopped early once ``g - a`` is reachable); the group takes
``a`` plus the subset reaching ``max R``, and that pattern is repeated while the histogram holds
it. ``G(g)`` is the smaller of this and First-Fit-Decreasing (also run on the histogram), so
``G(g) <= FFD(g) <= 11/9 OPT(g) + 6/9``. Over group sizes::

    g* = argmin_{g in candidates} G(g) * (g^2 + overhead),
    candidates = multiples of tile in [max count, capacity rounded up to tile]

scanned in increasing order of the lower bound ``max(ceil(T/g), #{c > g/2}) * (g^2 + overhead)``
and stopped once that bound reaches the best cost found. A group size is also skipped when its
Martello-Toth bound ``L2(g)`` proves it cannot win, and the knapsack pass is skipped when FFD
already meets ``L2(g)`` (optimal for that ``g``).

Buckets (``plan_buckets``). With one group size per stage every window is padded towards it, so
the logits never fall below ``T * max(c) / sum(c^2)`` times the lower bound (1.6-2.6x on Swin at
75% masking). Instead the distinct counts ``d_1 < ... < d_m`` are split into at most ``K``
contiguous ranges, each packed by ``"dp"`` with its own group size and paying ``call_overhead``
for its own attention call::

    F_k(j) = min_{i <= j} F_{k-1}(i - 1) + B(i, j) + call_overhead,   F_0(0) = 0,
    cost   = min_{k <= K} F_k(m)

with ``B(i, j)`` the ``"dp"`` cost of the segments with counts in ``[d_i, d_j]``. Packing all
``m^2 / 2`` ranges is too slow, so the search follows the shape of good splits: the first range
holds the small windows, which share groups; every later range holds larger windows, about one per
group. Later ranges are priced ``U(i, j) = N_ij * (g_j^2 + overhead)`` (each segment alone in a
group of ``g_j``, ``d_j`` rounded up to the tile: exact for a narrow range of large windows, an
upper bound otherwise), and the suffix recurrence ``S_k(i) = min_e U(i, e) + call_overhead +
S_{k-1}(e + 1)`` runs as ``K - 1`` vectorised min-plus steps. A first range ``[d_1, d_j]`` costs
at least ``beta(j)``, the fill / "at most p per group" bound of the ``"dp"`` candidates; the ends
``j`` are tried in increasing ``beta(j) + call_overhead + S(j + 1)``, each packed by FFD under the
best total so far as a limit, until the estimate reaches that total or ``MAX_PREFIX_TRIES``. The
chosen ranges are then packed by ``"dp"`` (one segment per group when nothing is cheaper), ranges
that chose the same group size are merged, and when the total exceeds the one-range bound
``beta(m) + call_overhead`` the single ``"dp"`` packing is computed and kept if cheaper: a plan
never costs more than ``pack_segments`` plus ``call_overhead``.

The histogram is read on the host once (``num_groups`` has to become a Python int anyway); the
patterns are mapped back to segments on the counts' device with a stable sort of the counts and a
cumsum over the pattern table: the k-th segment of count c (in segment order) takes
the k-th slot of size c. All buckets share that one sort.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate, takewhile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Fixed cost of one group per head, in logits: launching / scheduling one (group, head) program and
# its softmax bookkeeping, about one 8x8 logit block. It only tips the choice between group sizes
# whose logits are nearly equal towards fewer groups.
GROUP_OVERHEAD = 64.0
STRATEGIES = ("window", "max", "dp")
MAX_ROUNDS_PER_SIZE = 8
# Fixed cost of one more bucket, in logits per head: every bucket is one more attention call per
# block (gathers of q, k, v and of the bias, a batched matmul, softmax, another matmul). On the CPU
# path such a call costs 45-65 us before its first logit, the time of 60 (32 heads) to 520 (4 heads,
# Swin-B's first stage) logits per head at head dim 32; 512 is the dearest case, so a bucket is only
# added where it saves at least that. On a GPU a launch is worth far more logits: pass a larger value.
CALL_OVERHEAD = 512.0
# Bucket search: first-range ends tried, group sizes per first range bounded one by one (larger
# ones by the fill bound), and "at most p per group" bounds used (p = 1 .. BOUND_SHARES).
MAX_PREFIX_TRIES = 4
BOUND_SPAN = 4
BOUND_SHARES = 2

# A pattern is (multiplicity, [(count, how many segments of that count), ...]) in slot order.
Pattern = Tuple[int, List[Tuple[int, int]]]


@dataclass
class Packing:
    """Where each segment lives: ``seg_group[s]`` (-1 when empty) and ``seg_offset[s]``."""

    group_size: int
    num_groups: int
    seg_group: torch.Tensor
    seg_offset: torch.Tensor


def lower_bound(counts: torch.Tensor) -> int:
    """``sum_i c_i^2``: the logits per head of every window alone with no padding."""
    c = counts.long()
    return int((c * c).sum().item())


def group_cost(group_size: int, num_groups: int, overhead: float = GROUP_OVERHEAD) -> float:
    """Cost model of ``num_groups`` groups of ``group_size`` slots, per head, in logits."""
    return float(num_groups) * (float(group_size) ** 2 + overhead)


def packing_cost(packing: Packing, overhead: float = GROUP_OVERHEAD) -> float:
    """Cost model of a packing; ``overhead=0`` gives the attention logits per head."""
    return group_cost(packing.group_size, packing.num_groups, overhead)


def _round_up(value: int, tile: int) -> int:
    return -(-value // tile) * tile


def _candidates(max_count: int, capacity: int, tile: int) -> List[int]:
    """Admissible group sizes: multiples of ``tile`` from the largest count to the capacity."""
    return list(range(_round_up(max_count, tile), _round_up(max(capacity, max_count), tile) + 1, tile))


def _ffd_patterns(hist: Sequence[int], sizes: Sequence[int], g: int) -> List[Pattern]:
    """First-Fit-Decreasing on the histogram, bins kept as runs of identical bins in bin order.

    Equal items go, in bin order, into every bin with room (``r // c`` each), so one size class
    touches each run once: a run is converted whole, or split into converted / one partial /
    untouched bins. ``sizes`` are the present counts in decreasing order.
    """
    runs: List[list] = []  # [number of bins, residual, contents]
    for c in sizes:
        left = hist[c]
        nxt: List[list] = []
        for run in runs:
            n, r, pat = run
            if left == 0 or r < c:
                nxt.append(run)
                continue
            k = r // c
            full = left // k
            if full >= n:
                nxt.append([n, r - k * c, pat + [(c, k)]])
                left -= n * k
                continue
            if full:
                nxt.append([full, r - k * c, pat + [(c, k)]])
            rem = left - full * k
            if rem:
                nxt.append([1, r - rem * c, pat + [(c, rem)]])
            if n - full - (1 if rem else 0):
                nxt.append([n - full - (1 if rem else 0), r, pat])
            left = 0
        if left:
            k = g // c
            full, rem = divmod(left, k)
            if full:
                nxt.append([full, g - k * c, [(c, k)]])
            if rem:
                nxt.append([1, g - rem * c, [(c, rem)]])
        runs = nxt
    return [(n, pat) for n, _, pat in runs]


def _max_fill(hist: Sequence[int], sizes_up: Sequence[int], cap: int) -> Dict[int, int]:
    """Bounded subset-sum: how many of each count to take to fill ``cap`` as much as possible.

    Reachable sums are a Python int bitset; each size class is added in binary-split chunks so the
    DP is ``O(sum_c log h[c])`` shifts. Sizes (given ascending) are scanned from the largest that
    fits downwards, and the scan stops as soon as ``cap`` itself is reachable.
    """
    full = (1 << (cap + 1)) - 1
    reach = 1
    steps: List[Tuple[int, int, int]] = []
    for i in range(bisect_right(sizes_up, cap) - 1, -1, -1):
        c = sizes_up[i]
        n = hist[c]
        if n * c > cap:
            n = cap // c
        chunk = 1
        while n > 0:
            t = chunk if chunk < n else n
            n -= t
            chunk *= 2
            steps.append((c, t, reach))
            reach = (reach | (reach << (t * c))) & full
        if (reach >> cap) & 1:
            break
    s = reach.bit_length() - 1
    take: Dict[int, int] = {}
    for c, t, before in reversed(steps):
        if not (before >> s) & 1:
            s -= t * c
            take[c] = take.get(c, 0) + t
    return take


def _knapsack_patterns(hist: Sequence[int], sizes: Sequence[int], g: int, anchored: bool) -> Optional[List[Pattern]]:
    """Groups built one pattern at a time by the max-fill DP of ``_max_fill``; each pattern is
    emitted as many times as the remaining histogram holds it.

    ``anchored``: each group first takes the largest remaining count and the DP fills the rest (the
    ``"dp"`` strategy); otherwise the DP fills the whole group (GreenMIM's greedy knapsack).
    Returns None after ``MAX_ROUNDS_PER_SIZE`` patterns per distinct count (about 2 in practice),
    so the work stays bounded by the histogram, never by the number of groups.
    """
    h = list(hist)
    live = sorted(sizes)
    out: List[Pattern] = []
    while live:
        if len(out) > MAX_ROUNDS_PER_SIZE * len(sizes):
            return None
        if anchored:
            a = live[-1]
            h[a] -= 1
            take = _max_fill(h, live, g - a)
            h[a] += 1
            take[a] = take.get(a, 0) + 1
        else:
            take = _max_fill(h, live, g)
        reps = min(h[c] // k for c, k in take.items())
        for c, k in take.items():
            h[c] -= reps * k
        out.append((reps, sorted(take.items(), reverse=True)))
        if any(h[c] == 0 for c in take):
            live = [c for c in live if h[c]]
    return out


class _Bounds:
    """Lower bounds on the number of groups of size ``g`` from prefix sums of the histogram."""

    def __init__(self, hist: Sequence[int], sizes: Sequence[int]):
        n = len(hist)
        self.cnt = [0] * (n + 1)  # cnt[x]: segments with count >= x
        self.tot = [0] * (n + 1)  # tot[x]: their tokens
        for x in range(max(sizes, default=0), 0, -1):  # nothing above the largest count
            self.cnt[x] = self.cnt[x + 1] + hist[x]
            self.tot[x] = self.tot[x + 1] + hist[x] * x
        self.sizes_up = sorted(sizes)
        self.n = n

    def _ge(self, arr: List[int], x: int) -> int:
        return arr[x] if x < self.n else 0

    def simple(self, g: int) -> int:
        """``max(ceil(T / g), #{c > g/2})``."""
        return max(-(-self.tot[1] // g), self._ge(self.cnt, g // 2 + 1))

    def l2(self, g: int) -> int:
        """Martello-Toth L2: for each threshold K, big segments need their own groups, and the
        tokens in [K, g/2] must fit in what the segments in (g/2, g-K] leave free."""
        half = g // 2 + 1
        best = self.simple(g)
        for k in self.sizes_up:
            if 2 * k > g:
                break
            n1 = self._ge(self.cnt, g - k + 1)
            n2 = self._ge(self.cnt, half) - n1
            s2 = self._ge(self.tot, half) - self._ge(self.tot, g - k + 1)
            s3 = self.tot[k] - self._ge(self.tot, half)
            best = max(best, n1 + n2 + max(0, -(-(s3 - (n2 * g - s2)) // g)))
        return best


def _realise(counts: torch.Tensor, patterns: List[Pattern], g: int) -> Packing:
    """Map one group size's histogram patterns to segments (see ``_realise_buckets``)."""
    return _realise_buckets(counts, [(g, patterns)])[0]


def _realise_buckets(counts: torch.Tensor, buckets: Sequence[Tuple[int, List[Pattern]]]) -> List[Packing]:
    """Map histogram patterns to segments: the k-th segment of count c takes the k-th slot of size c.

    One table row per slot range of a pattern: its slots are ``reps`` consecutive groups of one
    bucket at one offset. Rows sorted by count line up with the segments sorted by count, so a
    cumsum of row starts gives every segment its row (columns: first segment, first group minus
    first segment, offset, bucket).
    Buckets hold disjoint sets of counts, so all of them are mapped by one sort and one pass; each
    bucket's packing then keeps only its own segments.
    """
    rows = []
    sizes = []
    for b, (_, patterns) in enumerate(buckets):
        base = 0
        for reps, items in patterns:
            off = 0
            for c, k in items:
                for _ in range(k):
                    rows.append((c, reps, base, off, b))
                    off += c
            base += reps
        sizes.append(base)
    rows.sort(key=lambda r: r[0])
    flat_rows = array("q")
    total = 0
    for _, reps, base, off, b in rows:
        flat_rows.extend((total, base - total, off, b))
        total += reps
    table = torch.frombuffer(flat_rows, dtype=torch.long).view(len(rows), 4).to(counts.device, copy=True)
    marks = torch.zeros(total, dtype=torch.long, device=counts.device).index_fill_(0, table[1:, 0], 1)
    _, shift, off, which = table.index_select(0, torch.cumsum(marks, 0)).unbind(1)
    group = torch.arange(total, device=counts.device) + shift
    n = counts.numel()
    order = torch.argsort(counts, stable=True)[n - total :]
    if len(buckets) == 1:
        seg_group = torch.full_like(counts, -1).scatter_(0, order, group)
        seg_offset = torch.zeros_like(counts).scatter_(0, order, off)
        return [Packing(buckets[0][0], sizes[0], seg_group, seg_offset)]
    flat = which * n + order
    seg_group = counts.new_full((len(buckets) * n,), -1).scatter_(0, flat, group).view(len(buckets), n)
    seg_offset = counts.new_zeros((len(buckets) * n,)).scatter_(0, flat, off).view(len(buckets), n)
    return [
        Packing(g, size, grp, offs)
        for (g, _), size, grp, offs in zip(buckets, sizes, seg_group.unbind(0), seg_offset.unbind(0))
    ]


def _empty_packing(counts: torch.Tensor, tile: int) -> Packing:
    return Packing(max(tile, 1), 0, torch.full_like(counts, -1), torch.zeros_like(counts))


def pack_one_per_group(counts: torch.Tensor, tile: int = 1) -> Packing:
    """Every non-empty segment alone in its group, groups as large as the largest segment."""
    nonempty = counts > 0
    g = int(counts.max().item()) if counts.numel() else 0
    group = torch.cumsum(nonempty.long(), 0) - 1
    seg_group = torch.where(nonempty, group, torch.full_like(group, -1))
    return Packing(_round_up(max(g, 1), tile), int(nonempty.sum().item()), seg_group, torch.zeros_like(counts))


def _dp_patterns(hist: Sequence[int], sizes: Sequence[int], g: int, bound: int) -> List[Pattern]:
    """The ``"dp"`` packing for one group size: FFD, or the anchored knapsack when it needs fewer groups.

    The knapsack pass is skipped when FFD already meets ``bound``, a lower bound on the group count.
    """
    pats = _ffd_patterns(hist, sizes, g)
    n = sum(p[0] for p in pats)
    if n > bound:
        alt = _knapsack_patterns(hist, sizes, g, anchored=True)
        if alt is not None and sum(p[0] for p in alt) < n:
            return alt
    return pats


def _max_patterns(hist: Sequence[int], sizes: Sequence[int], g: int) -> List[Pattern]:
    """GreenMIM's greedy knapsack, or FFD in the (pathological) case it needs too many patterns."""
    pats = _knapsack_patterns(hist, sizes, g, anchored=False)
    return pats if pats is not None else _ffd_patterns(hist, sizes, g)


def _choose_dp(
    hist: List[int],
    sizes: List[int],
    capacity: int,
    tile: int,
    overhead: float,
    limit: float = math.inf,
    refine: bool = True,
) -> Tuple[int, List[Pattern]]:
    """The group size and patterns of least modelled cost (see the module docstring).

    Only packings cheaper than ``limit`` are looked for; ``(0, [])`` when there is none. A group
    size ``g`` costs at least ``T * g`` (``T`` tokens), so the scan stops below ``limit / T``.
    ``refine=False`` packs every group size by FFD alone, skipping the knapsack pass: a quick
    upper estimate used to compare bucket splits.
    """
    bounds = _Bounds(hist, sizes)
    tokens = bounds.tot[1]
    cands = sorted(
        (group_cost(g, bounds.simple(g), overhead), g)
        for g in takewhile(lambda g: tokens * g < limit, _candidates(sizes[0], capacity, tile))
    )
    best_cost, best_g, best = limit, 0, []
    for bound_cost, g in cands:
        if bound_cost >= best_cost:
            break
        l2 = bounds.l2(g)
        if group_cost(g, l2, overhead) >= best_cost:
            continue
        pats = _dp_patterns(hist, sizes, g, l2) if refine else _ffd_patterns(hist, sizes, g)
        cost = group_cost(g, sum(p[0] for p in pats), overhead)
        if cost < best_cost:
            best_cost, best_g, best = cost, g, pats
    return best_g, best


def _histogram(counts: torch.Tensor, capacity: int) -> Tuple[List[int], List[int]]:
    """Histogram of the counts (read on the host) and the present non-zero counts, largest first."""
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(counts)).tolist())
    if lo < 0 or hi > capacity:
        raise ValueError(f"segment counts must lie in [0, capacity={capacity}], got [{lo}, {hi}]")
    hist = torch.bincount(counts, minlength=capacity + 1).tolist()
    return hist, [c for c in range(capacity, 0, -1) if hist[c]]


def group_count_bound(counts: torch.Tensor, group_size: int) -> int:
    """Martello-Toth lower bound on the number of groups of ``group_size`` slots any packing needs."""
    counts = counts.long()
    if counts.numel() == 0:
        return 0
    hist, sizes = _histogram(counts, group_size)
    return _Bounds(hist, sizes).l2(group_size) if sizes else 0


def pack_with_group_size(counts: torch.Tensor, group_size: int, strategy: str = "dp") -> Packing:
    """Pack the segments into groups of exactly ``group_size`` slots (at least the largest count).

    ``"dp"``: the better of FFD and the anchored knapsack; ``"max"``: GreenMIM's max-fill knapsack.
    Used to inspect the per-size step of ``pack_segments``.
    """
    if strategy not in ("dp", "max"):
        raise ValueError(f"pack_with_group_size supports 'dp' and 'max', got {strategy!r}")
    counts = counts.long()
    if counts.numel() == 0:
        return _empty_packing(counts, group_size)
    hist, sizes = _histogram(counts, group_size)
    if not sizes:
        return _empty_packing(counts, group_size)
    if strategy == "max":
        return _realise(counts, _max_patterns(hist, sizes, group_size), group_size)
    return _realise(counts, _dp_patterns(hist, sizes, group_size, _Bounds(hist, sizes).l2(group_size)), group_size)


def pack_segments(
    counts: torch.Tensor, capacity: int, strategy: str = "dp", tile: int = 1, overhead: float = GROUP_OVERHEAD
) -> Packing:
    """Pack segments of the given token counts (each ``<= capacity``) into groups of one size.

    ``tile``: the group size must be a multiple of it (the Triton tile on CUDA, 1 on the CPU).
    ``overhead``: per-group cost of the ``"dp"`` model, in logits per head.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown grouping strategy {strategy!r}; expected one of {STRATEGIES}")
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    counts = counts.long()
    if strategy == "window":
        return pack_one_per_group(counts, tile)
    if counts.numel() == 0:
        return _empty_packing(counts, tile)
    hist, sizes = _histogram(counts, capacity)
    if not sizes:
        return _empty_packing(counts, tile)
    if strategy == "max":
        g = _round_up(sizes[0], tile)
        return _realise(counts, _max_patterns(hist, sizes, g), g)
    g, pats = _choose_dp(hist, sizes, capacity, tile, overhead)
    return _realise(counts, pats, g)


class _Ranges:
    """Prices and packings of buckets over ranges ``asc[lo..hi]`` of the distinct counts (ascending)
    of one histogram: the pieces of ``plan_buckets``' search (see the module docstring)."""

    def __init__(self, hist: Sequence[int], asc: Sequence[int], capacity: int, tile: int, overhead: float):
        self.hist, self.asc, self.capacity, self.tile, self.overhead = hist, asc, capacity, tile, overhead
        self.le = list(accumulate(hist))  # le[x]: segments with count <= x
        self.tok = list(accumulate(c * n for c, n in enumerate(hist)))  # tok[x]: their tokens
        self.top = _round_up(max(capacity, asc[-1]), tile)
        self.first = [_round_up(c, tile) for c in asc]  # smallest admissible group size per range end

    def one_each(self, lo: int, hi: int) -> float:
        """Cost of every segment of ``asc[lo..hi]`` alone in a group of the smallest admissible size."""
        n = self.le[self.asc[hi]] - self.le[self.asc[lo] - 1]
        return float(n) * (self.first[hi] ** 2 + self.overhead)

    def prefix_bounds(self) -> List[float]:
        """``beta(j)``, a lower bound on the ``"dp"`` cost of every prefix ``asc[0..j]``.

        For each of the ``BOUND_SPAN`` smallest admissible group sizes ``g``: ``ceil(T / g)`` groups
        for ``T`` tokens, and ``ceil(N_p / p)`` for the ``N_p`` segments above ``g / (p + 1)``, no
        ``p + 1`` of which share a group; every larger ``g`` costs at least ``T * (g + overhead / g)``,
        minimised in closed form.
        """
        le, tok, tile, overhead, top = self.le, self.tok, self.tile, self.overhead, self.top
        shares = range(1, BOUND_SHARES + 1)
        out = []
        for c, f in zip(self.asc, self.first):
            n, t = le[c], tok[c]
            rest = f + tile * BOUND_SPAN
            best = math.inf
            if rest <= top:
                g = min(max(rest, math.sqrt(overhead)), top)
                best = t * (g + overhead / g)
            for g in range(f, min(rest, top + 1), tile):
                groups = -(-t // g)
                for p in shares:
                    x = g // (p + 1)
                    if x < c:
                        above = -(-(n - le[x]) // p)
                        if above > groups:
                            groups = above
                cost = groups * (g * g + overhead)
                if cost < best:
                    best = cost
            out.append(best)
        return out

    def pack(
        self, lo: int, hi: int, limit: float = math.inf, refine: bool = True
    ) -> Optional[Tuple[float, int, List[Pattern]]]:
        """The ``"dp"`` packing of the segments of ``asc[lo..hi]`` as (cost, group size, patterns);
        one segment per group when nothing cheaper exists; None when nothing costs less than ``limit``.
        ``refine=False``: FFD only (see ``_choose_dp``)."""
        one_each = self.one_each(lo, hi)
        part = [0] * len(self.hist)
        for c in self.asc[lo : hi + 1]:
            part[c] = self.hist[c]
        desc = self.asc[hi : lo - 1 if lo else None : -1]
        g, pats = _choose_dp(part, desc, self.capacity, self.tile, self.overhead, min(limit, one_each), refine)
        if pats:
            return group_cost(g, sum(p[0] for p in pats), self.overhead), g, pats
        if one_each < limit:
            return one_each, self.first[hi], [(self.hist[c], [(c, 1)]) for c in desc]
        return None

    def later_covers(self, call_overhead: float, max_parts: int) -> Tuple[List[List[float]], List[float], List[int]]:
        """Cheapest covers of every suffix ``asc[i + 1..m-1]`` by ranges priced ``one_each +
        call_overhead``: ``covers[k - 1][i]`` with exactly ``k`` ranges (``k = 1 .. max_parts``),
        then per ``i`` the cheapest over ``k`` and its ``k`` (the fewest among ties).

        The recurrence runs as ``k`` vectorised min-plus steps over the ``(i, j)`` price matrix.
        """
        asc, le, m = self.asc, self.le, len(self.asc)
        data = torch.tensor(
            [[le[c] for c in asc[1:]], [le[c - 1] for c in asc[1:]], [f * f + self.overhead for f in self.first[1:]]],
            dtype=torch.float64,
        )
        hi, lo, per_group = data.unbind(0)
        n = hi - lo[:, None]
        step = torch.where(n > 0, n * per_group + call_overhead, math.inf)
        left, value = step[:, :-1], step[:, -1]
        values = [value]
        for _ in range(1, min(max_parts, m - 1)):
            value = (left + value[1:]).amin(1)
            values.append(value)
        covers = torch.stack(values)
        return covers.tolist(), covers.amin(0).tolist(), (covers.argmin(0) + 1).tolist()

    def later_ranges(
        self, start: int, parts: int, covers: List[List[float]], call_overhead: float
    ) -> List[Tuple[int, int]]:
        """The ranges of the cover of ``asc[start..m-1]`` by ``parts`` ranges found by ``later_covers``."""
        m = len(self.asc)
        ranges = []
        for k in range(parts, 1, -1):
            ends = range(start, m - k + 1)
            end = min(ends, key=lambda e: self.one_each(start, e) + call_overhead + covers[k - 2][e])
            ranges.append((start, end))
            start = end + 1
        ranges.append((start, m - 1))
        return ranges


def _plan_dp(
    hist: List[int],
    sizes: List[int],
    capacity: int,
    tile: int,
    overhead: float,
    call_overhead: float,
    max_buckets: int,
) -> List[Tuple[int, List[Pattern]]]:
    """The bucket split of least modelled cost (see the module docstring), as (group size, patterns)
    per bucket, in increasing group size; buckets that chose the same group size are merged."""
    asc = sizes[::-1]
    m = len(asc)
    ranges = _Ranges(hist, asc, capacity, tile, overhead)
    if max_buckets == 1 or m == 1:
        _, g, pats = ranges.pack(0, m - 1)
        return [(g, pats)]
    covers, rest, parts = ranges.later_covers(call_overhead, max_buckets - 1)
    rest.append(0.0)
    parts.append(0)
    bounds = ranges.prefix_bounds()
    estimate = [bounds[j] + call_overhead + rest[j] for j in range(m)]
    exact: Dict[Tuple[int, int], Tuple[float, int, List[Pattern]]] = {}
    best_cost, best_end, quick = math.inf, m - 1, None
    for tries, j in enumerate(sorted(range(m), key=estimate.__getitem__)):
        if estimate[j] >= best_cost or tries == MAX_PREFIX_TRIES:
            break
        found = ranges.pack(0, j, best_cost - call_overhead - rest[j], refine=False)
        if found is not None:
            best_cost, best_end, quick = found[0] + call_overhead + rest[j], j, found
    best = [(0, best_end)]
    exact[0, best_end] = ranges.pack(0, best_end, quick[0]) or quick
    if parts[best_end]:
        best += ranges.later_ranges(best_end + 1, parts[best_end], covers, call_overhead)
    for r in best[1:]:
        exact[r] = ranges.pack(*r)
    best_cost = sum(exact[r][0] + call_overhead for r in best)
    whole = (0, m - 1)
    if best_cost > bounds[m - 1] + call_overhead and whole not in exact:
        found = ranges.pack(0, m - 1, best_cost - call_overhead)
        if found is not None:
            exact[whole] = found
            best = [whole]
    merged: Dict[int, List[Pattern]] = {}
    for r in best:
        _, g, pats = exact[r]
        merged.setdefault(g, []).extend(pats)
    return sorted(merged.items())


def plan_buckets(
    counts: torch.Tensor,
    capacity: int,
    max_buckets: int = 6,
    strategy: str = "dp",
    tile: int = 1,
    overhead: float = GROUP_OVERHEAD,
    call_overhead: float = CALL_OVERHEAD,
) -> List[Packing]:
    """Split the segments by count into buckets, each packed with its own group size.

    One group size per stage leaves the windows far below it padded; buckets of similar counts pad
    little, at ``call_overhead`` (logits per head) per bucket for its attention call in every block.
    Returns one packing per bucket, in increasing group size, over disjoint sets of segments: a
    segment outside a bucket (or empty) has ``seg_group == -1`` there, and every non-empty segment
    is placed in exactly one bucket. ``"dp"`` picks at most ``max_buckets`` ranges of counts as in
    the module docstring; small or uniform stages get one bucket, and the plan never costs more
    than the single ``"dp"`` packing plus one call. ``"window"`` and ``"max"`` (and
    ``max_buckets=1``) return ``[pack_segments(...)]``. With nothing to pack, the single empty
    packing of ``pack_segments``.
    """
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be positive, got {max_buckets}")
    if strategy != "dp" or max_buckets == 1:
        return [pack_segments(counts, capacity, strategy, tile=tile, overhead=overhead)]
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    counts = counts.long()
    if counts.numel() == 0:
        return [_empty_packing(counts, tile)]
    hist, sizes = _histogram(counts, capacity)
    if not sizes:
        return [_empty_packing(counts, tile)]
    return _realise_buckets(counts, _plan_dp(hist, sizes, capacity, tile, overhead, call_overhead, max_buckets))
