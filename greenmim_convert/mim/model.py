"""The MIM model: encoder (a converted GreenModel, or the dense SimMIM baseline) + decoder + target and loss.

``MIMModel(encoder, decoder, target)(images, visible)`` returns a :class:`MIMOutput` whose ``loss`` drops into
any training loop: ``out.loss.backward()``, ``out["loss"]`` or ``out[0]`` (as transformers' Trainer reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Tuple

import torch
import torch.nn as nn
import torch.utils._pytree

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.runtime.tokens import VisibleTokens

from .targets import PixelTarget


@dataclass
class MIMOutput:
    """``loss``: the loss on hidden units; ``pred`` and ``target``: ``(H, P)`` pixel predictions and targets of
    the hidden units, at flat positions ``hidden`` (b * N + u, ascending)."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    hidden: torch.Tensor

    def to_tuple(self) -> Tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __getitem__(self, key: Any) -> Any:
        """``out["loss"]`` or ``out[0]``, as a transformers ModelOutput reads."""
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self))


torch.utils._pytree.register_dataclass(MIMOutput)  # FSDP2 finds the output's tensors to hook the backward


def unit_tokens(tokens: VisibleTokens, mask_grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One feature per mask unit the tokens cover and its flat index b * N + u; when the final grid is finer than
    the mask grid, the tokens of a unit are averaged."""
    gh, gw = mask_grid
    th, tw = tokens.grid
    if th % gh or tw % gw:
        raise InvalidInputError(f"final grid {tokens.grid} is not a multiple of the mask grid {(gh, gw)}")
    rh, rw = th // gh, tw // gw
    flat = tokens.batch * (gh * gw) + (tokens.coords[:, 0] // rh) * gw + tokens.coords[:, 1] // rw
    if rh == rw == 1:
        return tokens.feats, flat
    index, inverse = torch.unique(flat, return_inverse=True)
    sums = tokens.feats.new_zeros(index.numel(), tokens.feats.shape[1]).index_add_(0, inverse, tokens.feats)
    return sums / (rh * rw), index


class MIMModel(nn.Module):
    """Masked image modeling: ``forward(images, visible)`` encodes the visible units, decodes every hidden unit
    and takes the target's loss on the hidden units only.

    ``encoder`` maps ``(images, visible)`` to a GreenOutput (a GreenModel, or a DenseEncoder); its
    ``mask_unit``, ``mask_grid`` and ``img_size`` set the unit geometry.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, target: nn.Module = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.target = target if target is not None else PixelTarget()
        self.unit = int(encoder.mask_unit)
        self.mask_grid = tuple(encoder.mask_grid)
        if getattr(decoder, "reads_hidden", False):
            if not hasattr(encoder, "all_units"):
                raise InvalidInputError(
                    f"{type(decoder).__name__} predicts a hidden unit from the encoder's feature "
                    "there, and a converted encoder computes none at hidden units: use the "
                    "transformer decoder, or the dense encoder"
                )
            encoder.all_units = True

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> MIMOutput:
        out = self.encoder(images, visible)
        feats, index = unit_tokens(out.last, self.mask_grid)
        batch = images.shape[0]
        hidden = (~visible).flatten().nonzero().squeeze(1)
        if hidden.numel() == 0:  # nothing to predict: a zero loss that still reaches every decoder parameter
            pred = self.decoder(feats, index, batch)
            loss = 0.0 * pred.float().sum()
            empty = pred.new_zeros(0, pred.shape[-1])
            return MIMOutput(loss, empty, empty, hidden)
        pred = self.decoder(feats, index, batch, hidden)
        pred = pred.float() if pred.dtype != torch.float64 else pred
        target = self.target(images, self.unit, hidden)
        return MIMOutput(self.target.loss(pred, target), pred, target, hidden)
