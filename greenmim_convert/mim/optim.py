"""AdamW parameter groups and the warm-up + cosine learning-rate schedule of pre-training."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("mask_token", "relative_position_bias_table", "pos_embed", "absolute_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, mask tokens, position tables (1-D or named so)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95) over :func:`param_groups`, fused where PyTorch has the kernel for the device."""
    device = next(model.parameters()).device.type
    fused = fused and device in ("cpu", "cuda")
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=lr,
        betas=(0.9, 0.95),
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_lambda(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then a cosine down to ``min_ratio`` at ``steps``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of :func:`lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, warmup, min_ratio))
