"""Mask generators for MIM pre-training: each draws a per-sample ``(B, gh, gw)`` bool ``visible`` mask.

Every generator is a callable ``gen(batch_size, generator=None)``; all randomness comes from the given
``torch.Generator``, so a seeded generator reproduces the masks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from greenmim_convert.api.masking import random_mask
from greenmim_convert.errors import InvalidInputError

Grid = Union[int, Sequence[int]]
MASKS = ("random", "block", "ummae")


def _grid(grid: Grid) -> Tuple[int, int]:
    """A mask grid as ``(gh, gw)`` of positive ints."""
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if gh < 1 or gw < 1:
        raise InvalidInputError(f"a mask grid needs positive sides, got {(gh, gw)}")
    return gh, gw


def _ratio(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise InvalidInputError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _rand(generator: Optional[torch.Generator]) -> float:
    """One uniform float in [0, 1) from ``generator``."""
    return float(torch.rand((), generator=generator))


class RandomMask:
    """Uniform random masking (MAE, GreenMIM): every sample hides exactly ``round(ratio * gh * gw)`` units."""

    def __init__(self, grid: Grid, ratio: float = 0.75):
        self.grid, self.ratio = _grid(grid), _ratio("mask ratio", ratio)

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return random_mask(batch_size, self.grid, self.ratio, generator=generator)


class BlockMask:
    """Block-wise masking (BEiT): rectangles of at least ``min_units`` units with aspect ratios log-uniform in
    ``[1/max_aspect, max_aspect]`` are hidden until ``round(ratio * gh * gw)`` units are; when no new block fits
    after ``attempts`` tries, random single units fill up to that exact count."""

    def __init__(
        self, grid: Grid, ratio: float = 0.75, min_units: int = 4, max_aspect: float = 3.0, attempts: int = 10
    ):
        self.grid, self.ratio = _grid(grid), _ratio("mask ratio", ratio)
        if min_units < 1 or max_aspect < 1:
            raise InvalidInputError(
                f"block masks need min_units >= 1 and max_aspect >= 1, got {min_units}, {max_aspect}"
            )
        self.min_units, self.log_aspect, self.attempts = int(min_units), math.log(max_aspect), int(attempts)

    @property
    def hidden_count(self) -> int:
        """Units every sample hides."""
        return int(round(self.ratio * self.grid[0] * self.grid[1]))

    def _block(self, hidden: torch.Tensor, budget: int, generator: Optional[torch.Generator]) -> int:
        """Hide one random block of at most ``budget`` new units; returns how many units it newly hid."""
        gh, gw = self.grid
        for _ in range(self.attempts):
            area = self.min_units + _rand(generator) * (budget - self.min_units)
            aspect = math.exp((2 * _rand(generator) - 1) * self.log_aspect)
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (0 < h <= gh and 0 < w <= gw):
                continue
            top, left = int(_rand(generator) * (gh - h + 1)), int(_rand(generator) * (gw - w + 1))
            window = hidden[top : top + h, left : left + w]
            new = int((~window).sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def _one(self, generator: Optional[torch.Generator]) -> torch.Tensor:
        gh, gw = self.grid
        hidden = torch.zeros(gh, gw, dtype=torch.bool)
        want, done = self.hidden_count, 0
        while done < want and want - done >= self.min_units:
            new = self._block(hidden, want - done, generator)
            if new == 0:
                break
            done += new
        if done < want:
            free = (~hidden).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=generator)[: want - done]]
            hidden.view(-1)[pick] = True
        return ~hidden

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if batch_size < 1:
            raise InvalidInputError(f"batch size must be positive, got {batch_size}")
        return torch.stack([self._one(generator) for _ in range(batch_size)])


class UniformMask:
    """UM-MAE's uniform masking: one random unit of every 2x2 block is kept (25% of the grid), then a secondary
    mask hides ``round(secondary_ratio * kept)`` of the kept units; visible = kept and not secondarily masked."""

    def __init__(self, grid: Grid, secondary_ratio: float = 0.25):
        self.grid = _grid(grid)
        if self.grid[0] % 2 or self.grid[1] % 2:
            raise InvalidInputError(f"UM-MAE's uniform masking needs an even mask grid, got {self.grid}")
        self.secondary_ratio = _ratio("secondary mask ratio", secondary_ratio)

    @property
    def visible_count(self) -> int:
        """Units every sample keeps visible."""
        kept = self.grid[0] * self.grid[1] // 4
        return kept - int(round(self.secondary_ratio * kept))

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if batch_size < 1:
            raise InvalidInputError(f"batch size must be positive, got {batch_size}")
        bh, bw = self.grid[0] // 2, self.grid[1] // 2
        choice = torch.randint(0, 4, (batch_size, bh, bw), generator=generator)
        kept = torch.nn.functional.one_hot(choice, 4).bool()  # (B, bh, bw, 4): which of the block's units
        kept = kept.view(batch_size, bh, bw, 2, 2).permute(0, 1, 3, 2, 4).reshape(batch_size, *self.grid)
        secondary = RandomMask((bh, bw), self.secondary_ratio)(batch_size, generator)  # over the kept units
        order = kept.view(batch_size, -1).nonzero()[:, 1].view(batch_size, bh * bw)
        visible = torch.zeros(batch_size, self.grid[0] * self.grid[1], dtype=torch.bool)
        visible.scatter_(1, order, secondary.view(batch_size, -1))
        return visible.view(batch_size, *self.grid)


def mask_generator(kind: str, grid: Grid, ratio: float = 0.75, secondary_ratio: float = 0.25):
    """The generator ``kind`` names: ``random`` (ratio), ``block`` (ratio) or ``ummae`` (secondary_ratio)."""
    if kind == "random":
        return RandomMask(grid, ratio)
    if kind == "block":
        return BlockMask(grid, ratio)
    if kind == "ummae":
        return UniformMask(grid, secondary_ratio)
    raise InvalidInputError(f"unknown mask {kind!r}; choose from {', '.join(MASKS)}")
