"""Weight gradients in their parameter's layout, so DDP's buckets take them without a copy or a warning."""

from __future__ import annotations

import torch


def like_param(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s strides. A channels-last convolution backward, or a transposed ``(K, C)`` tap
    gradient, gives a depthwise ``(C, 1, k, k)`` weight the strides ``(k*k, 1, k, 1)``: the same memory order,
    but DDP compares every stride and warns. Same order: a free restride; otherwise one copy (weights are small)."""
    if grad.stride() == param.stride():
        return grad
    if not grad.is_contiguous():
        grad = grad.contiguous()
    return grad.as_strided(param.shape, param.stride()) if param.is_contiguous() else grad
