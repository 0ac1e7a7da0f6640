"""Window grouping: brute-force optimality bounds, packing invariants, every strategy, buckets, benchmark smoke run."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import random
from typing import List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenmim_convert.runtime.plan.grouping import WindowSpec, window_segments
from greenmim_convert.runtime.plan.packing import (
    CALL_OVERHEAD,
    GROUP_OVERHEAD,
    STRATEGIES,
    Packing,
    group_cost,
    group_count_bound,
    lower_bound,
    pack_segments,
    pack_with_group_size,
    packing_cost,
    plan_buckets,
)
from greenmim_convert.runtime.plan.sites import Sites

REPO = pathlib.Path(__file__).resolve().parents[2]


def check_packing(counts: torch.Tensor, p: Packing, tile: int = 1) -> None:
    """Every non-empty segment placed once, ranges disjoint and inside [0, g), no unused group."""
    c = counts.tolist()
    grp, off = p.seg_group.tolist(), p.seg_offset.tolist()
    assert p.seg_group.shape == counts.shape and p.seg_offset.shape == counts.shape
    assert p.seg_group.dtype == torch.long and p.seg_offset.dtype == torch.long
    assert p.group_size >= 1 and p.group_size % tile == 0
    ranges: dict = {}
    for n, gi, oi in zip(c, grp, off):
        if n == 0:
            assert gi == -1
            continue
        assert 0 <= gi < p.num_groups
        assert 0 <= oi and oi + n <= p.group_size
        ranges.setdefault(gi, []).append((oi, oi + n))
    assert sorted(ranges) == list(range(p.num_groups))
    for spans in ranges.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start


def check_buckets(counts: torch.Tensor, buckets: List[Packing], tile: int = 1) -> None:
    """Each bucket a valid packing of its own segments; every non-empty segment in exactly one
    bucket, empty ones in none; group sizes strictly increasing."""
    assert buckets
    owner = [-1] * counts.numel()
    for b, p in enumerate(buckets):
        members = (p.seg_group >= 0).tolist()
        for s, inside in enumerate(members):
            if inside:
                assert owner[s] == -1, f"segment {s} in buckets {owner[s]} and {b}"
                owner[s] = b
        check_packing(torch.where(p.seg_group >= 0, counts, 0), p, tile)
        assert not p.seg_offset[p.seg_group < 0].any()
    assert [o >= 0 for o in owner] == (counts > 0).tolist()
    sizes = [p.group_size for p in buckets]
    assert sizes == sorted(set(sizes))


def buckets_cost(
    buckets: List[Packing], overhead: float = GROUP_OVERHEAD, call_overhead: float = CALL_OVERHEAD
) -> float:
    """Modelled cost of a bucket plan: its packings plus one attention call per bucket."""
    return sum(packing_cost(p, overhead) for p in buckets) + call_overhead * len(buckets)


def optimal_groups(items: List[int], g: int) -> int:
    """Fewest groups of ``g`` slots holding ``items`` (exhaustive, items placed largest first)."""
    items = sorted((x for x in items if x), reverse=True)
    best = len(items)

    def place(i: int, loads: List[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(items):
            best = len(loads)
            return
        seen = set()
        for j, load in enumerate(loads):
            if load + items[i] <= g and load not in seen:
                seen.add(load)
                loads[j] += items[i]
                place(i + 1, loads)
                loads[j] -= items[i]
        loads.append(items[i])
        place(i + 1, loads)
        loads.pop()

    place(0, [])
    return best


def first_fit_decreasing(items: List[int], g: int) -> int:
    """Item-by-item First-Fit-Decreasing group count."""
    loads: List[int] = []
    for x in sorted((x for x in items if x), reverse=True):
        for j, load in enumerate(loads):
            if load + x <= g:
                loads[j] += x
                break
        else:
            loads.append(x)
    return len(loads)


def test_bruteforce_small_cases():
    """Per candidate g: valid packing, at most FFD's groups, hence <= 11/9 OPT + 6/9 (Dosa 2007),
    and the L2 bound never exceeds OPT. The chosen packing is the cheapest of the per-g packings."""
    rng = random.Random(0)
    hits = total = 0
    for case in range(240):
        capacity = rng.choice([4, 9, 16, 25, 49])
        n = rng.randint(1, 8)
        if case % 3 == 0:  # mid-size windows, the hard regime for greedy packing
            items = [rng.randint(capacity // 5, capacity // 2 + 2) for _ in range(n)]
        else:
            items = [rng.choice([0, rng.randint(1, capacity), rng.randint(1, max(1, capacity // 3))]) for _ in range(n)]
        items = [min(x, capacity) for x in items]
        counts = torch.tensor(items, dtype=torch.long)
        if not any(items):
            continue
        costs = []
        for g in range(max(items), capacity + 1):
            opt = optimal_groups(items, g)
            p = pack_with_group_size(counts, g)
            check_packing(counts, p)
            assert p.group_size == g
            assert p.num_groups <= first_fit_decreasing(items, g)
            assert p.num_groups <= math.floor(11 * opt / 9 + 6 / 9)
            assert group_count_bound(counts, g) <= opt
            hits += p.num_groups == opt
            total += 1
            costs.append(group_cost(g, p.num_groups))
        chosen = pack_segments(counts, capacity, "dp")
        check_packing(counts, chosen)
        assert packing_cost(chosen) == min(costs), (case, items)
    assert total > 500 and hits == total  # beyond the proven bound: every small case here is optimal


@pytest.mark.parametrize("tile", [1, 4, 16])
def test_dp_is_cheapest_candidate_with_tile(tile):
    """With a tile, every candidate g is a multiple of it; pruning never discards a cheaper one."""
    gen = torch.Generator().manual_seed(tile)
    for _ in range(20):
        capacity = int(torch.randint(8, 50, (1,), generator=gen))
        counts = torch.randint(0, capacity + 1, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        counts[counts > capacity // 2] //= 3
        p = pack_segments(counts, capacity, "dp", tile=tile)
        check_packing(counts, p, tile)
        if int(counts.max()) == 0:
            continue
        top = -(-capacity // tile) * tile
        first = -(-int(counts.max()) // tile) * tile
        best = min(packing_cost(pack_with_group_size(counts, g)) for g in range(first, top + 1, tile))
        assert packing_cost(p) == best


counts_lists = st.lists(st.integers(0, 49), min_size=0, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts_lists, st.sampled_from(STRATEGIES), st.sampled_from([1, 16]), st.integers(0, 95))
def test_packing_invariants(items, strategy, tile, extra_capacity):
    """Any counts, strategy and tile: a valid, deterministic packing that never costs more than one window per group."""
    counts = torch.tensor(items, dtype=torch.long)
    capacity = max(items, default=0) + extra_capacity
    p = pack_segments(counts, capacity, strategy, tile=tile)
    check_packing(counts, p, tile)
    if any(items):
        assert p.group_size >= max(items)
    again = pack_segments(counts.clone(), capacity, strategy, tile=tile)
    assert (again.group_size, again.num_groups) == (p.group_size, p.num_groups)
    assert torch.equal(again.seg_group, p.seg_group) and torch.equal(again.seg_offset, p.seg_offset)
    window = pack_segments(counts, capacity, "window", tile=tile)
    if strategy == "dp":
        assert packing_cost(p) <= packing_cost(window)
    assert packing_cost(p, 0) >= lower_bound(counts) or not any(items)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(0, 20))
def test_pack_with_group_size_any_g(items, slack):
    """A fixed group size at or above the largest count is always honoured."""
    counts = torch.tensor(items, dtype=torch.long)
    g = max(items) + slack
    for strategy in ("dp", "max"):
        p = pack_with_group_size(counts, g, strategy)
        check_packing(counts, p)
        assert p.group_size == g
        assert p.num_groups >= group_count_bound(counts, g)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("counts", [[], [0], [0, 0, 0, 0]])
def test_empty_inputs(strategy, counts):
    counts = torch.tensor(counts, dtype=torch.long)
    p = pack_segments(counts, 49, strategy, tile=16)
    check_packing(counts, p, 16)
    assert p.num_groups == 0 and packing_cost(p) == 0


def test_window_strategy_and_cost_model():
    counts = torch.tensor([0, 5, 12, 3, 0, 12])
    p = pack_segments(counts, 49, "window")
    check_packing(counts, p)
    assert (p.group_size, p.num_groups) == (12, 4)
    assert p.seg_group.tolist() == [-1, 0, 1, 2, -1, 3] and not p.seg_offset.any()
    assert pack_segments(counts, 49, "window", tile=16).group_size == 16
    assert lower_bound(counts) == 25 + 144 + 9 + 144
    assert packing_cost(p, 0) == 4 * 144
    assert packing_cost(p) == 4 * (144 + GROUP_OVERHEAD)


def test_equal_windows_reach_the_lower_bound():
    """One size only (the last Swin stage): every strategy puts one window per group, no padding."""
    counts = torch.full((64,), 12, dtype=torch.long)
    for strategy in STRATEGIES:
        p = pack_segments(counts, 49, strategy)
        assert (p.group_size, p.num_groups) == (12, 64)
        assert packing_cost(p, 0) == lower_bound(counts)


def test_dp_packs_small_windows_together():
    """Many small windows: dp shares groups, GreenMIM's max choice keeps g at the largest count."""
    counts = torch.tensor([10] + [3] * 30)
    dp, mx = pack_segments(counts, 49, "dp"), pack_segments(counts, 49, "max")
    check_packing(counts, dp)
    check_packing(counts, mx)
    assert mx.group_size == 10 and mx.num_groups == 11
    assert packing_cost(dp) <= packing_cost(mx)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        pack_segments(torch.tensor([1, 2]), 4, "knapsack")
    with pytest.raises(ValueError, match="capacity"):
        pack_segments(torch.tensor([1, 5]), 4, "dp")
    with pytest.raises(ValueError, match="capacity"):
        pack_segments(torch.tensor([1, -1]), 4, "max")
    with pytest.raises(ValueError, match="tile"):
        pack_segments(torch.tensor([1]), 4, "dp", tile=0)


@pytest.mark.parametrize("shift", [0, 3])
def test_swin_stage_counts(shift):
    """Real window counts (per-sample masks, shifted windows with the seam split): valid packings, dp the cheapest."""
    gen = torch.Generator().manual_seed(shift)
    b, units, grid = 8, 7, 28
    visible = torch.rand(b, units * units, generator=gen).argsort(1).argsort(1) < 12
    sites = Sites.from_mask(visible.view(b, units, units), (grid, grid), 8)
    seg, _, num = window_segments(sites.batch, sites.coords, sites.grid, b, WindowSpec((7, 7), (shift, shift)))
    counts = torch.bincount(seg, minlength=num)
    costs = {}
    for strategy in STRATEGIES:
        p = pack_segments(counts, 49, strategy)
        check_packing(counts, p)
        costs[strategy] = packing_cost(p)
    assert costs["dp"] <= costs["window"]
    assert costs["dp"] <= 1.02 * costs["max"]


@pytest.mark.cuda
def test_cuda_matches_cpu():
    counts = torch.randint(0, 50, (500,))
    for strategy in STRATEGIES:
        a = pack_segments(counts, 49, strategy, tile=16)
        b = pack_segments(counts.cuda(), 49, strategy, tile=16)
        assert (a.group_size, a.num_groups) == (b.group_size, b.num_groups)
        assert torch.equal(a.seg_group, b.seg_group.cpu()) and torch.equal(a.seg_offset, b.seg_offset.cpu())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 49), min_size=0, max_size=80),
    st.sampled_from([1, 16]),
    st.integers(0, 95),
    st.integers(1, 6),
    st.sampled_from([0.0, CALL_OVERHEAD, 1e6]),
)
def test_plan_buckets_invariants(items, tile, extra_capacity, max_buckets, call_overhead):
    """Any counts: disjoint valid buckets covering every non-empty segment once, deterministic, at
    most ``max_buckets``, never dearer than the single dp packing plus its one call."""
    counts = torch.tensor(items, dtype=torch.long)
    capacity = max(items, default=0) + extra_capacity
    buckets = plan_buckets(counts, capacity, max_buckets, tile=tile, call_overhead=call_overhead)
    check_buckets(counts, buckets, tile)
    assert len(buckets) <= max_buckets
    for p in buckets:
        inside = counts[p.seg_group >= 0]
        assert inside.numel() == 0 or p.group_size >= int(inside.max())
    single = pack_segments(counts, capacity, "dp", tile=tile)
    assert buckets_cost(buckets, call_overhead=call_overhead) <= packing_cost(single) + call_overhead
    assert sum(packing_cost(p, 0) for p in buckets) >= lower_bound(counts)
    again = plan_buckets(counts.clone(), capacity, max_buckets, tile=tile, call_overhead=call_overhead)
    assert [(p.group_size, p.num_groups) for p in again] == [(p.group_size, p.num_groups) for p in buckets]
    for a, b in zip(again, buckets):
        assert torch.equal(a.seg_group, b.seg_group) and torch.equal(a.seg_offset, b.seg_offset)


@pytest.mark.parametrize("strategy", ["window", "max"])
def test_plan_buckets_single_bucket_strategies(strategy):
    """``"window"`` and ``"max"`` keep one group size: exactly ``[pack_segments(...)]``."""
    counts = torch.tensor([0, 5, 12, 3, 0, 12, 40, 41, 2, 2, 2, 7, 30, 31, 33])
    for tile in (1, 16):
        buckets = plan_buckets(counts, 49, strategy=strategy, tile=tile)
        expected = pack_segments(counts, 49, strategy, tile=tile)
        assert len(buckets) == 1
        assert (buckets[0].group_size, buckets[0].num_groups) == (expected.group_size, expected.num_groups)
        assert torch.equal(buckets[0].seg_group, expected.seg_group)
        assert torch.equal(buckets[0].seg_offset, expected.seg_offset)


def test_plan_buckets_one_bucket_cases():
    """One bucket allowed, one count, or a call dearer than any padding: the single dp packing."""
    counts = torch.tensor([0, 5, 12, 3, 0, 12, 40, 41, 2, 2, 2, 7, 30, 31, 33])
    single = pack_segments(counts, 49, "dp")
    only = plan_buckets(counts, 49, max_buckets=1)
    assert len(only) == 1 and torch.equal(only[0].seg_group, single.seg_group)
    assert torch.equal(only[0].seg_offset, single.seg_offset)
    costly = plan_buckets(counts, 49, call_overhead=1e9)
    assert len(costly) == 1 and packing_cost(costly[0]) <= packing_cost(single)
    same = plan_buckets(torch.full((64,), 12, dtype=torch.long), 49)
    assert [(p.group_size, p.num_groups) for p in same] == [(12, 64)]


def test_plan_buckets_splits_mixed_counts():
    """Large and small windows apart: less padding than one group size, and the logit floor of a
    single group size (``T * max(c)``) is beaten."""
    counts = torch.tensor([49] * 20 + [30] * 40 + [12] * 80 + [3] * 60)
    buckets = plan_buckets(counts, 49)
    check_buckets(counts, buckets)
    assert len(buckets) > 1
    logits = sum(packing_cost(p, 0) for p in buckets)
    assert logits < int(counts.sum()) * 49
    assert buckets_cost(buckets) < packing_cost(pack_segments(counts, 49, "dp")) + CALL_OVERHEAD


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("counts", [[], [0], [0, 0, 0, 0]])
def test_plan_buckets_empty(strategy, counts):
    """Nothing to pack: one empty packing, no groups."""
    counts = torch.tensor(counts, dtype=torch.long)
    buckets = plan_buckets(counts, 49, strategy=strategy, tile=16)
    assert len(buckets) == 1 and buckets[0].num_groups == 0
    check_packing(counts, buckets[0], 16)


def test_plan_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="max_buckets"):
        plan_buckets(torch.tensor([1, 2]), 4, max_buckets=0)
    with pytest.raises(ValueError, match="strategy"):
        plan_buckets(torch.tensor([1, 2]), 4, strategy="knapsack")
    with pytest.raises(ValueError, match="capacity"):
        plan_buckets(torch.tensor([1, 5]), 4)
    with pytest.raises(ValueError, match="tile"):
        plan_buckets(torch.tensor([1]), 4, tile=0)


@pytest.mark.parametrize("grid,shift", [(28, 0), (28, 3), (14, 3)])
def test_plan_buckets_swin_stage(grid, shift):
    """Real window counts at 75% masking: valid buckets, logits within 1.25x of ``sum c^2``, where
    the single dp packing cannot get below 1.4x."""
    gen = torch.Generator().manual_seed(grid + shift)
    b, units = 32, 7
    visible = torch.rand(b, units * units, generator=gen).argsort(1).argsort(1) < 12
    sites = Sites.from_mask(visible.view(b, units, units), (grid, grid), 1)
    seg, _, num = window_segments(sites.batch, sites.coords, sites.grid, b, WindowSpec((7, 7), (shift, shift)))
    counts = torch.bincount(seg, minlength=num)
    buckets = plan_buckets(counts, 49)
    check_buckets(counts, buckets)
    single = pack_segments(counts, 49, "dp")
    lb = lower_bound(counts)
    assert packing_cost(single, 0) > 1.4 * lb
    assert sum(packing_cost(p, 0) for p in buckets) <= 1.25 * lb
    assert buckets_cost(buckets) <= packing_cost(single) + CALL_OVERHEAD


@pytest.mark.cuda
def test_plan_buckets_cuda_matches_cpu():
    counts = torch.randint(0, 50, (500,))
    for a, b in zip(plan_buckets(counts, 49, tile=16), plan_buckets(counts.cuda(), 49, tile=16)):
        assert (a.group_size, a.num_groups) == (b.group_size, b.num_groups)
        assert torch.equal(a.seg_group, b.seg_group.cpu()) and torch.equal(a.seg_offset, b.seg_offset.cpu())


def test_benchmark_smoke(capsys):
    """The benchmark's --small mode runs and prints its table."""
    spec = importlib.util.spec_from_file_location("bench_grouping", REPO / "benchmarks" / "bench_grouping.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--small"])
    out = capsys.readouterr().out
    assert "dp" in out and "max" in out and "pad ws2" in out and "dp K" in out
