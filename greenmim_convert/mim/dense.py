"""The dense SimMIM baseline: the unconverted model on the full image, a learned mask token in place of the
patch embedding's output at hidden units."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from greenmim_convert.compiler.capture import input_channels, is_timm_model, output_values
from greenmim_convert.errors import InvalidInputError
from greenmim_convert.oracle.reference import dense_to_tokens, feature_layout
from greenmim_convert.runtime.tokens import GreenOutput


def stem_conv(model: nn.Module, in_chans: int) -> nn.Conv2d:
    """The convolution that embeds the image: the first Conv2d reading the ``in_chans`` image channels."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == in_chans:
            return mod
    raise ValueError(
        f"{type(model).__name__} has no Conv2d reading {in_chans} image channels to put a SimMIM mask token after"
    )


def dense_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The final features of the function ``convert`` captures (timm's ``forward_features``, else ``forward``),
    read from the model's output as ``convert`` reads it (a ``ModelOutput``'s ``last_hidden_state``, the last
    of a ``BackboneOutput``'s maps)."""
    if is_timm_model(model):
        return model.forward_features(images)
    return output_values(model(images), type(model).__name__)[0]


class SimMIMDense(nn.Module):
    """The dense baseline: the function ``convert`` captures (timm's ``forward_features``, else ``forward``)
    with masked stem outputs replaced by a learned token."""

    def __init__(self, model: nn.Module, mask_unit: int):
        super().__init__()
        self.model = model
        self.mask_unit = mask_unit
        self.stem = stem_conv(model, input_channels(model))
        p = next(model.parameters())
        self.mask_token = nn.Parameter(torch.zeros(1, self.stem.out_channels, 1, 1, device=p.device, dtype=p.dtype))
        self._visible: Optional[torch.Tensor] = None

    def _hook(self, module, args, out):
        h, w = out.shape[-2:]
        vis = self._visible.repeat_interleave(h // self._visible.shape[1], 1)
        vis = vis.repeat_interleave(w // self._visible.shape[2], 2)
        return torch.where(vis[:, None], out, self.mask_token.to(out.dtype))

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        self._visible = visible
        handle = self.stem.register_forward_hook(self._hook)
        try:
            return dense_features(self.model, images)
        finally:
            handle.remove()
            self._visible = None


class DenseEncoder(SimMIMDense):
    """The SimMIM baseline as a MIM encoder: returns what a converted model returns (``out.last``: the final map's
    tokens in canonical order) at the visible units, or at every unit when ``all_units`` (for SimMIM's linear
    head). The source model's keys are under ``model.``."""

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], mask_unit: int, fmt: Optional[str] = None):
        super().__init__(model, mask_unit)
        self.img_size = tuple(img_size)
        self.mask_grid = (self.img_size[0] // mask_unit, self.img_size[1] // mask_unit)
        self.fmt = fmt or getattr(model, "output_fmt", "NCHW")
        self.all_units = False
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def source_model(self) -> nn.Module:
        return self.model

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
        """Dense forward with mask tokens; the final map's tokens as ``out.last`` (no stages)."""
        dense = super().forward(images, visible)
        layout, stride = feature_layout(dense, self.img_size, self.fmt)
        read = torch.ones_like(visible) if self.all_units else visible
        return GreenOutput(dense_to_tokens(dense, read, stride, layout, self.img_size), [])


def final_stride(model: nn.Module, img_size: Tuple[int, int], fmt: Optional[str] = None) -> int:
    """Pixels per cell of the model's final feature map, read from one forward of a small batch."""
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = dense_features(model, torch.zeros(1, 3, *img_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
    return feature_layout(out, img_size, fmt)[1]


def dense_encoder(
    model: nn.Module, img_size: Union[int, Tuple[int, int]], mask_unit: Optional[int] = None, fmt: Optional[str] = None
) -> DenseEncoder:
    """The SimMIM baseline with the defaults ``convert`` takes: the mask unit is the final map's stride."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    unit = mask_unit if mask_unit is not None else final_stride(model, size, fmt)
    if size[0] % unit or size[1] % unit:
        raise InvalidInputError(f"image size {size} is not divisible by the mask unit {unit}px")
    return DenseEncoder(model, size, unit, fmt)
