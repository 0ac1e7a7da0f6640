"""Benchmark a converted model against the dense SimMIM-style baseline, in one process.

Both run forward + backward of a simple loss, alternating step by step so that machine drift hits
both alike. Reported per model: wall time (median and spread), bytes of activations saved for
backward (deduplicated by storage, parameters excluded), peak CUDA memory, FLOPs, and for the
converted model the grouping time and padding overhead of every (stage, shift).
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from . import ops
from .convert import GreenModel
from .masking import random_mask
from .timing import wall_times


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward, once per storage, ignoring given tensors (parameters)."""

    def __init__(self, exclude: Optional[List[torch.Tensor]] = None):
        self._exclude = {t.untyped_storage().data_ptr() for t in (exclude or [])}
        self._seen: Dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @contextmanager
    def __call__(self) -> Iterator["SavedTensorCounter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def stem_conv(model: nn.Module) -> nn.Conv2d:
    """The convolution that embeds the image (the first Conv2d reading the input channels)."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            return mod
    raise ValueError(f"{type(model).__name__} has no Conv2d on the image to put a SimMIM mask token after")


class SimMIMDense(nn.Module):
    """The dense baseline: timm ``forward_features`` with masked stem outputs replaced by a learned token."""

    def __init__(self, model: nn.Module, mask_unit: int):
        super().__init__()
        self.model = model
        self.mask_unit = mask_unit
        self.stem = stem_conv(model)
        p = next(model.parameters())
        self.mask_token = nn.Parameter(torch.zeros(1, self.stem.out_channels, 1, 1, device=p.device, dtype=p.dtype))
        self._visible: Optional[torch.Tensor] = None

    def _hook(self, module, args, out):
        h, w = out.shape[-2:]
        vis = self._visible.repeat_interleave(h // self._visible.shape[1], 1).repeat_interleave(w // self._visible.shape[2], 2)
        return torch.where(vis[:, None], out, self.mask_token.to(out.dtype))

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        self._visible = visible
        handle = self.stem.register_forward_hook(self._hook)
        try:
            return self.model.forward_features(images)
        finally:
            handle.remove()
            self._visible = None


@dataclass
class ModelStats:
    """Measurements of one side of the comparison."""

    time_median_s: float
    time_spread_s: float
    saved_bytes: int
    flops: int
    peak_cuda_bytes: Optional[int] = None


@dataclass
class StageGrouping:
    grid: List[int]
    window: List[int]
    shift: List[int]
    tokens: int
    groups: str
    logits: int
    lower_bound: int
    padding_overhead: float
    time_ms: float


@dataclass
class BenchResult:
    model: str
    batch_size: int
    img_size: List[int]
    mask_ratio: float
    device: str
    dtype: str
    steps: int
    dense: ModelStats
    green: ModelStats
    speedup: float
    saved_bytes_reduction: float
    flops_ratio: float
    flops_ideal: int = 0
    flops_vs_ideal: float = 0.0
    grouping: List[StageGrouping] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return asdict(self)


def _step(fn: Callable[[], torch.Tensor]) -> None:
    loss = fn()
    loss.backward()


def measure_grouping(green: GreenModel, visible: torch.Tensor, repeats: int = 5) -> List[StageGrouping]:
    """Time every (stage, shift) grouping of the converted graph on this mask and report its padding."""
    rows = []
    gm = green.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not ops.window_grouping:
            continue
        site_node, window, shift, split, strategy = node.args
        _, grid, stride = site_node.args
        sites = ops.visible_sites(visible, grid, stride)
        times = wall_times(lambda: ops.window_grouping(sites, window, shift, split, strategy), repeats, visible.device)
        grp = ops.window_grouping(sites, window, shift, split, strategy)
        overhead = grp.logits / grp.lower_bound if grp.lower_bound else 1.0
        rows.append(StageGrouping(list(grid), list(window), list(shift), grp.num_tokens, grp.describe(),
                                  grp.logits, grp.lower_bound, overhead, 1e3 * statistics.median(times)))
    return rows


def exact_attention_fraction(green: GreenModel, visible: torch.Tensor) -> float:
    """Logits an exact per-window attention needs over those computed, weighted by each block's width."""
    gm = green.graph_module
    needed = computed = 0
    cache = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not ops.swin_window_attention:
            continue
        grp_node, attn_node = node.args[1], node.args[2]
        if grp_node not in cache:
            site_node, window, shift, split, strategy = grp_node.args
            sites = ops.visible_sites(visible, site_node.args[1], site_node.args[2])
            cache[grp_node] = ops.window_grouping(sites, window, shift, split, strategy)
        grp = cache[grp_node]
        width = gm.get_submodule(attn_node.target).proj.in_features
        needed += grp.lower_bound * width
        computed += grp.logits * width
    return needed / computed if computed else 1.0


def run_bench(
    model: nn.Module,
    green: GreenModel,
    batch_size: int = 8,
    mask_ratio: float = 0.75,
    steps: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> BenchResult:
    """Measure dense (SimMIM) and converted forward+backward on the same images, alternating."""
    p = next(green.parameters())
    device, dtype = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *green.img_size, generator=gen).to(device, dtype)
    visible = random_mask(batch_size, green.mask_grid, mask_ratio, generator=gen).to(device)
    dense = SimMIMDense(model, green.mask_unit)
    params = list(green.parameters()) + [dense.mask_token]

    def dense_loss() -> torch.Tensor:
        return dense(images, visible).float().pow(2).mean()

    def green_loss() -> torch.Tensor:
        return green(images, visible).last.feats.float().pow(2).mean()

    def zero() -> None:
        for q in params:
            q.grad = None

    tick = progress or (lambda msg: None)
    stats = {}
    for name, fn in (("dense", dense_loss), ("green", green_loss)):
        zero()
        counter = SavedTensorCounter(exclude=params)
        with counter():
            loss = fn()
        loss.backward()
        zero()
        with FlopCounterMode(display=False) as fc:
            _step(fn)
        attn = sum(v for k, v in fc.get_flop_counts().get("Global", {}).items() if "bmm" in str(k) or "scaled_dot_product" in str(k))
        stats[name] = {"saved": counter.bytes, "flops": int(fc.get_total_flops()), "attn": int(attn), "times": [], "peak": None}
        tick(f"{name}: counted activations and FLOPs")
    for i in range(warmup + steps):
        for name, fn in (("dense", dense_loss), ("green", green_loss)):
            zero()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            (elapsed,) = wall_times(lambda: _step(fn), 1, device)
            if i >= warmup:
                stats[name]["times"].append(elapsed)
                if device.type == "cuda":
                    stats[name]["peak"] = torch.cuda.max_memory_allocated(device)
            tick(f"step {i + 1}/{warmup + steps} {name}")
    zero()
    result = {}
    for name, s in stats.items():
        t = s["times"]
        result[name] = ModelStats(statistics.median(t), (max(t) - min(t)) if len(t) > 1 else 0.0, s["saved"], s["flops"], s["peak"])
    d, g = result["dense"], result["green"]
    ideal = g.flops - stats["green"]["attn"] * (1.0 - exact_attention_fraction(green, visible))
    return BenchResult(
        model=green.config.model_name, batch_size=batch_size, img_size=list(green.img_size), mask_ratio=mask_ratio,
        device=str(device), dtype=str(dtype).replace("torch.", ""), steps=steps, dense=d, green=g,
        speedup=d.time_median_s / g.time_median_s,
        saved_bytes_reduction=1.0 - g.saved_bytes / d.saved_bytes if d.saved_bytes else 0.0,
        flops_ratio=d.flops / g.flops if g.flops else float("inf"),
        flops_ideal=int(ideal), flops_vs_ideal=g.flops / ideal if ideal else 0.0,
        grouping=measure_grouping(green, visible),
    )
