"""Per-sample values beside packed tokens: creations, broadcasts, per-sample matmuls, random draws."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from greenmim_convert.runtime.plan.sites import Sites


def per_sample_creation(op, visible: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    """``torch.empty((B, 1, ..., 1))`` and friends as packed per-sample rows ``(B, 1)``."""
    return op([visible.shape[0], 1], *rest, **kwargs)


def per_sample_factory(op, like: torch.Tensor, sites: Sites, rest: tuple, kwargs: dict) -> torch.Tensor:
    """``new_empty``/``new_zeros``/... of one value per sample: ``(B, 1)`` packed per-sample rows."""
    return op(like, [sites.batch_size, 1], *rest, **kwargs)


def sample_to_tokens(per_sample: torch.Tensor, sites: Sites) -> torch.Tensor:
    """Broadcast ``(B, C)`` per-sample values to the ``(T, C)`` tokens of their samples."""
    return per_sample.index_select(0, sites.batch)


def mul_per_sample(feats: torch.Tensor, per_sample: torch.Tensor, sites: Sites) -> torch.Tensor:
    """``feats * sample_to_tokens(per_sample, sites)`` keeping ``feats`` and the ``(B, C)`` factor for backward,
    not the factor broadcast to every token (a squeeze-excite scale, GRN's normalised norm, a global context)."""
    return _MulPerSample.apply(feats, per_sample, sites.batch)


class _MulPerSample(torch.autograd.Function):
    """Autograd of :func:`mul_per_sample`: the factor is broadcast again in backward, its gradient summed per sample."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, per_sample: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(feats, per_sample, batch)
        return feats * per_sample.index_select(0, batch)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        feats, per_sample, batch = ctx.saved_tensors
        dfeats = dfactor = None
        if ctx.needs_input_grad[0]:
            dfeats = grad * per_sample.index_select(0, batch)
            if dfeats.shape != feats.shape:
                dfeats = dfeats.sum_to_size(feats.shape)
        if ctx.needs_input_grad[1]:
            prod = grad * feats
            dfactor = prod.new_zeros(per_sample.shape[0], *prod.shape[1:]).index_add_(0, batch, prod)
            if dfactor.shape != per_sample.shape:
                dfactor = dfactor.sum_to_size(per_sample.shape)
        return dfeats, dfactor, None


def to_padded_dense(x: torch.Tensor, sites: Sites, spec: Tuple[Tuple, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
    """Packed tokens ``(T, C)`` or per-sample rows ``(B, C)`` -> the dense operand, tokens padded per sample."""
    tokens = any(ax == ("t",) for ax in spec)
    if tokens:
        x, _ = sites.pad(x)
        lead = [0, 1]
    else:
        lead = [0]
    x = x.reshape(*x.shape[: len(lead)], *sizes)
    place = {"b": 0, "t": 1}
    perm, shape = [], []
    for ax in spec:
        dims = [place[ax[0]]] if ax and isinstance(ax[0], str) else [len(lead) + j for j in ax]
        perm.extend(dims)
        size = 1
        for d in dims:
            size *= x.shape[d]
        shape.append(size)
    return x.permute(*perm).reshape(shape)


def from_padded_dense(x: torch.Tensor, sites: Sites, spec: Tuple[Tuple, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
    """The dense result of a per-sample matmul -> packed tokens ``(T, C)`` or per-sample rows ``(B, C)``."""
    tokens = any(ax == ("t",) for ax in spec)
    split, order = [], []
    for ax, size in zip(spec, x.shape):
        if ax and isinstance(ax[0], str):
            split.append(size)
            order.append(ax[0])
        else:
            split.extend(sizes[j] for j in ax)
            order.extend(ax)
    x = x.reshape(split)
    lead = ["b", "t"] if tokens else ["b"]
    perm = [order.index(k) for k in lead] + [order.index(j) for j in range(len(sizes))]
    channels = 1
    for s in sizes:
        channels *= s
    x = x.permute(*perm).reshape(*x.shape[:0], *[x.shape[order.index(k)] for k in lead], channels)
    return sites.unpad(x) if tokens else x


def dropout_noise(like: torch.Tensor, shape: Sequence[int], p: float) -> torch.Tensor:
    """The scaled keep mask a training-mode ``dropout(x, p)`` of ``shape`` multiplies ``x`` by, on ``like``'s device
    and dtype: ``aten.dropout``'s own draw, so the random stream and the kept elements are the unconverted model's.

    On the CPU that is ``empty.bernoulli_(1 - p).div_(1 - p)``, exactly what ATen's dropout computes; elsewhere it is
    ``dropout`` of ones (the fused kernel's draw).
    """
    if like.device.type == "cpu":
        return torch.empty(shape, dtype=like.dtype).bernoulli_(1 - p).div_(1 - p)
    return torch.dropout(torch.ones(shape, dtype=like.dtype, device=like.device), p, True)


def recompute(subgraph: torch.nn.Module, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``subgraph(*inputs)`` keeping only ``inputs`` for backward: when a gradient is needed, the subgraph runs
    again in backward with the same random draws (``torch.utils.checkpoint``); without grad it just runs."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return checkpoint(subgraph, *inputs, use_reentrant=False)
    return subgraph(*inputs)
