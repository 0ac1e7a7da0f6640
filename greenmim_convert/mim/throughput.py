"""``--bench-steps``: whole training steps (encoder, decoder, loss, backward, clipping, AdamW) of the converted
model and the dense SimMIM baseline, alternating step by step in one process on batches already in memory."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from greenmim_convert.errors import InvalidInputError

from .build import build_mim
from .config import PretrainConfig
from .data import ResumableSampler, build_dataset
from .distributed import setup_distributed
from .masks import mask_generator
from .memory import minor_faults
from .optim import make_optimizer


@dataclass
class Throughput:
    """One side of ``--bench-steps``: wall time and minor page faults of every timed step."""

    name: str
    batch_size: int
    step_s: List[float]
    faults: List[int]

    @property
    def images_per_s(self) -> float:
        """Images per second of the median step."""
        return self.batch_size / statistics.median(self.step_s)

    @property
    def faults_per_step(self) -> float:
        """Median minor page faults of a step."""
        return float(statistics.median(self.faults))


def _pool(cfg: PretrainConfig, img_size, count: int, device: torch.device) -> List[torch.Tensor]:
    """Up to ``count`` batches of the configured data, loaded into memory."""
    dataset = build_dataset(cfg.data, img_size, cfg.seed, cfg.demo_size, cfg.min_crop_scale)
    sampler = ResumableSampler(dataset, 0, 1, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.workers)
    pool: List[torch.Tensor] = []
    for batch in loader:
        pool.append(batch.to(device))
        if len(pool) == count:
            break
    if not pool:
        raise InvalidInputError(f"{sampler.num_samples} samples make no batch of {cfg.batch_size}")
    return pool


def benchmark(cfg: PretrainConfig, malloc_note: Optional[str] = None) -> Dict[str, Throughput]:
    """Time ``cfg.bench_steps`` whole training steps of both sides after one warm-up step each, alternating (the
    first of each pair alternates too) on the same preloaded batches and masks; print images/s and page faults."""
    d = setup_distributed(cfg.device)
    if d.enabled:
        raise InvalidInputError("--bench-steps runs in one process")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    steps = int(cfg.bench_steps)
    sides = {}
    for name, dense in (("converted", False), ("dense", True)):
        model = build_mim(cfg, dense).model.to(d.device).train()
        if cfg.compile:
            model.compile()
        sides[name] = (model, make_optimizer(model, cfg.lr, cfg.weight_decay))
    converted = sides["converted"][0]
    pool = _pool(cfg, tuple(converted.encoder.img_size), min(4, steps + 1), d.device)
    mask = mask_generator(cfg.mask, converted.mask_grid, cfg.mask_ratio, cfg.secondary_ratio)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    masks = [mask(cfg.batch_size, gen).to(d.device) for _ in range(steps + 1)]
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    results = {name: Throughput(name, cfg.batch_size, [], []) for name in sides}
    for i in range(steps + 1):
        for name in list(sides) if i % 2 == 0 else list(sides)[::-1]:
            model, optimizer = sides[name]
            t0, faults0 = time.perf_counter(), minor_faults()
            with autocast:
                loss = model(pool[i % len(pool)], masks[i]).loss
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            if i > 0:
                results[name].step_s.append(time.perf_counter() - t0)
                results[name].faults.append(minor_faults() - faults0)
    _report(cfg, results, d.device.type, malloc_note)
    return results


def _report(cfg: PretrainConfig, results: Dict[str, Throughput], device: str, malloc_note: Optional[str]) -> None:
    conv, dense = results["converted"], results["dense"]
    print(
        f"{cfg.model}, batch {cfg.batch_size}, {cfg.mask} mask ratio {cfg.mask_ratio:g}, {device} "
        f"{'bf16 autocast' if cfg.bf16 else 'float32'}{', compiled' if cfg.compile else ''}, "
        f"{torch.get_num_threads()} threads, {cfg.bench_steps} timed steps each (whole training step, data in "
        f"memory); malloc: {malloc_note or 'glibc defaults'}"
    )
    for r in (conv, dense):
        ms = [1e3 * s for s in r.step_s]
        print(
            f"  {r.name:9s} {r.images_per_s:8.2f} images/s  ({statistics.median(ms):.0f} ms/step, min "
            f"{min(ms):.0f}, max {max(ms):.0f})  {r.faults_per_step:.0f} minor page faults/step"
        )
    print(f"  converted / dense: {conv.images_per_s / dense.images_per_s:.2f}x images/s")
