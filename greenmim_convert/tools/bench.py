"""Benchmark a converted model against the dense SimMIM-style baseline, in one process.

Both run forward + backward of a simple loss, alternating step by step so that machine drift hits
both alike. Reported per model: wall time (median and spread), bytes of activations saved for
backward (deduplicated by storage, parameters excluded), peak CUDA memory, FLOPs (counted with
:func:`greenmim_convert.tools.flops.flop_counter`, which counts grouped-convolution gradients and CPU
fused attention correctly), the converted model's FLOPs against a visible-only ideal derived from
the dense model alone (:func:`greenmim_convert.tools.flops.visible_only_ideal`), and for the converted
model the grouping time and padding overhead of every window grouping of its graph.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from greenmim_convert.api.convert import GreenModel
from greenmim_convert.api.masking import random_mask
from greenmim_convert.compiler.capture import input_channels
from greenmim_convert.mim.dense import SimMIMDense, dense_features
from greenmim_convert.runtime import attention
from greenmim_convert.runtime import plan as planner
from greenmim_convert.runtime.plan.grouping import DigitWindows
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.program import Program
from greenmim_convert.tools.flops import attention_pair_fraction, count_flops, visible_fraction, visible_only_ideal
from greenmim_convert.tools.timing import wall_times


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

    def census(self, root: torch.Tensor) -> Dict[str, int]:
        """Bytes counted here per autograd node kind (``grad_fn`` name) that saved them, read from ``root``'s graph.

        Call before ``root``'s backward frees the saved tensors. A storage saved by several nodes is charged to
        the first of them in forward order (lowest sequence number); storages no reachable node holds fall under
        ``"(unattributed)"``, so the values always sum to :attr:`bytes`.
        """
        owner: Dict[int, Tuple[int, str]] = {}
        for node in _graph_nodes(root.grad_fn):
            seq, kind = node._sequence_nr(), node.name()
            for t in _saved_tensors(node):
                ptr = t.untyped_storage().data_ptr()
                if ptr in self._seen and (ptr not in owner or seq < owner[ptr][0]):
                    owner[ptr] = (seq, kind)
        out: Dict[str, int] = {}
        for ptr, nbytes in self._seen.items():
            kind = owner[ptr][1] if ptr in owner else "(unattributed)"
            out[kind] = out.get(kind, 0) + nbytes
        return out

    @contextmanager
    def __call__(self) -> Iterator["SavedTensorCounter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def _graph_nodes(root: Optional[Any]) -> List[Any]:
    """Every autograd node reachable from ``root`` (each once)."""
    seen, stack, out = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return out


def _saved_tensors(node: Any) -> List[torch.Tensor]:
    """The tensors an autograd node holds for its backward: ``ctx.saved_tensors`` of a custom Function, else
    the ``_saved_*`` attributes a built-in node exposes (tensors or lists of tensors)."""
    if hasattr(node, "saved_tensors"):
        return [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    out = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        value = getattr(node, name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


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
    """One window grouping of the graph: its grid, window shape (rows, cols) and roll shift, and its packing."""

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
class CompiledStats:
    """``torch.compile`` (inductor) of both sides: step times after warm-up, compile time apart (the first step)."""

    dense_time_median_s: float
    green_time_median_s: float
    dense_compile_s: float
    green_compile_s: float
    speedup: float  # compiled dense / compiled converted
    green_vs_eager: float  # eager converted / compiled converted
    dense_vs_eager: float  # eager dense / compiled dense


@dataclass
class ProfileRow:
    """One op of a step's profile: self CPU time summed over its calls, and the number of calls."""

    op: str
    self_cpu_ms: float
    calls: int


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
    visible_fraction: float = 0.0
    pair_fraction: float = 0.0
    grouping: List[StageGrouping] = field(default_factory=list)
    compiled: Optional[CompiledStats] = None
    saved_by_node: Dict[str, Dict[str, int]] = field(default_factory=dict)
    profile: Dict[str, List[ProfileRow]] = field(default_factory=dict)
    cpu_threads: int = 0

    def to_dict(self) -> Dict:
        return asdict(self)


class _CompiledDense(nn.Module):
    """``SimMIMDense`` with its mask-token hook registered once (while benchmarking), so dynamo traces one graph."""

    def __init__(self, dense: SimMIMDense):
        super().__init__()
        self.dense = dense

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        d = self.dense
        d._visible = visible
        return dense_features(d.model, images)


def compiled_stats(
    dense: SimMIMDense,
    green: GreenModel,
    images: torch.Tensor,
    visible: torch.Tensor,
    steps: int,
    warmup: int,
    eager: Dict[str, float],
    tick: Callable[[str], None],
) -> CompiledStats:
    """Step times of ``torch.compile`` d dense and converted models, alternating; the first step (which compiles)
    is timed apart, then ``warmup`` untimed steps. ``eager`` holds the eager medians for the ratios."""
    handle = dense.stem.register_forward_hook(dense._hook)
    try:
        fns = {"dense": torch.compile(_CompiledDense(dense)), "green": torch.compile(green)}
        params = list(green.parameters()) + [dense.mask_token]
        losses = {
            "dense": lambda: fns["dense"](images, visible).float().pow(2).mean(),
            "green": lambda: fns["green"](images, visible).last.feats.float().pow(2).mean(),
        }
        first: Dict[str, float] = {}
        times: Dict[str, List[float]] = {"dense": [], "green": []}
        for i in range(1 + warmup + steps):
            for name, fn in losses.items():
                for q in params:
                    q.grad = None
                (elapsed,) = wall_times(lambda: _step(fn), 1, images.device)
                if i == 0:
                    first[name] = elapsed
                elif i > warmup:
                    times[name].append(elapsed)
                tick(f"compiled step {i + 1}/{1 + warmup + steps} {name}")
    finally:
        handle.remove()
        dense._visible = None
    d, g = statistics.median(times["dense"]), statistics.median(times["green"])
    return CompiledStats(d, g, first["dense"], first["green"], d / g, eager["green"] / g, eager["dense"] / d)


def _step(fn: Callable[[], torch.Tensor]) -> None:
    loss = fn()
    loss.backward()


def profile_step(fn: Callable[[], torch.Tensor], top: int = 15) -> List[ProfileRow]:
    """The ``top`` ops by self CPU time of one forward+backward of ``fn``, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(fn)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [ProfileRow(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:top]]


def census_rows(saved_by_node: Dict[str, Dict[str, int]], top: int = 12) -> List[Tuple[str, int, int]]:
    """``(node kind, dense bytes, converted bytes)``: the ``top`` kinds saving most on either side, largest
    first, then one row summing the rest, so that each column still sums to that side's total."""
    dense, green = saved_by_node.get("dense", {}), saved_by_node.get("green", {})
    kinds = sorted(set(dense) | set(green), key=lambda k: (-max(dense.get(k, 0), green.get(k, 0)), k))
    rows = [(k, dense.get(k, 0), green.get(k, 0)) for k in kinds[:top]]
    rest = kinds[top:]
    if rest:
        rows.append(
            (f"({len(rest)} other kinds)", sum(dense.get(k, 0) for k in rest), sum(green.get(k, 0) for k in rest))
        )
    return rows


def _constant(gm: fx.GraphModule, arg: Any) -> Any:
    """The value of a ``get_attr`` argument (a constant the passes stored on the graph), else the argument."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return attrgetter(arg.target)(gm)
    return arg


def window_shape(windows: DigitWindows) -> List[int]:
    """Rows and columns of a window: the product of its token digits along each axis."""
    shape = [1, 1]
    for kind, size, _ in windows.token:
        shape["hw".index(kind)] *= size
    return shape


def _sites_of(node: fx.Node, visible: torch.Tensor) -> Sites:
    """The sites a ``visible_sites`` node (or a ``padded_sites`` or ``picked_sites`` node of one) computes for
    ``visible``."""
    if node.target is planner.padded_sites:
        image, border = node.args
        return planner.padded_sites(_sites_of(image, visible), border)
    if node.target is planner.picked_sites:
        fine, *rest = node.args
        return planner.picked_sites(_sites_of(fine, visible), *rest)
    _, grid, stride = node.args
    return planner.visible_sites(visible, grid, stride)


def measure_grouping(green: GreenModel, visible: torch.Tensor, repeats: int = 5) -> List[StageGrouping]:
    """Time every ``digit_grouping`` of the converted program's plan on this mask and report its padding."""
    rows = []
    gm = green.program.plan_gm
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not planner.digit_grouping:
            continue
        site_node, windows, labels, strategy = node.args
        windows, labels = _constant(gm, windows), _constant(gm, labels)
        sites = _sites_of(site_node, visible)
        grid = sites.grid
        times = wall_times(lambda: planner.digit_grouping(sites, windows, labels, strategy), repeats, visible.device)
        grp = planner.digit_grouping(sites, windows, labels, strategy)
        overhead = grp.logits / grp.lower_bound if grp.lower_bound else 1.0
        rows.append(
            StageGrouping(
                list(grid),
                window_shape(windows),
                list(windows.offset),
                grp.num_tokens,
                grp.describe(),
                grp.logits,
                grp.lower_bound,
                overhead,
                1e3 * statistics.median(times),
            )
        )
    return rows


class _AttentionCensus(fx.Interpreter):
    """Runs the converted program's compute graph and sums, over its attention calls, the logits computed and those
    an exact attention needs, each weighted by the width of q (heads x head dim)."""

    def __init__(self, program: Program):
        super().__init__(program.compute_gm)
        self.program = program
        self.needed = 0
        self.computed = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        call = self.program.call_of(n)
        if call is None:
            return out
        args, _ = call.bind([self.env[a] for a in n.args[1]])
        if call.fn is attention.window_attention:
            q, grp = args[0], args[3]
            self.needed += grp.lower_bound * q.shape[1]
            self.computed += grp.logits * q.shape[1]
        elif call.fn is attention.sample_attention:
            q, q_sites, k_sites = args[0], args[1], args[3]
            nq, nk = q_sites.counts(), k_sites.counts()
            if nq.numel():
                self.needed += int((nq * nk).sum()) * q.shape[1]
                self.computed += q_sites.batch_size * int(nq.max()) * int(nk.max()) * q.shape[1]
        return out


def exact_attention_fraction(green: GreenModel, visible: torch.Tensor, images: Optional[torch.Tensor] = None) -> float:
    """Logits an exact per-window (or per-sample) attention needs over those computed, weighted by each block's width.

    Runs the graph once without grad (on random images when none are given) to read the groupings and widths.
    """
    if images is None:
        p = next(green.parameters())
        gen = torch.Generator().manual_seed(0)
        chans = input_channels(green.source_model)
        images = torch.randn(visible.shape[0], chans, *green.img_size, generator=gen).to(p.device, p.dtype)
    program = green.program
    census = _AttentionCensus(program)
    with torch.no_grad():
        census.run(images, visible, *program.plan(visible))
    program.objects.clear()
    return census.needed / census.computed if census.computed else 1.0


def run_bench(
    model: nn.Module,
    green: GreenModel,
    batch_size: int = 8,
    mask_ratio: float = 0.75,
    steps: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    compile: bool = False,
    profile: int = 0,
) -> BenchResult:
    """Measure dense (SimMIM) and converted forward+backward on the same images, alternating.

    ``flops_ideal`` comes from the dense model alone: its FLOPs per op, token-wise work scaled by the visible
    fraction of positions and attention products by the fraction of (visible query, visible key) pairs of its
    windows, read from one forward under the oracle's hooks (:func:`greenmim_convert.tools.flops.visible_only_ideal`).
    For Swin this is the value the converted graph's own census gave before (its token-wise FLOPs plus its
    attention FLOPs times needed / computed logits, :func:`exact_attention_fraction`): two independent routes
    that agree exactly (tests/test_flops.py). With ``compile``, both models are also timed under ``torch.compile``
    (:func:`compiled_stats`).

    ``saved_by_node`` splits each side's bytes saved for backward by the autograd node kind that saved them
    (:meth:`SavedTensorCounter.census`); ``profile > 0`` adds the top ``profile`` ops by self CPU time of one
    more step of each side, after the timed ones.
    """
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
        census = counter.census(loss)
        loss.backward()
        zero()
        counts = count_flops(lambda: _step(fn))
        stats[name] = {
            "saved": counter.bytes,
            "census": census,
            "flops": sum(counts.values()),
            "counts": counts,
            "times": [],
            "peak": None,
        }
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
    profiles = {}
    if profile > 0:
        for name, fn in (("dense", dense_loss), ("green", green_loss)):
            zero()
            profiles[name] = profile_step(fn, profile)
            tick(f"{name}: profiled")
    zero()
    result = {}
    for name, s in stats.items():
        t = s["times"]
        result[name] = ModelStats(
            statistics.median(t), (max(t) - min(t)) if len(t) > 1 else 0.0, s["saved"], s["flops"], s["peak"]
        )
    d, g = result["dense"], result["green"]
    rho = visible_fraction(visible)
    size = tuple(green.img_size)
    pairs = attention_pair_fraction(model, images, visible, lambda: dense_features(model, images), size)
    ideal = visible_only_ideal(stats["dense"]["counts"], rho, pairs)
    compiled = None
    if compile:
        eager = {"dense": result["dense"].time_median_s, "green": result["green"].time_median_s}
        compiled = compiled_stats(dense, green, images, visible, steps, warmup, eager, tick)
        zero()
    return BenchResult(
        model=green.config.model_name,
        batch_size=batch_size,
        img_size=list(green.img_size),
        mask_ratio=mask_ratio,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        steps=steps,
        dense=d,
        green=g,
        speedup=d.time_median_s / g.time_median_s,
        saved_bytes_reduction=1.0 - g.saved_bytes / d.saved_bytes if d.saved_bytes else 0.0,
        flops_ratio=d.flops / g.flops if g.flops else float("inf"),
        flops_ideal=int(ideal),
        flops_vs_ideal=g.flops / ideal if ideal else 0.0,
        visible_fraction=rho,
        pair_fraction=pairs,
        grouping=measure_grouping(green, visible),
        compiled=compiled,
        saved_by_node={name: s["census"] for name, s in stats.items()},
        profile=profiles,
        cpu_threads=torch.get_num_threads(),
    )
