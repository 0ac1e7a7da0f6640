"""Families beyond Swin, each through the generic passes: all visible == timm, masked == oracle (float64)."""
from __future__ import annotations

import pytest
import timm
import torch

import greenmim_convert as gmc

from conftest import check_against_reference, masks_with_unequal_counts, rel_err

FAMILIES = {
    "twins_pcpvt_small": dict(depths=(1, 1, 1, 1)),
    "swinv2_tiny_window8_256": dict(depths=(2, 2, 2, 2)),
    "swinv2_small_window16_256": dict(depths=(2, 2, 2, 2)),
    "swinv2_cr_tiny_224": dict(depths=(2, 2, 2, 2)),
    "twins_svt_small": dict(depths=(2, 2, 2, 2)),
}


def _dense_nchw(model, x: torch.Tensor, grid) -> torch.Tensor:
    """timm's forward_features output as NCHW: it may be NCHW, NHWC (``output_fmt``) or (B, N, C)."""
    if x.dim() == 3:
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
    return x.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else x


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_equivalence(name, seed):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **FAMILIES[name]).double().eval()
    green = gmc.convert(model)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    full = torch.ones(3, *green.mask_grid, dtype=torch.bool)
    out = green(images, full)
    assert rel_err(out.last.to_dense(), _dense_nchw(model, model.forward_features(images), out.last.grid)) <= 1e-10
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.75, gen)
    check_against_reference(model, green, images, visible, gen=gen)
