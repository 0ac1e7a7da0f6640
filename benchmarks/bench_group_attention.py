"""Window attention of the runtime on CUDA: the fused Triton kernel vs the runtime's PyTorch path, forward and
forward+backward.

Workloads are Swin stages (grid, 7x7 windows, heads, head dim 32 by default) at mask ratio 0.75: the visible
tokens of a random per-image mask, grouped by the planner (``digit_grouping``, DP packing), with a trainable
``(heads, 49, 49)`` relative-position bias; both paths run ``attention.window_attention`` on the same grouping,
with the program's backend "torch" or "triton". Prints numbers, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from greenmim_convert.api.masking import random_mask
from greenmim_convert.runtime.attention import AttentionProgram, Step, window_attention
from greenmim_convert.runtime.plan import Sites, digit_grouping
from greenmim_convert.runtime.plan.grouping import DigitWindows
from greenmim_convert.runtime.plan.terms import TermPlan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WINDOW = 7
# (grid, heads, batch): Swin-T and Swin-B stages at 224px (mask grid 7x7), batch 128.
CONFIGS: List[Tuple[int, int, int]] = [
    (56, 3, 128),
    (28, 6, 128),
    (14, 12, 128),
    (56, 4, 128),
    (28, 8, 128),
    (14, 16, 128),
]


def swin_windows(grid: int, window: int = WINDOW) -> DigitWindows:
    """Unshifted ``window x window`` windows of a square grid, positions raster inside a window."""
    n = grid // window
    shared, token = (("h", n, window), ("w", n, window)), (("h", window, 1), ("w", window, 1))
    return DigitWindows((grid, grid), (0, 0), shared, token)


def bias_program(heads: int, scale: float, backend: str, window: int = WINDOW) -> AttentionProgram:
    """``softmax(scale * q kᵀ + bias[h, pos_q, pos_k]) v`` with a ``(heads, N, N)`` bias, ``N = window²``."""
    n = window * window
    plan = TermPlan(
        ((0, heads, n * n),),
        (("h", window, 1, window * n), ("w", window, 1, n)),
        (("h", window, 1, window), ("w", window, 1, 1)),
    )
    steps = (Step("scalar", torch.ops.aten.mul.Tensor, scale), Step("term", torch.ops.aten.add.Tensor, 0))
    return AttentionProgram(heads, (heads,), steps, (), (plan,), backend)


def time_ms(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median of ``iters`` timings of ``fn`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        import time

        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)
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
    grid: int,
    heads: int,
    batch: int,
    d: int,
    dtype: torch.dtype,
    iters: int,
    warmup: int,
    seed: int,
    ratio: float = 0.75,
    device: str = "cuda",
) -> dict:
    """Times and accuracy of both paths on one workload."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    visible = random_mask(batch, (7, 7), ratio, generator=gen).to(dev)
    sites = Sites.from_mask(visible, (grid, grid), 224 // grid)
    grouping = digit_grouping(sites, swin_windows(grid), None, "dp")
    tokens = sites.num_tokens
    q, k, v = (torch.randn(tokens, heads * d, generator=gen).to(dev, dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(heads, WINDOW**2, WINDOW**2, generator=gen).to(dev).requires_grad_()
    grad = torch.randn(tokens, heads * d, generator=gen).to(dev, dtype)
    row = {"T": tokens, "groups": grouping.describe()}
    outs = {}
    for name in ("torch", "triton"):
        program = bias_program(heads, d**-0.5, name)

        def forward() -> torch.Tensor:
            return window_attention(q, k, v, grouping, program, [bias.to(dtype)], [])

        def forward_backward() -> None:
            torch.autograd.grad(forward(), (q, k, v, bias), grad)

        with torch.no_grad():
            row[f"{name}_fwd"] = time_ms(forward, iters, warmup, dev)
        row[f"{name}_fb"] = time_ms(forward_backward, iters, warmup, dev)
        if dev.type == "cuda":
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
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply every workload's batch size")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_group_attention needs a CUDA GPU (the fused kernel is timed against the PyTorch path "
            "on CUDA); none found, nothing to do."
        )
        return 0
    dtype = DTYPES[args.dtype]
    print(
        f"device {torch.cuda.get_device_name()}  dtype {args.dtype}  head dim {args.head_dim}  "
        f"median of {args.iters} (ms)"
    )
    header = (
        f"{'grid':>4} {'heads':>5} {'T':>7} | {'fwd torch':>9} {'triton':>7} {'x':>5} | "
        f"{'f+b torch':>9} {'triton':>7} {'x':>5} | {'MiB torch':>9} {'triton':>7} | {'rel err':>8} | groups"
    )
    print(header)
    print("-" * len(header))
    for grid, heads, batch in CONFIGS:
        r = bench_config(
            grid, heads, max(1, int(batch * args.batch_scale)), args.head_dim, dtype, args.iters, args.warmup, args.seed
        )
        print(
            f"{grid:>4} {heads:>5} {r['T']:>7} | {r['torch_fwd']:>9.3f} {r['triton_fwd']:>7.3f} "
            f"{r['torch_fwd'] / r['triton_fwd']:>5.2f} | {r['torch_fb']:>9.3f} {r['triton_fb']:>7.3f} "
            f"{r['torch_fb'] / r['triton_fb']:>5.2f} | {r['torch_mem']:>9.1f} {r['triton_mem']:>7.1f} | "
            f"{r['err']:>8.1e} | {r['groups']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
