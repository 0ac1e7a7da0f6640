"""Hiera: its own MAE-style masked forward is the oracle (it computes on visible mask units by construction)."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens


def hiera_reference(model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    """Hiera's own masked forward (MAE-style: masked mask units discarded), one sample at a time so that
    samples may keep unequal numbers of units; stage outputs rerolled by its own ``Reroll``.

    Hiera computes only on its visible mask units by construction, so the model itself is the oracle
    when the conversion's mask unit is Hiera's.
    """
    if tuple(visible.shape[1:]) != tuple(model.mask_spatial_shape):
        raise InvalidInputError(
            f"Hiera masks its own {tuple(model.mask_spatial_shape)} mask units; the mask grid is "
            f"{tuple(visible.shape[1:])}"
        )
    size = (int(images.shape[-2]), int(images.shape[-1]))
    stage_tokens: List[List[torch.Tensor]] = [[] for _ in model.stage_ends]
    last: List[torch.Tensor] = []
    for i in range(images.shape[0]):
        mask = visible[i].reshape(1, -1)
        final, units = model.forward_intermediates(images[i : i + 1], mask=mask, output_fmt="NHWC")
        for j, rolled in enumerate(units):
            stage_tokens[j].append(_unit_maps_to_tokens(rolled[0], visible[i]))
        last.append(_unit_maps_to_tokens(model.reroll(final, model.stage_ends[-1], mask=mask)[0], visible[i]))

    def tokens(rows: List[torch.Tensor], stage: int) -> VisibleTokens:
        uh, uw = _unit_shape(model, stage)
        grid = (visible.shape[1] * uh, visible.shape[2] * uw)
        return VisibleTokens(torch.cat(rows), Sites.from_mask(visible, grid, size[0] // grid[0]))

    stages = [tokens(rows, j) for j, rows in enumerate(stage_tokens)]
    return GreenOutput(tokens(last, len(stage_tokens) - 1), stages)


def _unit_shape(model: nn.Module, stage: int) -> Tuple[int, int]:
    """Positions per mask unit along each axis at a stage: Hiera's mask unit shrinks by its query stride per stage."""
    _, size = model.reroll.schedule[model.stage_ends[stage]]
    return (size[0] // model.mask_spatial_shape[0], size[1] // model.mask_spatial_shape[1])


def _unit_maps_to_tokens(units: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``(visible units, uh, uw, C)`` maps of one sample's visible units (raster unit order) -> its visible
    positions' rows in raster order of the whole grid."""
    n, uh, uw, c = units.shape
    gh, gw = visible.shape
    canvas = units.new_zeros(gh * gw, uh, uw, c)
    canvas = canvas.index_copy(0, visible.reshape(-1).nonzero().squeeze(1), units)
    dense = canvas.view(gh, gw, uh, uw, c).permute(0, 2, 1, 3, 4).reshape(gh * uh, gw * uw, c)
    vis = visible.repeat_interleave(uh, 0).repeat_interleave(uw, 1)
    return dense[vis]
