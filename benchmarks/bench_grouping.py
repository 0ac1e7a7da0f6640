"""Window grouping strategies on Swin-B stages: grouping time and attention logits vs the lower bound.

Workload: Swin-B at 224 px (window 7, stage grids 56/28/14/7) and 384 px (window 12, grids
96/48/24/12), batch 64, mask ratio 0.75 drawn per sample over 32-pixel mask units (7x7 and 12x12
mask grids). For every (stage, shift) the window counts come from ``window_segments`` (shifted
windows split at the seam, as timm's mask does; the last stage has one window and no shift).

Columns, logits per head relative to the lower bound ``sum_i c_i^2`` (every window alone, no
padding), averaged over random batches:

* ``dense``: every window of the full grid at ws^2 tokens (what a masked dense model computes);
* ``pad ws2``: every non-empty window padded to ws^2;
* ``window``: every non-empty window alone, padded to the largest count;
* ``max``: GreenMIM (g = largest count, groups filled by max-fill knapsack);
* ``dp``: group size and packing chosen by the DP (``g dp`` is its mean group size);
* ``floor``: the least any single-group-size packing can reach, ``min_g L2(g) * g^2`` (Martello-Toth L2);
* ``dp K``: ``plan_buckets``, windows split by count into at most ``--max-buckets`` buckets, each
  packed by the DP with its own group size (``K`` is the mean number of buckets).

Times are medians of ``pack_segments`` (``plan_buckets`` for ``dp K``) over all repeats and
batches, in milliseconds, on the chosen device. The targets apply to ``dp K``, the grouping the
product uses. Prints numbers, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from greenmim_convert.api.masking import random_mask
from greenmim_convert.runtime.plan.grouping import WindowSpec, window_segments
from greenmim_convert.runtime.plan.packing import (
    STRATEGIES,
    group_count_bound,
    lower_bound,
    pack_segments,
    packing_cost,
    plan_buckets,
)
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.tools.timing import wall_times

# (image size, window, stage grids); the mask unit is 32 px, i.e. 8 tokens at patch 4.
SWIN_B: List[Tuple[int, int, Tuple[int, ...]]] = [(224, 7, (56, 28, 14, 7)), (384, 12, (96, 48, 24, 12))]
MASK_UNIT = 32
TIME_TARGET_MS = 2.0
LOGIT_TARGET = 1.25


def stage_counts(visible: torch.Tensor, grid: int, window: int, shift: int) -> torch.Tensor:
    """Visible tokens per (shifted) window of one stage, for a batch of masks ``(B, u, u)``."""
    sites = Sites.from_mask(visible, (grid, grid), 1)
    spec = WindowSpec((window, window), (shift, shift))
    seg, _, num = window_segments(sites.batch, sites.coords, sites.grid, visible.shape[0], spec)
    return torch.bincount(seg, minlength=num)


def timed_ms(fn, repeats: int, device: torch.device) -> List[float]:
    """Wall times of ``repeats`` calls of ``fn`` in milliseconds (synchronised on CUDA)."""
    return [1e3 * t for t in wall_times(fn, repeats, device)]


def single_size_floor(counts: torch.Tensor, capacity: int, tile: int) -> float:
    """``min_g L2(g) * g^2`` over admissible group sizes: no single-g packing has fewer logits."""
    top = int(counts.max())
    if top == 0:
        return 0.0
    cpu = counts.cpu()
    first = -(-top // tile) * tile
    last = -(-capacity // tile) * tile
    return float(min(group_count_bound(cpu, g) * g * g for g in range(first, last + 1, tile)))


def run_stage(
    size: int, window: int, grid: int, shift: int, args: argparse.Namespace, device: torch.device
) -> Dict[str, float]:
    """Average ratios and median times of every strategy on one (stage, shift)."""
    gen = torch.Generator().manual_seed(args.seed + 1000 * grid + shift)
    units = size // MASK_UNIT
    capacity = window * window
    ratios: Dict[str, List[float]] = {k: [] for k in ("dense", "pad ws2", "floor", *STRATEGIES, "dp K")}
    times: Dict[str, List[float]] = {k: [] for k in (*STRATEGIES, "dp K")}
    group_sizes: List[int] = []
    num_buckets: List[int] = []
    for _ in range(args.batches):
        visible = random_mask(args.batch, units, args.ratio, generator=gen).to(device)
        counts = stage_counts(visible, grid, window, shift)
        lb = lower_bound(counts)
        nonempty = int((counts > 0).sum())
        ratios["dense"].append(args.batch * (grid // window) ** 2 * capacity**2 / lb)
        ratios["pad ws2"].append(nonempty * capacity**2 / lb)
        ratios["floor"].append(single_size_floor(counts, capacity, args.tile) / lb)
        for strategy in STRATEGIES:
            packing = pack_segments(counts, capacity, strategy, tile=args.tile)
            ratios[strategy].append(packing_cost(packing, 0) / lb)
            if strategy == "dp":
                group_sizes.append(packing.group_size)
            times[strategy] += timed_ms(
                lambda: pack_segments(counts, capacity, strategy, tile=args.tile), args.repeats, device
            )
        buckets = plan_buckets(counts, capacity, args.max_buckets, tile=args.tile)
        ratios["dp K"].append(sum(packing_cost(p, 0) for p in buckets) / lb)
        num_buckets.append(len(buckets))
        times["dp K"] += timed_ms(
            lambda: plan_buckets(counts, capacity, args.max_buckets, tile=args.tile), args.repeats, device
        )
    row = {k: statistics.fmean(v) for k, v in ratios.items()}
    row.update({f"ms {k}": statistics.median(v) for k, v in times.items()})
    row["g dp"] = statistics.fmean(group_sizes)
    row["K"] = statistics.fmean(num_buckets)
    row["segments"] = float(counts.numel())
    return row


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--batches", type=int, default=20, help="random batches averaged per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch and strategy")
    parser.add_argument(
        "--tile", type=int, default=1, help="group sizes are multiples of it (16 for the Triton kernel)"
    )
    parser.add_argument("--max-buckets", type=int, default=6, help="buckets of the dp K column")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="smoke run: batch 4, 2 batches, 224 px only")
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.batches, args.repeats = 4, 2, 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = SWIN_B[:1] if args.small else SWIN_B
    print(
        f"Swin-B window grouping: batch {args.batch}, mask ratio {args.ratio}, {args.batches} batches, "
        f"tile {args.tile}, device {device}, {torch.get_num_threads()} CPU threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"targets (dp K, at most {args.max_buckets} buckets): grouping < {TIME_TARGET_MS:g} ms per (stage, shift) "
        f"at 224 px; logits <= {LOGIT_TARGET:g}x the lower bound sum c^2 at every stage"
    )
    print("logits / lower bound (mean) | grouping time, median ms")
    header = (
        f"{'px':>4} {'grid':>4} {'shift':>5} {'windows':>7} | {'dense':>6} {'pad ws2':>7} {'window':>6} "
        f"{'max':>6} {'dp':>6} {'floor':>6} {'g dp':>5} {'dp K':>6} {'K':>4} | "
        f"{'window':>6} {'max':>6} {'dp':>6} {'dp K':>6} | target"
    )
    print(header)
    print("-" * len(header))
    for size, window, grids in configs:
        for grid in grids:
            for shift in (0, window // 2) if grid > window else (0,):
                r = run_stage(size, window, grid, shift, args, device)
                notes = []
                if size == 224 and not args.small and r["ms dp K"] >= TIME_TARGET_MS:
                    notes.append("time")
                if r["dp K"] > LOGIT_TARGET:
                    notes.append("logits")
                print(
                    f"{size:>4} {grid:>4} {shift:>5} {int(r['segments']):>7} | {r['dense']:>6.2f} {r['pad ws2']:>7.2f} "
                    f"{r['window']:>6.2f} {r['max']:>6.3f} {r['dp']:>6.3f} {r['floor']:>6.3f} {r['g dp']:>5.1f} "
                    f"{r['dp K']:>6.3f} {r['K']:>4.1f} | "
                    f"{r['ms window']:>6.3f} {r['ms max']:>6.3f} {r['ms dp']:>6.3f} {r['ms dp K']:>6.3f} | "
                    f"{'missed: ' + ', '.join(notes) if notes else 'met'}"
                )


if __name__ == "__main__":
    main()
