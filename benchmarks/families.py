"""The smallest model of every family, dense vs converted: speed-up, activation cut and FLOP ratio, one table.

Each row is one ``run_bench`` (the same measurement as ``greenmim-convert bench MODEL``): the dense
SimMIM-style step and the converted step alternate in this process. Prints a markdown table and writes
every number to JSON.

    python benchmarks/families.py --batch-size 8 --mask-ratio 0.75 --steps 3 --out benchmarks/families.json
    python benchmarks/families.py --steps 3 --repeats 3 --out benchmarks/families.json  # median of 3 runs, with range
    python benchmarks/families.py --threads 1 --out benchmarks/families_1thread.json  # one thread, see README
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import List

import torch

import greenmim_convert as gmc
from greenmim_convert.tools.bench import run_bench
from greenmim_convert.tools.models import build

SMALLEST = [
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224",
    "twins_pcpvt_small",
    "twins_svt_small",
    "pvt_v2_b2",
    "pvt_v2_b2_li",
    "davit_tiny",
    "focalnet_tiny_srf",
    "convnext_atto",
    "convnextv2_atto",
    "maxvit_rmlp_pico_rw_256",
    "maxvit_tiny_tf_224",
    "nest_tiny",
    "hiera_tiny_224",
    "gcvit_xxtiny",
    "mvitv2_tiny",
    "torchvision:maxvit_t",
]
HEADER = (
    "| model | dense step | converted step | speed-up | FLOP ratio | speed-up / FLOP ratio "
    "| activations saved for backward | FLOPs / ideal |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def row(name: str, batch: int, ratio: float, steps: int, repeats: int = 1) -> dict:
    """Build and convert one model, then measure it ``repeats`` times; times and speed-up are medians over the runs."""
    torch.manual_seed(0)
    built = build(name)
    green = gmc.convert(built.model.train(), img_size=built.img_size)
    runs = [run_bench(built.model, green, batch, ratio, steps) for _ in range(repeats)]
    res = runs[0]
    d, g = res.dense, res.green
    return dict(
        model=name,
        cpu_threads=res.cpu_threads,
        repeats=repeats,
        dense_ms=1e3 * statistics.median(r.dense.time_median_s for r in runs),
        green_ms=1e3 * statistics.median(r.green.time_median_s for r in runs),
        speedup=statistics.median(r.speedup for r in runs),
        speedup_runs=[r.speedup for r in runs],
        flops_ratio=res.flops_ratio,
        dense_mib=d.saved_bytes / 2**20,
        green_mib=g.saved_bytes / 2**20,
        saved_bytes_reduction=res.saved_bytes_reduction,
        flops_vs_ideal=res.flops_vs_ideal,
    )


def markdown(r: dict) -> str:
    runs, fr = r.get("speedup_runs", [r["speedup"]]), r["flops_ratio"]
    lo, hi = min(runs), max(runs)
    spread, of_flops = (f" ({lo:.2f}-{hi:.2f})", f" ({lo / fr:.2f}-{hi / fr:.2f})") if len(runs) > 1 else ("", "")
    return (
        f"| `{r['model']}` | {r['dense_ms']:.0f} ms | {r['green_ms']:.0f} ms | {r['speedup']:.2f}x{spread} "
        f"| {fr:.2f}x | {r['speedup'] / fr:.2f}{of_flops} "
        f"| {r['dense_mib']:.0f} -> {r['green_mib']:.0f} MiB ({100 * r['saved_bytes_reduction']:.0f}% less) "
        f"| {r['flops_vs_ideal']:.3f} |"
    )


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=SMALLEST, help="model names (torchvision:NAME for torchvision's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each model after one warm-up step")
    p.add_argument("--out", default=None, help="JSON file for every number")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measurements of each model (each its own interleaved run); the table gives the median and range",
    )
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be 0 or positive, got {args.threads}")
    if args.repeats < 1:
        p.error(f"--repeats must be positive, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(HEADER, flush=True)
    for name in args.models:
        rows.append(row(name, args.batch_size, args.mask_ratio, args.steps, args.repeats))
        print(markdown(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
