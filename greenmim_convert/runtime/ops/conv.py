"""Convolutions on packed tokens: patch embedding, neighbourhood gathers (patch merging), sparse and
1x1 convolutions."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from greenmim_convert.kernels.sparse_conv import sparse_conv2d
from greenmim_convert.runtime.gather import RowMap
from greenmim_convert.runtime.plan.sites import Sites


def patch_embed(images: torch.Tensor, sites: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Conv2d with kernel == stride evaluated only on the patches at ``sites``: a per-patch linear."""
    b, c, h, w = images.shape
    ph, pw = weight.shape[2:]
    gh, gw = sites.grid
    cells = images[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    patches = cells[sites.batch, sites.coords[:, 0], sites.coords[:, 1]].reshape(sites.num_tokens, c * ph * pw)
    out = patches.matmul(weight.reshape(weight.shape[0], -1).t())
    return out + bias if bias is not None else out


def neighbours(fine: Sites, coarse: Sites, factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``(T_coarse, K)``: the fine token at each offset (dh, dw) of every coarse site's cell, -1 when masked."""
    off = torch.tensor(offsets, dtype=torch.long, device=coarse.device)
    rows = coarse.coords[:, :1] * factor[0] + off[None, :, 0]
    cols = coarse.coords[:, 1:] * factor[1] + off[None, :, 1]
    return fine.index_grid()[coarse.batch[:, None], rows, cols]


def _rows_or_zero(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``feats[index]`` with zero rows where ``index`` is -1 (masked positions read zeros).

    The valid entries must be distinct (cells of a kernel == stride neighbourhood), so the gather
    is a partial permutation and its backward a gather too (``RowMap``).
    """
    rows = RowMap.from_index(index, feats.shape[0])(feats)
    return rows.view(*index.shape, *feats.shape[1:])


def _rows_or_fill(feats: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    """``feats[index]`` with ``fill`` rows where ``index`` is -1; entries may repeat (overlapping pooling windows)."""
    padded = torch.cat([feats, feats.new_full((1, feats.shape[1]), fill)])
    rows = padded.index_select(0, torch.where(index >= 0, index, feats.shape[0]).reshape(-1))
    return rows.view(*index.shape, feats.shape[1])


def _check_cell_offsets(factor: Tuple[int, int], offsets: Sequence[Tuple[int, int]]) -> None:
    """Offsets must be distinct cells of the ``factor`` cell: every fine token then feeds one output row."""
    inside = all(0 <= dh < factor[0] and 0 <= dw < factor[1] for dh, dw in offsets)
    if not inside or len(set(map(tuple, offsets))) != len(offsets):
        raise ValueError(f"offsets {list(offsets)} are not distinct cells of a {tuple(factor)} neighbourhood")


def space_to_depth(
    feats: torch.Tensor,
    fine: Sites,
    coarse: Sites,
    factor: Tuple[int, int],
    offsets: Sequence[Tuple[int, int]],
    channel_index: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Gather the ``factor`` neighbourhood of each coarse site into its features (patch merging).

    ``offsets`` lists the fine neighbours (dh, dw) in feature order; masked neighbours read zeros.
    ``channel_index`` reorders the gathered ``(offset, channel)`` features when they are not
    offset-major (None for the usual layout).
    """
    _check_cell_offsets(factor, offsets)
    nbr = neighbours(fine, coarse, factor, offsets)
    out = _rows_or_zero(feats, nbr).reshape(coarse.num_tokens, len(offsets) * feats.shape[1])
    if channel_index is None:
        return out
    return out.index_select(1, torch.tensor(channel_index, dtype=torch.long, device=feats.device))


def conv_per_unit(
    feats: torch.Tensor, fine: Sites, coarse: Sites, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Kernel == stride Conv2d on packed tokens: gather each output's k x k inputs, then one GEMM."""
    kh, kw = weight.shape[2:]
    offsets = [(dh, dw) for dh in range(kh) for dw in range(kw)]
    patches = space_to_depth(feats, fine, coarse, (kh, kw), offsets)
    out = patches.matmul(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t())
    return out + bias if bias is not None else out


def sparse_conv(
    feats: torch.Tensor,
    in_sites: Sites,
    out_sites: Sites,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """Any Conv2d on packed tokens: masked inputs read zero, evaluated at the visible output sites."""
    return sparse_conv2d(feats, in_sites, out_sites, weight, bias, stride, padding, dilation, groups)


def folded_depthwise_conv(
    feats: torch.Tensor,
    in_sites: Sites,
    out_sites: Sites,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    channel_index: Tuple[int, ...],
    stride,
    padding,
    dilation,
) -> torch.Tensor:
    """A depthwise Conv2d applied densely to heads folded into the batch: packed column ``j`` is filtered by
    channel ``channel_index[j]`` of the conv."""
    index = torch.tensor(channel_index, dtype=torch.long, device=feats.device)
    w = weight.index_select(0, index)
    b = bias.index_select(0, index) if bias is not None else None
    return sparse_conv(feats, in_sites, out_sites, w, b, stride, padding, dilation, len(channel_index))


def image_sparse_conv(
    images: torch.Tensor,
    pixels: Sites,
    out_sites: Sites,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """A Conv2d on the image that is not a patchify conv: the visible pixels are its input sites."""
    feats = images.permute(0, 2, 3, 1)[pixels.batch, pixels.coords[:, 0], pixels.coords[:, 1]]
    return sparse_conv(feats, pixels, out_sites, weight, bias, stride, padding, dilation, groups)


def pointwise_conv(feats: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution (stride 1, groups 1) is a Linear over the channels of every token."""
    return F.linear(feats, weight.flatten(1), bias)
