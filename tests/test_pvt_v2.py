"""PVT v2: overlapping patch embeddings, spatial-reduction attention, linear SRA, depthwise conv MLP."""
from __future__ import annotations

import pytest
import timm
import torch

import greenmim_convert as gmc
from greenmim_convert.masking import random_mask

from conftest import check_against_reference, masks_with_unequal_counts, rel_err


def _model(name: str, **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).double().eval()
    return model, gmc.convert(model)


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return _model("pvt_v2_b0")


def test_b0_report(b0):
    _, green = b0
    counts = {p.name: p.counts for p in green.report.passes}
    assert counts["global-attention"] == {"global attention": 2, "reduced-key attention": 6}
    assert counts["conv"]["image sparse conv 7x7/4"] == 1 and counts["conv"]["sparse conv (depthwise) 3x3/1"] == 8
    assert green.report.min_mask_unit == 32


def test_b0_all_visible_equals_timm(b0, seed):
    model, green = b0
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = green(images, torch.ones(2, 7, 7, dtype=torch.bool))
    last, inter = model.forward_intermediates(images)
    assert rel_err(out.last.to_dense(), last) <= 1e-10
    for got, want in zip(out.stages, inter):
        assert rel_err(got.to_dense(), want) <= 1e-10


def test_b0_masked_outputs_and_gradients(b0, seed):
    model, green = b0
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.75, gen)
    images = torch.randn(3, 3, 224, 224, generator=gen, dtype=torch.float64)
    check_against_reference(model, green, images, visible, gen=gen)


@pytest.mark.parametrize("name", ["pvt_v2_b2", "pvt_v2_b2_li"])
def test_b2_variants_masked(name, seed):
    torch.manual_seed(seed)
    model, green = _model(name, depths=(1, 1, 1, 1))
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(2, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(2, 3, 224, 224, generator=gen, dtype=torch.float64)
    check_against_reference(model, green, images, visible, grads=False)
    full = torch.ones_like(visible)
    assert rel_err(green(images, full).last.to_dense(), model.forward_features(images)) <= 1e-10
