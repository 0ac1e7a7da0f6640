"""Pooling and reductions over the visible positions of a cell, a window or a whole sample."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from greenmim_convert.kernels.sparse_conv import cached_neighbor_map
from greenmim_convert.runtime.ops.conv import _rows_or_fill, _rows_or_zero, neighbours
from greenmim_convert.runtime.plan.sites import Sites


def mean_pool(feats: torch.Tensor, fine: Sites, coarse: Sites, factor: int) -> torch.Tensor:
    """Kernel == stride average pooling that averages the visible positions of each cell."""
    if factor == 1:
        return feats
    nbr = neighbours(fine, coarse, (factor, factor), [(dh, dw) for dh in range(factor) for dw in range(factor)])
    valid = nbr >= 0
    summed = _rows_or_zero(feats, nbr).sum(1)
    return summed / valid.sum(1, keepdim=True).clamp_min(1).to(feats.dtype)


def cell_reduce(kind: str, feats: torch.Tensor, fine: Sites, coarse: Sites, factor: int) -> torch.Tensor:
    """``amax``, ``mean`` or ``sum`` over the visible positions of every ``factor`` x ``factor`` cell."""
    if kind == "mean":
        return mean_pool(feats, fine, coarse, factor)
    nbr = neighbours(fine, coarse, (factor, factor), [(dh, dw) for dh in range(factor) for dw in range(factor)])
    rows = _rows_or_fill(feats, nbr, float("-inf") if kind == "amax" else 0.0)
    return rows.amax(1) if kind == "amax" else rows.sum(1)


def max_pool(feats: torch.Tensor, in_sites: Sites, out_sites: Sites, kernel, stride, padding, dilation) -> torch.Tensor:
    """Max pooling at the visible output sites over the visible positions of each window."""
    nmap = cached_neighbor_map(in_sites, out_sites, kernel, stride, padding, dilation)
    return _rows_or_fill(feats, nmap, float("-inf")).amax(0)


def avg_pool(
    feats: torch.Tensor,
    in_sites: Sites,
    out_sites: Sites,
    kernel,
    stride,
    padding,
    count_include_pad: bool,
    divisor_override: Optional[int],
) -> torch.Tensor:
    """Average pooling at the visible output sites: the sum over the visible positions of each window divided by
    their count (plus the window's padding positions when ``count_include_pad``, or ``divisor_override``)."""
    nmap = cached_neighbor_map(in_sites, out_sites, kernel, stride, padding)
    summed = _rows_or_fill(feats, nmap, 0.0).sum(0)
    if divisor_override:
        return summed / divisor_override
    count = (nmap >= 0).sum(0)
    if count_include_pad:
        count = count + _padding_positions(out_sites, in_sites.grid, kernel, stride, padding)
    return summed / count.clamp_min(1).to(feats.dtype)[:, None]


def _padding_positions(out_sites: Sites, grid: Tuple[int, int], kernel, stride, padding) -> torch.Tensor:
    """``(T_out,)`` number of positions of each output site's window that fall on the padding, outside the grid."""
    k, s, p = (kernel[0], kernel[1]), (stride[0], stride[1]), (padding[0], padding[1])
    inside = []
    for axis in range(2):
        first = out_sites.coords[:, axis] * s[axis] - p[axis]
        lo, hi = first.clamp_min(0), (first + k[axis]).clamp_max(grid[axis])
        inside.append((hi - lo).clamp_min(0))
    return k[0] * k[1] - inside[0] * inside[1]


def sample_mean(feats: torch.Tensor, sites: Sites) -> torch.Tensor:
    """``(B, C)`` mean of every sample's visible tokens (a global average under masked-dense semantics)."""
    summed = feats.new_zeros(sites.batch_size, feats.shape[1]).index_add(0, sites.batch, feats)
    return summed / sites.counts().clamp_min(1).to(feats.dtype)[:, None]


def sample_reduce(
    op, feats: torch.Tensor, sites: Sites, kwargs: dict, sizes: Sequence[int] = (), digits: Sequence[int] = ()
) -> torch.Tensor:
    """A reduction over the whole grid (``sum``, ``mean``, ``linalg_vector_norm``, ``amax``, ``amin``)
    taken over each sample's visible tokens: ``(B, C)``. Padding rows are the op's neutral element.
    ``digits`` (indices into the channel digit ``sizes``) are reduced too: a group norm's statistics, over
    the visible positions and the channels of each group (every token holds all channels, so the two
    reductions compose)."""
    name = op.__name__.split(".")[0]
    if name == "mean":
        out = sample_mean(feats, sites)
    else:
        fill = {"amax": float("-inf"), "amin": float("inf")}.get(name, 0.0)
        padded, valid = sites.pad(feats)
        if fill:
            padded = padded.masked_fill(~valid[:, :, None], fill)
        out = op(padded, dim=[1], **kwargs)
    if not digits:
        return out
    return op(out.view(out.shape[0], *sizes), dim=[1 + d for d in digits]).reshape(out.shape[0], -1)
