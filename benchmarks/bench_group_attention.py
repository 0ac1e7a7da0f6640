"""Fused Triton group attention vs the PyTorch reference path, forward and forward+backward, on CUDA.

Workloads are Swin-like packed groups (group size g in 16..64, 3..32 heads, head dim 32 by default):
each group holds whole windows of random sizes (1..min(g, N) visible tokens of an N-token window)
plus padding slots, with a trainable (heads, N, N) relative-position bias. The reference path
materialises the (G, heads, g, g) bias + mask and calls ``scaled_dot_product_attention``; the fused
kernel gathers the bias and mask on the fly. Prints numbers, asserts nothing about time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from greenmim_convert.kernels.group_attention import group_attention_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (group size g, heads, window tokens N, total slots G * g): Swin-T/B stages at 75% masking, batch ~128.
CONFIGS: List[Tuple[int, int, int, int]] = [
    (16, 3, 49, 131072),
    (32, 4, 49, 131072),
    (49, 6, 49, 65536),
    (64, 8, 64, 32768),
    (32, 12, 49, 16384),
    (49, 16, 49, 16384),
    (64, 24, 64, 8192),
    (64, 32, 64, 8192),
]


def make_groups(num_groups: int, g: int, n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``segment`` and ``position`` (G, g): whole windows of random sizes per group, then padding."""
    segment = torch.empty(num_groups, g, dtype=torch.long)
    position = torch.randint(0, n, (num_groups, g), generator=gen)
    next_id = 0
    for row in range(num_groups):
        filled = 0
        while filled < g:
            size = int(torch.randint(1, min(g, n) + 1, (1,), generator=gen))
            if filled + size > g:
                break
            segment[row, filled:filled + size] = next_id
            position[row, filled:filled + size] = torch.randperm(n, generator=gen)[:size]
            next_id += 1
            filled += size
        segment[row, filled:] = -1 - torch.arange(row * g + filled, (row + 1) * g)
    return segment, position


def cuda_time_ms(fn: Callable[[], None], iters: int, warmup: int) -> float:
    """Median of ``iters`` CUDA-event timings of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def bench_config(
    g: int, heads: int, n: int, slots: int, d: int, dtype: torch.dtype, iters: int, warmup: int, seed: int
) -> dict:
    """Times and accuracy of both paths on one workload."""
    from greenmim_convert.kernels.triton_group_attention import group_attention_triton

    gen = torch.Generator().manual_seed(seed)
    num_groups = max(1, slots // g)
    segment, position = make_groups(num_groups, g, n, gen)
    dev = torch.device("cuda")
    segment, position = segment.to(dev), position.to(dev)
    q, k, v = (torch.randn(num_groups, heads, g, d, generator=gen).to(dev, dtype).requires_grad_()
               for _ in range(3))
    bias = torch.randn(heads, n, n, generator=gen).to(dev).requires_grad_()
    grad = torch.randn(num_groups, heads, g, d, generator=gen).to(dev, dtype)
    scale = d ** -0.5
    paths = {"torch": group_attention_reference, "triton": group_attention_triton}
    row = {"G": num_groups}
    outs = {}
    for name, fn in paths.items():
        def forward() -> torch.Tensor:
            return fn(q, k, v, segment, position, bias, scale)

        def forward_backward() -> None:
            torch.autograd.grad(forward(), (q, k, v, bias), grad)

        with torch.no_grad():
            row[f"{name}_fwd"] = cuda_time_ms(forward, iters, warmup)
        row[f"{name}_fb"] = cuda_time_ms(forward_backward, iters, warmup)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        row[f"{name}_mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        outs[name] = forward().float()
    ref = outs["torch"]
    row["err"] = ((outs["triton"] - ref).abs().max() / ref.abs().max()).item()
    return row


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-slots", type=float, default=1.0, help="multiply every workload's G * g")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_group_attention needs a CUDA GPU (the fused kernel is timed against the PyTorch path "
              "on CUDA); none found, nothing to do.")
        return 0
    dtype = DTYPES[args.dtype]
    print(f"device {torch.cuda.get_device_name()}  dtype {args.dtype}  head dim {args.head_dim}  "
          f"median of {args.iters} (ms)")
    header = (f"{'g':>3} {'heads':>5} {'N':>3} {'G':>6} | {'fwd torch':>9} {'triton':>7} {'x':>5} | "
              f"{'f+b torch':>9} {'triton':>7} {'x':>5} | {'MiB torch':>9} {'triton':>7} | {'rel err':>8}")
    print(header)
    print("-" * len(header))
    for g, heads, n, slots in CONFIGS:
        r = bench_config(g, heads, n, int(slots * args.scale_slots), args.head_dim, dtype,
                         args.iters, args.warmup, args.seed)
        print(f"{g:>3} {heads:>5} {n:>3} {r['G']:>6} | {r['torch_fwd']:>9.3f} {r['triton_fwd']:>7.3f} "
              f"{r['torch_fwd'] / r['triton_fwd']:>5.2f} | {r['torch_fb']:>9.3f} {r['triton_fb']:>7.3f} "
              f"{r['torch_fb'] / r['triton_fb']:>5.2f} | {r['torch_mem']:>9.1f} {r['triton_mem']:>7.1f} | "
              f"{r['err']:>8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
