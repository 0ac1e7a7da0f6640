"""Families beyond Swin, each through the generic passes: all visible == timm, masked == oracle (float64)."""
from __future__ import annotations

import pytest
import timm
import torch

import greenmim_convert as gmc

from conftest import check_against_reference, masks_with_unequal_counts, rel_err

FAMILIES = {
    "twins_pcpvt_small": dict(depths=(1, 1, 1, 1)),
}


def _dense_nchw(x: torch.Tensor, grid) -> torch.Tensor:
    return x if x.dim() == 4 else x.transpose(1, 2).reshape(x.shape[0], -1, *grid)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_equivalence(name, seed):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **FAMILIES[name]).double().eval()
    green = gmc.convert(model)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    full = torch.ones(3, *green.mask_grid, dtype=torch.bool)
    out = green(images, full)
    assert rel_err(out.last.to_dense(), _dense_nchw(model.forward_features(images), out.last.grid)) <= 1e-10
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.75, gen)
    check_against_reference(model, green, images, visible, gen=gen)
