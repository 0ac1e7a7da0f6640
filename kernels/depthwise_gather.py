"""Depthwise sparse convolution on any device: chunked tap gathers, keeping only its input for backward.

``out[t, c] = bias[c] + sum_k weight[c, k] * x[nmap[k, t], c]`` over the neighbour map of
:func:`greenmim_convert.kernels.sparse_conv.build_neighbor_map`. The plain-autograd reference
(:func:`~greenmim_convert.kernels.sparse_conv.sparse_conv2d_reference`) gathers and keeps one ``(T, C)``
tensor per tap for its backward (49 copies of the input for a 7x7 kernel) and turns every gather's
gradient into a zero-filled scatter-add. Here:

- forward: rows are processed in chunks; one gather per chunk fills ``(rows, K, C)``, one multiply and
  one reduction over the taps give the chunk's outputs, so the temporary stays in cache;
- saved for backward: the input ``x`` and the inverse index table of the :class:`DepthwisePlan` (shared by
  every conv on the same sites and geometry), nothing of size ``K x T``;
- backward: for a fixed tap distinct output rows read distinct input rows, so the map has an inverse
  ``inv[k, i]``; one gather of ``dy`` through it per chunk of input rows gives both
  ``dx[i] = sum_k w_k dy[inv[k, i]]`` and ``dw_k = sum_i x[i] dy[inv[k, i]]`` (no scatter, no atomics).

On the CPU both directions run the native loops of :mod:`.cpu_kernels` (no temporaries at all, and one pass over
the gradient for both gradients) where the system's C compiler could build them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import cpu_kernels
from .grad_layout import like_param

# bytes of the (rows, K, C) temporary of one chunk: small enough to stay in cache, large enough that the
# per-chunk Python work is amortised
CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class DepthwisePlan:
    """Both directions of a neighbour map, row-major for chunked gathers.

    ``rows`` ``(T_out, K)``: input row read by tap ``k`` of output ``t``, ``T_in`` (reads zero) for none;
    ``inverse`` ``(T_in, K)``: output row that reads input ``i`` through tap ``k``, ``T_out`` (reads zero) for none.
    """

    rows: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def from_neighbor_map(cls, neighbor_map: torch.Tensor, num_in: int) -> "DepthwisePlan":
        """From a ``(K, T_out)`` neighbour map (-1 = reads zero) whose valid entries are distinct per tap."""
        taps, num_out = neighbor_map.shape
        rows = torch.where(neighbor_map >= 0, neighbor_map, num_in)
        inverse = torch.full((taps, num_in + 1), num_out, dtype=torch.long, device=neighbor_map.device)
        inverse.scatter_(1, rows, torch.arange(num_out, device=neighbor_map.device).expand(taps, num_out))
        inverse[:, num_in] = num_out
        return cls(rows.t().contiguous(), inverse[:, :num_in].t().contiguous())


def _chunk_rows(taps: int, channels: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, taps * channels * itemsize))


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1, x.shape[1])])


def _taps_torch(src: torch.Tensor, rows: torch.Tensor, taps_weight: torch.Tensor) -> torch.Tensor:
    """The portable loop of :func:`depthwise_taps`: one gather, multiply and tap reduction per chunk of rows."""
    src = _with_zero_row(src)
    num, taps = rows.shape
    out = src.new_empty(num, src.shape[1])
    step = _chunk_rows(taps, src.shape[1], src.element_size())
    for start in range(0, num, step):
        stop = min(num, start + step)
        cols = src.index_select(0, rows[start:stop].reshape(-1)).view(stop - start, taps, src.shape[1])
        torch.sum(cols.mul_(taps_weight), 1, out=out[start:stop])
    return out


@torch.library.custom_op("greenmim_kernels::depthwise_taps", mutates_args=())
def depthwise_taps(src: torch.Tensor, rows: torch.Tensor, taps_weight: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k taps_weight[k] * src[rows[t, k]]``; a row index ``len(src)`` reads zero (a masked cell).

    A library op of its own so that FLOP counters see ``2 * T * K * C`` (:mod:`greenmim_convert.tools.flops`);
    on the CPU it runs the native loop of :mod:`.cpu_kernels` where that is built."""
    return _taps_torch(src, rows, taps_weight)


@depthwise_taps.register_kernel("cpu")
def _(src: torch.Tensor, rows: torch.Tensor, taps_weight: torch.Tensor) -> torch.Tensor:
    out = cpu_kernels.taps(src, rows, taps_weight)
    return _taps_torch(src, rows, taps_weight) if out is None else out


@depthwise_taps.register_fake
def _(src: torch.Tensor, rows: torch.Tensor, taps_weight: torch.Tensor) -> torch.Tensor:
    return src.new_empty(rows.shape[0], src.shape[1])


def _taps_backward_torch(
    grad_src: torch.Tensor,
    inverse: torch.Tensor,
    taps_weight: torch.Tensor,
    feats: torch.Tensor,
    need_x: bool,
    need_w: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The portable loop of :func:`depthwise_taps_backward`: one gather of ``grad_src`` per chunk of input rows."""
    grad_src = _with_zero_row(grad_src)
    num_in, taps = inverse.shape
    chans = feats.shape[1]
    dx = feats.new_empty(num_in if need_x else 0, chans)
    dw = feats.new_zeros(taps if need_w else 0, chans)
    step = _chunk_rows(taps, chans, feats.element_size())
    for start in range(0, num_in if (need_x or need_w) else 0, step):
        stop = min(num_in, start + step)
        cols = grad_src.index_select(0, inverse[start:stop].reshape(-1)).view(stop - start, taps, chans)
        if need_x:
            torch.sum(cols * taps_weight, 1, out=dx[start:stop])
        if need_w:
            dw += cols.mul_(feats[start:stop, None, :]).sum(0)
    return dx, dw


@torch.library.custom_op("greenmim_kernels::depthwise_taps_backward", mutates_args=())
def depthwise_taps_backward(
    grad_src: torch.Tensor,
    inverse: torch.Tensor,
    taps_weight: torch.Tensor,
    feats: torch.Tensor,
    need_x: bool,
    need_w: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input and tap-weight gradients ``(T_in, C)`` and ``(K, C)`` from ``grad_src`` (the output gradient) read
    through ``inverse`` (an index ``len(grad_src)`` reads zero); a gradient not asked for comes back empty."""
    return _taps_backward_torch(grad_src, inverse, taps_weight, feats, need_x, need_w)


@depthwise_taps_backward.register_kernel("cpu")
def _(
    grad_src: torch.Tensor,
    inverse: torch.Tensor,
    taps_weight: torch.Tensor,
    feats: torch.Tensor,
    need_x: bool,
    need_w: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    chans = feats.shape[1]
    if need_w:
        both = cpu_kernels.taps_backward(feats, grad_src, inverse, taps_weight, need_x)
    else:
        dx = cpu_kernels.taps(grad_src, inverse, taps_weight) if need_x else feats.new_empty(0, chans)
        both = None if dx is None else (dx, feats.new_zeros(0, chans))
    if both is None:
        return _taps_backward_torch(grad_src, inverse, taps_weight, feats, need_x, need_w)
    dx, dw = both
    return (dx if dx is not None else feats.new_empty(0, chans)), dw


@depthwise_taps_backward.register_fake
def _(
    grad_src: torch.Tensor,
    inverse: torch.Tensor,
    taps_weight: torch.Tensor,
    feats: torch.Tensor,
    need_x: bool,
    need_w: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return (
        feats.new_empty(inverse.shape[0] if need_x else 0, feats.shape[1]),
        feats.new_empty(inverse.shape[1] if need_w else 0, feats.shape[1]),
    )


def depthwise_taps_flop(
    src: Tuple[int, ...],
    rows: Tuple[int, ...],
    taps_weight: Tuple[int, ...],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """A multiply-add per tap, output row and channel."""
    return 2 * rows[0] * rows[1] * src[1]


def depthwise_taps_backward_flop(
    grad_src: Tuple[int, ...],
    inverse: Tuple[int, ...],
    taps_weight: Tuple[int, ...],
    feats: Tuple[int, ...],
    need_x: bool,
    need_w: bool,
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """A multiply-add per tap, input row and channel for each gradient asked for."""
    return 2 * inverse[0] * inverse[1] * feats[1] * (int(need_x) + int(need_w))


class _DepthwiseGather(torch.autograd.Function):
    """Autograd of :func:`depthwise_conv_gather`: saves ``x`` and the plan's inverse table only."""

    @staticmethod
    def forward(
        ctx,
        feats: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        rows: torch.Tensor,
        inverse: torch.Tensor,
    ) -> torch.Tensor:
        out = depthwise_taps(feats, rows, weight.reshape(weight.shape[0], -1).t())
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(feats, weight, inverse)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        feats, weight, inverse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        taps_weight = weight.reshape(weight.shape[0], -1).t()
        dx, dw = depthwise_taps_backward(grad.contiguous(), inverse, taps_weight, feats, need_x, need_w)
        dbias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (
            (dx if need_x else None),
            (like_param(dw.t().reshape(weight.shape), weight) if need_w else None),
            dbias,
            None,
            None,
        )


def depthwise_conv_gather(
    feats: torch.Tensor, plan: DepthwisePlan, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Depthwise conv (``weight`` ``(C, 1, kh, kw)``) of packed ``feats`` ``(T_in, C)`` at the plan's output rows."""
    if weight.shape[0] != feats.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"not a depthwise weight for {feats.shape[1]} channels: {tuple(weight.shape)}")
    if plan.inverse.shape[0] != feats.shape[0] or plan.rows.shape[1] != weight.shape[2] * weight.shape[3]:
        raise ValueError(
            f"plan for {plan.inverse.shape[0]} inputs and {plan.rows.shape[1]} taps, got "
            f"{feats.shape[0]} inputs and a {tuple(weight.shape[2:])} kernel"
        )
    return _DepthwiseGather.apply(feats.contiguous(), weight, bias, plan.rows, plan.inverse)
