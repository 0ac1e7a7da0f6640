"""Sparse 2-D convolution over packed visible tokens, under masked-dense semantics.

A convolution of the original model reads zeros at masked input positions and is evaluated only at
visible output sites. On packed tokens that is a gather-GEMM: for every kernel offset a *neighbour
map* gives, per output site, the index of the input token it reads (or -1 for a masked or
out-of-grid position, which contributes zero). Output sites are given by coordinates, so the same
code covers submanifold convolutions (stride 1, ``out_sites`` = ``in_sites``), strided
convolutions (``out_sites`` = the visible cells of the output grid) and patch embeddings that read
raw pixels (``in_sites`` on the pixel grid).

Backends:
- ``"torch"``: the reference, a gather-GEMM over all kernel offsets (every device, plain autograd);
- ``"gather"``: depthwise convs as chunked tap gathers that keep only their input for backward and
  take the gradients by gathers through the inverse map (every device, :mod:`.depthwise_gather`);
- ``"tiles"``: gathers a dense patch per output tile and runs ``F.conv2d`` on the patches (every
  device, plain autograd); fastest on the CPU when visible sites come in blocks (MIM mask units);
- ``"triton"``: depthwise convs on CUDA (:mod:`.triton_depthwise_conv`);
- ``"spconv"``: ``groups == 1`` convs on CUDA when spconv is installed (:mod:`.spconv_backend`).
``"auto"`` takes Triton / spconv where they apply, the depthwise gather for depthwise convs on the CPU
when its native loops are built (:mod:`.cpu_kernels`), else tiles when the tiles are mostly visible,
else the depthwise gather for depthwise convs, else the reference. Naming a backend that cannot run the call raises
:class:`BackendUnavailableError` rather than falling back silently.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from greenmim_convert.runtime.plan.sites import Sites

from .grad_layout import like_param

IntPair = Union[int, Tuple[int, int]]
Padding = Union[int, Tuple[int, int], Tuple[int, int, int, int], str]  # 4 values: (top, bottom, left, right)
Backend = Literal["auto", "torch", "gather", "tiles", "triton", "spconv"]
BACKENDS: Tuple[str, ...] = ("auto", "torch", "gather", "tiles", "triton", "spconv")
# Candidate tile edges of the "tiles" backend, and the fraction of computed output cells that must
# be output sites for "auto" to prefer it over the gather path.
TILE_SIZES: Tuple[int, ...] = (2, 4, 8, 16, 32)
MIN_TILE_OCCUPANCY = 0.5


class BackendUnavailableError(RuntimeError):
    """A sparse-convolution backend was requested explicitly but cannot run this call."""


def as_pair(value: IntPair, name: str) -> Tuple[int, int]:
    """``(h, w)`` from an int or a 1/2-sequence, as ``torch.nn.Conv2d`` accepts its geometry arguments."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) == 1:
        return (pair[0], pair[0])
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return pair  # type: ignore[return-value]


def resolve_padding(
    padding: Padding, kernel_size: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]
) -> Tuple[int, int]:
    """Top/left padding of a convolution; ``"same"`` and ``"valid"`` follow ``torch.nn.Conv2d``.

    Only the leading padding matters for the neighbour map: the trailing one only decides the
    output grid size, which the output ``Sites`` already carry (and is checked against). Four values
    ``(top, bottom, left, right)`` are a zero pad before the conv (TensorFlow "SAME" ``Conv2dSame``).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' requires stride 1, as in torch.nn.Conv2d")
            return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))  # type: ignore[return-value]
        raise ValueError(f"unknown padding mode {padding!r}")
    sides = padding_sides(padding)
    if min(sides) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (sides[0], sides[2])


def padding_sides(padding: Union[int, Tuple[int, ...]]) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of a numeric padding: an int, a pair (symmetric) or four sides."""
    if not isinstance(padding, int) and len(padding) == 4:
        return tuple(int(p) for p in padding)  # type: ignore[return-value]
    ph, pw = as_pair(padding, "padding")
    return (ph, ph, pw, pw)


def is_asymmetric(padding: Padding) -> bool:
    """Four numeric sides that differ top/bottom or left/right (a TensorFlow SAME pad)."""
    if isinstance(padding, (int, str)):
        return False
    t, b, l, r = padding_sides(padding)
    return t != b or l != r


def conv_output_grid(
    grid: Tuple[int, int], kernel_size: IntPair, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1
) -> Tuple[int, int]:
    """Output grid size of a 2-D convolution on ``grid``, with ``torch.nn.Conv2d``'s arithmetic."""
    k, s, d = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride"), as_pair(dilation, "dilation")
    if isinstance(padding, str):
        resolve_padding(padding, k, s, d)
        if padding == "same":
            return (int(grid[0]), int(grid[1]))
        padding = 0
    t, b, l, r = padding_sides(padding)
    return tuple((n + pi - di * (ki - 1) - 1) // si + 1 for n, ki, si, pi, di in zip(grid, k, s, (t + b, l + r), d))  # type: ignore[return-value]


def check_conv_geometry(
    in_sites: Sites, out_sites: Sites, kernel_size: IntPair, stride: IntPair, padding: Padding, dilation: IntPair
) -> None:
    """Raise ``ValueError`` unless ``out_sites`` lie on the output grid of this convolution of ``in_sites``."""
    k, s, d = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride"), as_pair(dilation, "dilation")
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise ValueError(f"kernel_size, stride and dilation must be positive, got {k}, {s}, {d}")
    if in_sites.batch_size != out_sites.batch_size:
        raise ValueError(f"batch sizes differ: input {in_sites.batch_size}, output {out_sites.batch_size}")
    if in_sites.device != out_sites.device:
        raise ValueError(f"input sites on {in_sites.device}, output sites on {out_sites.device}")
    expected = conv_output_grid(in_sites.grid, k, s, padding, d)
    if tuple(out_sites.grid) != expected:
        raise ValueError(
            f"output grid {out_sites.grid} does not match the convolution of grid {in_sites.grid} "
            f"(kernel {k}, stride {s}, padding {padding!r}, dilation {d}): expected {expected}"
        )


def build_neighbor_map(
    in_sites: Sites,
    out_sites: Sites,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """``(K, T_out)`` long tensor: input token read by kernel offset ``k`` at output site ``t``, or -1.

    ``k = ky * kw + kx`` (the order of a flattened ``Conv2d`` weight). Output site ``(oy, ox)`` reads
    input cell ``(oy * s - p + ky * d, ox * s - p + kx * d)`` of the same sample; the entry is -1 when
    that cell is outside the input grid or masked. Built with one gather from the per-sample index
    grid, so the cost is O(K * T_out) tensor work whatever the number of tokens.
    """
    k, s, d = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride"), as_pair(dilation, "dilation")
    check_conv_geometry(in_sites, out_sites, k, s, padding, d)
    pad = resolve_padding(padding, k, s, d)
    h, w = in_sites.grid
    device = out_sites.device
    ky = torch.arange(k[0], device=device) * d[0] - pad[0]
    kx = torch.arange(k[1], device=device) * d[1] - pad[1]
    iy = out_sites.coords[:, 0].view(1, 1, -1) * s[0] + ky.view(-1, 1, 1)
    ix = out_sites.coords[:, 1].view(1, 1, -1) * s[1] + kx.view(1, -1, 1)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    lin = (out_sites.batch.view(1, 1, -1) * h + iy.clamp(0, h - 1)) * w + ix.clamp(0, w - 1)
    found = in_sites.index_grid().reshape(-1)[lin]
    return torch.where(inside, found, torch.full_like(found, -1)).reshape(k[0] * k[1], out_sites.num_tokens)


def _geometry_key(
    kind: str,
    out_sites: Sites,
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Padding,
    dilation: Tuple[int, int],
) -> tuple:
    """Memo key (on the input sites) of a table built for ``out_sites`` and one conv geometry. The memo keeps
    ``out_sites`` alive beside the table, so its ``id`` is not reused while the key exists."""
    pad = padding if isinstance(padding, str) else padding_sides(padding)
    return (kind, id(out_sites), kernel, stride, pad, dilation)


def cached_neighbor_map(
    in_sites: Sites,
    out_sites: Sites,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """:func:`build_neighbor_map`, built once per pair of sites and geometry (kept on ``in_sites``), so that the
    convolutions of a stage share one map (and one stored copy of it)."""
    k, s, d = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride"), as_pair(dilation, "dilation")
    key = _geometry_key("neighbor map", out_sites, k, s, padding, d)
    return in_sites.memo(key, lambda: (out_sites, build_neighbor_map(in_sites, out_sites, k, s, padding, d)))[1]


def _padded_indices(feats: torch.Tensor, neighbor_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``feats`` with a trailing zero row, and the map with -1 redirected to that row."""
    zero_row = feats.new_zeros(1, feats.shape[1])
    padded = torch.cat([feats, zero_row], dim=0)
    index = torch.where(neighbor_map >= 0, neighbor_map, torch.full_like(neighbor_map, feats.shape[0]))
    return padded, index


def sparse_conv2d_reference(
    feats: torch.Tensor, neighbor_map: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int
) -> torch.Tensor:
    """PyTorch reference: ``out[t] = bias + sum_k W_k x[nmap[k, t]]`` with zero rows for -1.

    ``groups == 1``: one gather of every tap (im2col on the packed tokens, ``(T_out, K * C_in)``) and
    one GEMM; grouped convs: the same gather and one batched GEMM over groups; depthwise convs: a
    gather and a broadcast multiply-add per tap (a GEMM would degenerate into ``C`` matrix-vector
    products). Plain autograd ops, so every gradient is exact.
    """
    c_out, c_in_group, kh, kw = weight.shape
    taps = kh * kw
    t_out = neighbor_map.shape[1]
    c_in = feats.shape[1]
    padded, index = _padded_indices(feats, neighbor_map)
    if c_in_group == 1 and groups == c_in and groups > 1:
        mult = c_out // c_in
        w = weight.reshape(c_in, mult, taps)
        out = (
            bias.view(c_in, mult).expand(t_out, c_in, mult) if bias is not None else feats.new_zeros(t_out, c_in, mult)
        )
        for k in range(taps):
            out = torch.addcmul(out, padded.index_select(0, index[k]).unsqueeze(2), w[:, :, k])
        return out.reshape(t_out, c_out)
    cols = padded.index_select(0, index.t().reshape(-1))
    if groups == 1:
        w = weight.reshape(c_out, c_in, taps).transpose(1, 2).reshape(c_out, taps * c_in)
        cols = cols.view(t_out, taps * c_in)
        return torch.addmm(bias, cols, w.t()) if bias is not None else cols @ w.t()
    c_out_group = c_out // groups
    cols = cols.view(t_out, taps, groups, c_in_group).permute(2, 0, 1, 3).reshape(groups, t_out, taps * c_in_group)
    w = (
        weight.view(groups, c_out_group, c_in_group, taps)
        .permute(0, 3, 2, 1)
        .reshape(groups, taps * c_in_group, c_out_group)
    )
    if bias is not None:
        out = torch.baddbmm(bias.view(groups, 1, c_out_group), cols, w)
    else:
        out = torch.bmm(cols, w)
    return out.transpose(0, 1).reshape(t_out, c_out)


@dataclass(frozen=True)
class TilePlan:
    """Square-ish tiles of the output grid that cover every output site, with the input patch of each.

    ``patch_index`` ``(num_tiles * ph * pw,)`` holds, per patch cell, its input token or ``T_in`` (the
    zero row appended to the features: masked or outside the grid); ``out_rows`` ``(T_out,)`` is the
    row of each output site in the flattened ``(num_tiles * th * tw)`` tile outputs.
    """

    tile: Tuple[int, int]
    patch: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    num_tiles: int
    patch_index: torch.Tensor
    out_rows: torch.Tensor

    @property
    def occupancy(self) -> float:
        """Fraction of computed output cells that are output sites (1.0 = no wasted work)."""
        cells = self.num_tiles * self.tile[0] * self.tile[1]
        return self.out_rows.shape[0] / cells if cells else 1.0


def _patch_size(tile: Tuple[int, int], k: Tuple[int, int], s: Tuple[int, int], d: Tuple[int, int]) -> Tuple[int, int]:
    """Input cells read by a tile of ``tile`` output cells."""
    return tuple((t - 1) * si + di * (ki - 1) + 1 for t, ki, si, di in zip(tile, k, s, d))  # type: ignore[return-value]


def _tile_keys(sites: Sites, tile: Tuple[int, int]) -> Tuple[torch.Tensor, int, int]:
    """Flat tile id of every site, and the number of tile rows and columns of a sample."""
    rows = -(-sites.grid[0] // tile[0])
    cols = -(-sites.grid[1] // tile[1])
    key = (sites.batch * rows + sites.coords[:, 0] // tile[0]) * cols + sites.coords[:, 1] // tile[1]
    return key, rows, cols


def choose_tile(out_sites: Sites, kernel_size: IntPair, stride: IntPair = 1, dilation: IntPair = 1) -> Tuple[int, int]:
    """Tile size minimising the cells a tiled conv touches: ``tiles * (patch area + tile area)``.

    Small tiles waste little on partly visible tiles but re-read a halo per tile; large tiles
    amortise the halo but compute masked cells. Mask units aligned with the tile grid make the
    matching tile size win.
    """
    k, s, d = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride"), as_pair(dilation, "dilation")
    best, best_cost = (TILE_SIZES[0], TILE_SIZES[0]), None
    for size in TILE_SIZES:
        tile = (size, size)
        key, rows, cols = _tile_keys(out_sites, tile)
        bins = out_sites.batch_size * rows * cols
        used = int(torch.count_nonzero(torch.bincount(key, minlength=bins))) if out_sites.num_tokens else 0
        ph, pw = _patch_size(tile, k, s, d)
        cost = used * (ph * pw + size * size)
        if best_cost is None or cost < best_cost:
            best, best_cost = tile, cost
    return best


def build_tile_plan(
    in_sites: Sites,
    out_sites: Sites,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    tile: Optional[IntPair] = None,
) -> TilePlan:
    """Plan of :func:`sparse_conv2d_tiles`: the tiles holding output sites and the input patch of each.

    A tile whose output origin is ``(ty * th, tx * tw)`` reads the input window starting at
    ``(ty * th * s - p, tx * tw * s - p)`` of size :func:`_patch_size`; a dense conv of that patch with
    no padding yields exactly the tile's ``th x tw`` outputs. ``tile=None`` picks one by
    :func:`choose_tile`. Vectorised; cost O(T_out + tiles * patch area).
    """
    k, s, d = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride"), as_pair(dilation, "dilation")
    check_conv_geometry(in_sites, out_sites, k, s, padding, d)
    pad = resolve_padding(padding, k, s, d)
    t = choose_tile(out_sites, k, s, d) if tile is None else as_pair(tile, "tile")
    ph, pw = _patch_size(t, k, s, d)
    device = out_sites.device
    key, rows, cols = _tile_keys(out_sites, t)
    bins = out_sites.batch_size * rows * cols
    active = torch.bincount(key, minlength=bins).nonzero().squeeze(1)
    slot = torch.full((bins,), -1, dtype=torch.long, device=device)
    slot[active] = torch.arange(active.shape[0], device=device)
    out_rows = (slot[key] * t[0] + out_sites.coords[:, 0] % t[0]) * t[1] + out_sites.coords[:, 1] % t[1]
    tb = active // (rows * cols)
    ty = (active // cols) % rows
    tx = active % cols
    h, w = in_sites.grid
    iy = (ty * t[0] * s[0] - pad[0]).view(-1, 1, 1) + torch.arange(ph, device=device).view(1, -1, 1)
    ix = (tx * t[1] * s[1] - pad[1]).view(-1, 1, 1) + torch.arange(pw, device=device).view(1, 1, -1)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    lin = (tb.view(-1, 1, 1) * h + iy.clamp(0, h - 1)) * w + ix.clamp(0, w - 1)
    found = in_sites.index_grid().reshape(-1)[lin]
    zero_row = torch.full_like(found, in_sites.num_tokens)
    patch_index = torch.where(inside & (found >= 0), found, zero_row).reshape(-1)
    return TilePlan(t, (ph, pw), k, s, pad, d, int(active.shape[0]), patch_index, out_rows)


def sparse_conv2d_tiles(
    feats: torch.Tensor, plan: TilePlan, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int
) -> torch.Tensor:
    """Sparse conv as dense convs on gathered tiles: one gather, one ``F.conv2d``, one row selection.

    Exact under masked-dense semantics (patch cells that are masked or outside the grid are zero).
    It computes every cell of a used tile, so it pays off when the tiles are mostly visible (mask
    units aligned with tiles), where it beats the per-offset gather by reading each input once and
    running the library's dense (channels-last) convolution. Only ``feats`` is kept for backward: the
    patches (a halo's worth larger) are gathered again there.
    """
    return _TiledConv.apply(feats, weight, bias, plan, groups)


def _gather_patches(feats: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """``(num_tiles, C, ph, pw)`` channels-last patches of ``feats``, zero at masked or outside cells."""
    (ph, pw), c_in = plan.patch, feats.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, c_in)], dim=0)
    return padded.index_select(0, plan.patch_index).view(plan.num_tiles, ph, pw, c_in).permute(0, 3, 1, 2)


class _TiledConv(torch.autograd.Function):
    """Autograd of :func:`sparse_conv2d_tiles`: saves the packed input, re-gathers the patches in backward."""

    @staticmethod
    def forward(
        ctx, feats: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], plan: TilePlan, groups: int
    ) -> torch.Tensor:
        patches = _gather_patches(feats, plan)
        out = F.conv2d(patches, weight, bias, stride=plan.stride, dilation=plan.dilation, groups=groups)
        th, tw = plan.tile
        ctx.save_for_backward(feats, weight, plan.patch_index, plan.out_rows)
        ctx.geometry = (plan, groups, bias is not None)
        return out.permute(0, 2, 3, 1).reshape(plan.num_tiles * th * tw, weight.shape[0]).index_select(0, plan.out_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        feats, weight, patch_index, out_rows = ctx.saved_tensors
        plan, groups, has_bias = ctx.geometry
        (th, tw), c_out = plan.tile, weight.shape[0]
        cells = plan.num_tiles * th * tw
        cell_rows = torch.full((cells,), grad.shape[0], dtype=torch.long, device=grad.device)
        cell_rows[out_rows] = torch.arange(grad.shape[0], device=grad.device)
        grad_rows = torch.cat([grad, grad.new_zeros(1, c_out)]).index_select(0, cell_rows)
        grad_tiles = grad_rows.view(plan.num_tiles, th, tw, c_out).permute(0, 3, 1, 2)
        patches = _gather_patches(feats, plan)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        dpatch, dweight, dbias = torch.ops.aten.convolution_backward(
            grad_tiles,
            patches,
            weight,
            [c_out] if has_bias else None,
            list(plan.stride),
            [0, 0],
            list(plan.dilation),
            False,
            [0, 0],
            groups,
            mask,
        )
        dfeats = None
        if mask[0]:
            c_in = feats.shape[1]
            rows = dpatch.permute(0, 2, 3, 1).reshape(-1, c_in)
            index = patch_index.view(-1, 1).expand(-1, c_in)
            dfeats = feats.new_zeros(feats.shape[0] + 1, c_in).scatter_add_(0, index, rows)[:-1]
        return dfeats, like_param(dweight, weight) if mask[1] else None, dbias if mask[2] else None, None, None


def _interpret_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET``, read as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def triton_available() -> bool:
    """Whether Triton is installed (it runs on CUDA devices, or on the CPU under its interpreter).

    Looked up without importing it: the interpreter mode is fixed when Triton is first imported,
    so importing it as a side effect of a query could lock a process out of ``TRITON_INTERPRET``.
    """
    return importlib.util.find_spec("triton") is not None


def _is_depthwise(feats: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """groups == C_in == C_out: the case the Triton kernel implements."""
    return groups == feats.shape[1] == weight.shape[0] and weight.shape[1] == 1


def _gather_problem(feats: torch.Tensor, weight: torch.Tensor, groups: int) -> Optional[str]:
    """Why the depthwise gather cannot run this call, or None when it can."""
    if not _is_depthwise(feats, weight, groups):
        return (
            "the gather backend implements depthwise convolutions only (groups == C_in == C_out); "
            f"got C_in={feats.shape[1]}, C_out={weight.shape[0]}, groups={groups}"
        )
    return None


def _triton_problem(feats: torch.Tensor, weight: torch.Tensor, groups: int) -> Optional[str]:
    """Why the Triton backend cannot run this call, or None when it can."""
    if not _is_depthwise(feats, weight, groups):
        return (
            "the triton backend implements depthwise convolutions only (groups == C_in == C_out); "
            f"got C_in={feats.shape[1]}, C_out={weight.shape[0]}, groups={groups}"
        )
    if not triton_available():
        return "the triton backend needs the 'triton' package, which is not installed"
    if not feats.is_cuda and not _interpret_enabled():
        return f"the triton backend runs on CUDA tensors (or under TRITON_INTERPRET=1); got a {feats.device} tensor"
    return None


def _spconv_problem(
    feats: torch.Tensor, groups: int, stride: Tuple[int, int], dilation: Tuple[int, int], padding: Padding = 0
) -> Optional[str]:
    """Why the spconv backend cannot run this call, or None when it can."""
    from greenmim_convert.kernels.spconv_backend import spconv_available

    if is_asymmetric(padding):
        return f"spconv cannot express the asymmetric padding {tuple(padding)}"
    if groups != 1:
        return f"the spconv backend implements groups == 1 only, got groups={groups}"
    if not spconv_available():
        return "the spconv backend needs 'spconv' (spconv-cu120 or a matching build), which is not importable"
    if not feats.is_cuda:
        return f"the spconv backend runs on CUDA tensors only; got a {feats.device} tensor"
    if max(stride) > 1 and max(dilation) > 1:
        return "spconv does not support stride > 1 together with dilation > 1"
    return None


def _native_cpu_ready(dtype: torch.dtype) -> bool:
    """Whether the depthwise gather runs its native CPU loops for ``dtype`` (built on first ask)."""
    from greenmim_convert.kernels.cpu_kernels import cpu_kernel_problem

    return cpu_kernel_problem(dtype) is None


def _auto_kernel(
    feats: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
    padding: Padding = 0,
) -> Optional[str]:
    """The device kernel ``"auto"`` uses for this call, or None when it runs a PyTorch path."""
    if not feats.is_cuda:
        if feats.device.type == "cpu" and _is_depthwise(feats, weight, groups) and _native_cpu_ready(feats.dtype):
            return "gather"
        return None
    if _is_depthwise(feats, weight, groups) and _triton_problem(feats, weight, groups) is None:
        return "triton"
    if (
        groups == 1
        and weight.shape[2] * weight.shape[3] > 1
        and _spconv_problem(feats, groups, stride, dilation, padding) is None
    ):
        return "spconv"
    return None


def select_backend(
    feats: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    stride: IntPair = 1,
    dilation: IntPair = 1,
    backend: Backend = "auto",
    tile_plan: Optional[TilePlan] = None,
    padding: Padding = 0,
) -> str:
    """Resolve ``backend`` for one call: the name of the implementation that will run it.

    ``"auto"``: Triton for depthwise convs on CUDA; spconv for ``groups == 1`` convs with more than
    one tap on CUDA when installed (a 1x1 conv is one GEMM either way); the depthwise gather
    ``"gather"`` for depthwise convs on the CPU when its native loops are built; otherwise ``"tiles"`` when
    ``tile_plan`` is given and at least :data:`MIN_TILE_OCCUPANCY` full, else ``"gather"`` for depthwise
    convs, else the reference ``"torch"``. On the CPU Triton is never chosen: its interpreter is a testing tool.
    An explicit name that cannot run the call raises :class:`BackendUnavailableError`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse-conv backend {backend!r}; expected one of {BACKENDS}")
    s, d = as_pair(stride, "stride"), as_pair(dilation, "dilation")
    if backend in ("torch", "tiles"):
        return backend
    if backend == "gather":
        problem = _gather_problem(feats, weight, groups)
        if problem is not None:
            raise BackendUnavailableError(problem)
        return "gather"
    if backend == "triton":
        problem = _triton_problem(feats, weight, groups)
        if problem is not None:
            raise BackendUnavailableError(problem)
        return "triton"
    if backend == "spconv":
        problem = _spconv_problem(feats, groups, s, d, padding)
        if problem is not None:
            raise BackendUnavailableError(problem)
        return "spconv"
    kernel = _auto_kernel(feats, weight, groups, s, d, padding)
    if kernel is not None:
        return kernel
    if tile_plan is not None and tile_plan.occupancy >= MIN_TILE_OCCUPANCY:
        return "tiles"
    return "gather" if _gather_problem(feats, weight, groups) is None else "torch"


def sparse_conv2d(
    feats: torch.Tensor,
    in_sites: Sites,
    out_sites: Sites,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    neighbor_map: Optional[torch.Tensor] = None,
    backend: Backend = "auto",
    tile_plan: Optional[TilePlan] = None,
) -> torch.Tensor:
    """``F.conv2d`` under masked-dense semantics on packed tokens: ``(T_in, C_in) -> (T_out, C_out)``.

    ``weight`` is the ``torch.nn.Conv2d`` weight ``(C_out, C_in / groups, kh, kw)``. Masked input
    cells read zero; row ``t`` of the result is the dense convolution at output site ``t`` of
    ``out_sites``. ``neighbor_map`` / ``tile_plan`` may be passed when several convs share the same
    sites and geometry (they are built here otherwise, only when the chosen backend needs them).
    """
    if feats.dim() != 2 or weight.dim() != 4:
        raise ValueError(f"expected feats (T, C) and a 4-D weight, got {tuple(feats.shape)} and {tuple(weight.shape)}")
    if feats.shape[0] != in_sites.num_tokens:
        raise ValueError(f"feats has {feats.shape[0]} rows but in_sites has {in_sites.num_tokens} tokens")
    c_out, c_in_group, kh, kw = weight.shape
    if groups < 1 or feats.shape[1] != c_in_group * groups or c_out % groups != 0:
        raise ValueError(
            f"channels do not match: feats has {feats.shape[1]} channels, weight {tuple(weight.shape)}, groups={groups}"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    s, d = as_pair(stride, "stride"), as_pair(dilation, "dilation")
    wants_plan = backend == "tiles" or (
        backend == "auto" and _auto_kernel(feats, weight, groups, s, d, padding) is None
    )
    if wants_plan and tile_plan is None:
        key = _geometry_key("tile plan", out_sites, (kh, kw), s, padding, d)
        tile_plan = in_sites.memo(
            key, lambda: (out_sites, build_tile_plan(in_sites, out_sites, (kh, kw), s, padding, d))
        )[1]
    chosen = select_backend(feats, weight, groups, s, d, backend, tile_plan, padding)
    if chosen == "spconv":
        from greenmim_convert.kernels.spconv_backend import spconv_conv2d

        check_conv_geometry(in_sites, out_sites, (kh, kw), s, padding, d)
        return spconv_conv2d(feats, in_sites, out_sites, weight, bias, s, padding, d)
    if chosen == "tiles":
        assert tile_plan is not None
        pad = resolve_padding(padding, (kh, kw), s, d)
        if (tile_plan.kernel, tile_plan.stride, tile_plan.padding, tile_plan.dilation) != ((kh, kw), s, pad, d):
            raise ValueError(
                f"tile_plan was built for kernel {tile_plan.kernel}, stride {tile_plan.stride}, padding "
                f"{tile_plan.padding}, dilation {tile_plan.dilation}; this conv has {(kh, kw)}, {s}, {pad}, {d}"
            )
        if tile_plan.out_rows.shape[0] != out_sites.num_tokens:
            raise ValueError(
                f"tile_plan covers {tile_plan.out_rows.shape[0]} output sites, expected {out_sites.num_tokens}"
            )
        return sparse_conv2d_tiles(feats, tile_plan, weight, bias, groups)
    if neighbor_map is None:
        neighbor_map = cached_neighbor_map(in_sites, out_sites, (kh, kw), s, padding, d)
    elif neighbor_map.shape != (kh * kw, out_sites.num_tokens):
        raise ValueError(
            f"neighbor_map has shape {tuple(neighbor_map.shape)}, expected {(kh * kw, out_sites.num_tokens)}"
        )
    if chosen == "triton":
        from greenmim_convert.kernels.triton_depthwise_conv import depthwise_conv_triton

        return depthwise_conv_triton(feats, neighbor_map, weight, bias)
    if chosen == "gather":
        from greenmim_convert.kernels.depthwise_gather import DepthwisePlan, depthwise_conv_gather

        key = _geometry_key("depthwise plan", out_sites, (kh, kw), s, padding, d) + (id(neighbor_map),)
        plan = in_sites.memo(
            key, lambda: (out_sites, neighbor_map, DepthwisePlan.from_neighbor_map(neighbor_map, in_sites.num_tokens))
        )[2]
        return depthwise_conv_gather(feats, plan, weight, bias)
    return sparse_conv2d_reference(feats, neighbor_map, weight, bias, groups)
