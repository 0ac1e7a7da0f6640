"""Wall-clock timing of a callable, synchronised on CUDA so that kernel time is counted."""

from __future__ import annotations

import time
from typing import Callable, List

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work; nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 0) -> List[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out
