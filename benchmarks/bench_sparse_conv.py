"""Sparse vs dense depthwise convolution under a MIM mask: wall-time ratio, forward and forward+backward.

Default workload: depthwise 3x3 (padding 1) on a 56x56x128 map, batch 32, mask ratio 0.75 with mask
units of 8x8 cells (a stage-1 feature map of a 224-pixel image at patch 4 with 32-pixel units). The
dense baseline is ``F.conv2d`` on the full map (NCHW, as timm runs it, and channels-last), measured
in the same process; the sparse conv runs on the visible tokens only, through the gather reference
(``torch``), the depthwise gather (``gather``: native CPU loops where they are built) and the tiled
path (``tiles``). Build times of the sites, the neighbour map and the tile
plan are reported too: a converted model pays them once per grid and mask, not per conv. Prints
numbers, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from greenmim_convert.kernels.sparse_conv import build_neighbor_map, build_tile_plan, sparse_conv2d
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.tools.timing import wall_times


def random_visible(batch: int, units: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, units, units)`` bool mask with exactly ``round(units^2 * (1 - ratio))`` visible units per sample."""
    n = units * units
    keep = max(1, round(n * (1.0 - mask_ratio)))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    visible = torch.zeros(batch, n, dtype=torch.bool)
    visible.scatter_(1, order[:, :keep], True)
    return visible.view(batch, units, units)


def timed(fn: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds."""
    return statistics.median(wall_times(fn, repeats, device, warmup))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--small`` shrinks everything to a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=56, help="feature map height and width (cells)")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--unit", type=int, default=8, help="mask unit, in cells")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="torch,gather,tiles", help="comma-separated sparse backends to time")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny smoke-test configuration")
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.size, args.channels, args.unit = 2, 16, 8, 4
        args.repeats, args.warmup = 2, 1
    if args.size % args.unit:
        parser.error("--size must be a multiple of --unit")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark and print the timings and ratios."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    b, n, c, k = args.batch, args.size, args.channels, args.kernel
    pad = k // 2
    visible = random_visible(b, n // args.unit, args.mask_ratio, gen)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def build_sites() -> Sites:
        """Sites and their index grid from the mask, as a converted model builds them per batch."""
        fresh = Sites.from_mask(visible.to(device), (n, n), 1)
        fresh.index_grid()
        sync()
        return fresh

    sites = build_sites()
    t_sites = timed(build_sites, args.repeats, 1, device)
    t_map = timed(lambda: build_neighbor_map(sites, sites, k, 1, pad, 1), args.repeats, 1, device)
    t_plan = timed(lambda: build_tile_plan(sites, sites, k, 1, pad, 1), args.repeats, 1, device)
    nmap = build_neighbor_map(sites, sites, k, 1, pad, 1)
    plan = build_tile_plan(sites, sites, k, 1, pad, 1)

    weight = torch.randn(c, 1, k, k, generator=gen).to(device).requires_grad_()
    bias = torch.randn(c, generator=gen).to(device).requires_grad_()
    dense_visible = visible.repeat_interleave(args.unit, 1).repeat_interleave(args.unit, 2).to(device)
    dense = (torch.randn(b, c, n, n, generator=gen).to(device) * dense_visible[:, None]).requires_grad_()
    dense_cl = dense.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    at_sites = (sites.batch, sites.coords[:, 0], sites.coords[:, 1])
    feats = dense.detach().permute(0, 2, 3, 1)[at_sites].contiguous().requires_grad_()
    grad_dense = torch.randn(b, c, n, n, generator=gen).to(device)
    grad_dense_cl = grad_dense.contiguous(memory_format=torch.channels_last)
    grad_sparse = grad_dense.permute(0, 2, 3, 1)[at_sites].contiguous()
    leaves = (dense, dense_cl, feats, weight, bias)

    def step(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
        """Forward + backward of ``fn`` with fresh gradients."""

        def run() -> None:
            for t in leaves:
                t.grad = None
            fn().backward(grad)

        return run

    def sparse(name: str) -> Callable[[], torch.Tensor]:
        """Forward of the sparse conv on backend ``name``, with the prebuilt map and plan."""
        return lambda: sparse_conv2d(
            feats, sites, sites, weight, bias, padding=pad, groups=c, neighbor_map=nmap, tile_plan=plan, backend=name
        )

    runs = {
        "dense NCHW": (lambda: F.conv2d(dense, weight, bias, padding=pad, groups=c), grad_dense),
        "dense channels_last": (lambda: F.conv2d(dense_cl, weight, bias, padding=pad, groups=c), grad_dense_cl),
    }
    for name in [x for x in args.backends.split(",") if x]:
        runs[f"sparse {name}"] = (sparse(name), grad_sparse)

    with torch.no_grad():
        ref = runs["dense NCHW"][0]().permute(0, 2, 3, 1)[at_sites]
    ms = 1e3
    print(
        f"depthwise {k}x{k} conv, map {n}x{n}x{c}, batch {b}, mask ratio {args.mask_ratio} "
        f"(units {args.unit}x{args.unit} cells), device {device}, threads {torch.get_num_threads()}"
    )
    print(
        f"visible tokens: {sites.num_tokens} of {b * n * n} ({sites.num_tokens / (b * n * n):.3f}); "
        f"tiles {plan.tile[0]}x{plan.tile[1]}: {plan.num_tiles}, occupancy {plan.occupancy:.3f}"
    )
    print(
        f"build: sites + index grid {t_sites * ms:.3f} ms, neighbour map {t_map * ms:.3f} ms, "
        f"tile plan {t_plan * ms:.3f} ms"
    )
    results = {}
    for name, (fwd, grad) in runs.items():
        with torch.no_grad():
            out = fwd()
            diff = (out - ref).abs().max().item() if name.startswith("sparse") else 0.0
            t_f = timed(fwd, args.repeats, args.warmup, device)
        t_fb = timed(step(fwd, grad), args.repeats, args.warmup, device)
        results[name] = (t_f, t_fb)
        print(
            f"{name:22s} forward {t_f * ms:9.3f} ms   forward+backward {t_fb * ms:9.3f} ms   "
            f"max |diff| vs dense {diff:.2e}"
        )
    base_f, base_fb = results["dense NCHW"]
    cl_f, cl_fb = results["dense channels_last"]
    for name, (t_f, t_fb) in results.items():
        if name.startswith("sparse"):
            print(
                f"{name:22s} sparse/dense time ratio: forward {t_f / base_f:.3f}, "
                f"forward+backward {t_fb / base_fb:.3f} "
                f"(vs channels_last: {t_f / cl_f:.3f}, {t_fb / cl_fb:.3f})"
            )


if __name__ == "__main__":
    main()
