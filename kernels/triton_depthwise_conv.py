"""Triton depthwise sparse convolution over a neighbour map (forward and backward).

Depthwise convs (``groups == C_in == C_out``, 3x3 to 7x7 in ViTs: positional encodings, ConvNeXt-
style blocks) have no GEMM to hand to a library: per output token and channel they are a K-term dot
product along the kernel taps. The kernels here read the neighbour map of
:func:`greenmim_convert.kernels.sparse_conv.build_neighbor_map` (``(K, T_out)``, -1 = reads zero).

Reference: :func:`greenmim_convert.kernels.sparse_conv.sparse_conv2d_reference` (depthwise branch):
``out[t, c] = bias[c] + sum_k weight[c, k] * x[nmap[k, t], c]``; the tests compare the two, outputs
and gradients.

Backward without atomics:
- ``d x``: for a fixed tap ``k`` the map ``t -> nmap[k, t]`` is injective (distinct output cells read
  distinct input cells), so it has an inverse ``inv[k, i]`` and
  ``dx[i, c] = sum_k weight[c, k] * dy[inv[k, i], c]`` is the forward kernel run on ``dy`` with ``inv``;
- ``d weight`` / ``d bias``: each program reduces one tile of output tokens into a partial sum
  ``(n_tiles, K, C)``, summed afterwards in PyTorch. Results are deterministic run to run.

Accumulation is in float32 (float64 for float64 inputs). On the CPU the kernels only run under
``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported in the process.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _depthwise_gather_kernel(
    src_ptr,
    map_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    n_out,
    n_ch,
    n_taps,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[t, c] = bias[c] + sum_k weight[c, k] * src[map[k, t], c] (map entry -1 reads zero)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_out
    col_ok = cols < n_ch
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for k in range(0, n_taps):
        src_row = tl.load(map_ptr + k * n_out + rows, mask=row_ok, other=-1)
        hit = src_row >= 0
        safe_row = tl.where(hit, src_row, 0)
        x = tl.load(
            src_ptr + safe_row[:, None] * n_ch + cols[None, :],
            mask=hit[:, None] & col_ok[None, :],
            other=0.0,
        )
        w = tl.load(weight_ptr + cols * n_taps + k, mask=col_ok, other=0.0)
        acc += x.to(ACC) * w.to(ACC)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += b.to(ACC)[None, :]
    tl.store(
        out_ptr + rows[:, None] * n_ch + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _depthwise_weight_grad_kernel(
    src_ptr,
    map_ptr,
    grad_ptr,
    wpart_ptr,
    bpart_ptr,
    n_out,
    n_ch,
    n_taps,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums over one tile of output tokens: wpart[tile, k, c] = sum_t src[map[k, t], c] * dy[t, c]."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_out
    col_ok = cols < n_ch
    dy = tl.load(
        grad_ptr + rows[:, None] * n_ch + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(ACC)
    for k in range(0, n_taps):
        src_row = tl.load(map_ptr + k * n_out + rows, mask=row_ok, other=-1)
        hit = src_row >= 0
        safe_row = tl.where(hit, src_row, 0)
        x = tl.load(
            src_ptr + safe_row[:, None] * n_ch + cols[None, :],
            mask=hit[:, None] & col_ok[None, :],
            other=0.0,
        ).to(ACC)
        tl.store(wpart_ptr + (pid_t * n_taps + k) * n_ch + cols, tl.sum(x * dy, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(bpart_ptr + pid_t * n_ch + cols, tl.sum(dy, axis=0), mask=col_ok)


def _acc_dtype(dtype: torch.dtype) -> Tuple[tl.dtype, torch.dtype]:
    """Triton and torch accumulation dtypes for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _blocks(n_ch: int) -> Tuple[int, int]:
    """Tile sizes: up to 128 channels per program, tokens so a tile stays near 4K elements."""
    block_c = min(128, triton.next_power_of_2(n_ch))
    block_t = max(16, 4096 // block_c)
    return block_t, block_c


def _gather(
    src: torch.Tensor, nmap: torch.Tensor, weight2d: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Launch :func:`_depthwise_gather_kernel`: ``(T_map, C)`` output of ``src`` read through ``nmap``."""
    n_taps, n_out = nmap.shape
    n_ch = src.shape[1]
    out = torch.empty((n_out, n_ch), dtype=src.dtype, device=src.device)
    if n_out == 0:
        return out
    block_t, block_c = _blocks(n_ch)
    acc, _ = _acc_dtype(src.dtype)
    grid = (triton.cdiv(n_out, block_t), triton.cdiv(n_ch, block_c))
    _depthwise_gather_kernel[grid](
        src,
        nmap,
        weight2d,
        bias if bias is not None else weight2d,
        out,
        n_out,
        n_ch,
        n_taps,
        HAS_BIAS=bias is not None,
        ACC=acc,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
    )
    return out


def _weight_grad(
    src: torch.Tensor, nmap: torch.Tensor, grad: torch.Tensor, with_bias: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch :func:`_depthwise_weight_grad_kernel` and reduce its partials: ``(C, K)`` and ``(C,)``."""
    n_taps, n_out = nmap.shape
    n_ch = src.shape[1]
    acc, acc_torch = _acc_dtype(src.dtype)
    block_t, block_c = _blocks(n_ch)
    tiles = triton.cdiv(n_out, block_t)
    wpart = torch.zeros((max(tiles, 1), n_taps, n_ch), dtype=acc_torch, device=src.device)
    bpart = torch.zeros((max(tiles, 1), n_ch), dtype=acc_torch, device=src.device)
    if n_out > 0:
        _depthwise_weight_grad_kernel[(tiles, triton.cdiv(n_ch, block_c))](
            src,
            nmap,
            grad,
            wpart,
            bpart,
            n_out,
            n_ch,
            n_taps,
            HAS_BIAS=with_bias,
            ACC=acc,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
        )
    grad_w = wpart.sum(0).t()
    grad_b = bpart.sum(0) if with_bias else None
    return grad_w, grad_b


def inverse_neighbor_map(nmap: torch.Tensor, n_in: int) -> torch.Tensor:
    """``(K, T_in)``: the output token that reads input token ``i`` through tap ``k``, or -1.

    Well defined because each tap maps output cells to input cells injectively. Built with one
    scatter (entries of -1 land in a spare column that is dropped), so it needs no host sync.
    """
    n_taps, n_out = nmap.shape
    inv = torch.full((n_taps, n_in + 1), -1, dtype=nmap.dtype, device=nmap.device)
    target = torch.where(nmap >= 0, nmap, torch.full_like(nmap, n_in))
    source = torch.arange(n_out, dtype=nmap.dtype, device=nmap.device).expand(n_taps, n_out)
    inv.scatter_(1, target, source)
    return inv[:, :n_in].contiguous()


class DepthwiseSparseConvFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels: inputs ``feats (T_in, C)``, ``weight (C, K)``, ``bias (C,)``."""

    @staticmethod
    def forward(
        ctx, feats: torch.Tensor, weight2d: torch.Tensor, bias: Optional[torch.Tensor], nmap: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        """Run the gather kernel; keep the inputs (not the K gathered copies) for the backward."""
        feats = feats.contiguous()
        weight2d = weight2d.contiguous()
        nmap = nmap.contiguous()
        bias = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(feats, weight2d, nmap)
        ctx.has_bias = bias is not None
        return _gather(feats, nmap, weight2d, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        """d feats through the inverse map (no atomics); d weight / d bias from per-tile partial sums."""
        feats, weight2d, nmap = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_feats = _gather(grad_out, inverse_neighbor_map(nmap, feats.shape[0]), weight2d, None)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = _weight_grad(feats, nmap, grad_out, ctx.has_bias)
            grad_w = grad_w.to(weight2d.dtype)
            grad_b = grad_b.to(weight2d.dtype) if grad_b is not None else None
        return grad_feats, grad_w, grad_b, None


def depthwise_conv_triton(
    feats: torch.Tensor, neighbor_map: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Depthwise sparse conv ``(T_in, C) -> (T_out, C)`` with a ``Conv2d`` weight ``(C, 1, kh, kw)``."""
    n_ch = feats.shape[1]
    if weight.shape[0] != n_ch or weight.shape[1] != 1:
        raise ValueError(f"depthwise weight must be ({n_ch}, 1, kh, kw), got {tuple(weight.shape)}")
    if weight.dtype != feats.dtype or (bias is not None and bias.dtype != feats.dtype):
        if not torch.is_autocast_enabled(feats.device.type):
            raise TypeError(f"feats, weight and bias must share a dtype, got {feats.dtype} and {weight.dtype}")
        weight = weight.to(feats.dtype)
        bias = bias.to(feats.dtype) if bias is not None else None
    taps = weight.shape[2] * weight.shape[3]
    if neighbor_map.shape[0] != taps:
        raise ValueError(f"neighbor_map has {neighbor_map.shape[0]} taps, weight has {taps}")
    return DepthwiseSparseConvFunction.apply(feats, weight.reshape(n_ch, taps), bias, neighbor_map.long())
