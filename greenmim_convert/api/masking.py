"""Random per-sample masks of mask units, as MIM pre-training draws them."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from greenmim_convert.errors import InvalidInputError


def random_mask(
    batch_size: int,
    mask_grid: Union[int, Sequence[int]],
    ratio: float = 0.75,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """``(B, gh, gw)`` bool, True = visible; every sample hides exactly ``round(ratio * gh * gw)`` units of its own
    choosing."""
    if isinstance(mask_grid, int):
        mask_grid = (mask_grid, mask_grid)
    gh, gw = (int(v) for v in mask_grid)
    if batch_size < 1 or gh < 1 or gw < 1:
        raise InvalidInputError(f"random_mask needs a positive batch size and grid, got {batch_size} and {(gh, gw)}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise InvalidInputError(f"mask ratio must be in [0, 1], got {ratio}")
    n = gh * gw
    hidden = int(round(float(ratio) * n))
    scores = torch.rand(batch_size, n, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank >= hidden).view(batch_size, gh, gw).to(device or "cpu")
