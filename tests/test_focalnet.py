"""FocalNet: 1x1 convs as Linears, channel splits and slices, depthwise focal convs, per-sample global context."""
from __future__ import annotations

import pytest
import torch
from timm.models.focalnet import _create_focalnet

import greenmim_convert as gmc

from conftest import check_against_reference, masks_with_unequal_counts, rel_err

SMALL = dict(depths=(1, 1, 2, 1), embed_dim=32, layerscale_value=0.5)
CONFIGS = {  # the small-receptive-field model, and three focal levels with the post-norm options
    "focalnet_tiny_srf": dict(SMALL, focal_levels=(2, 2, 2, 2)),
    "focalnet_tiny_lrf": dict(SMALL, focal_levels=(3, 3, 3, 3), use_post_norm_in_modulation=True, normalize_modulator=True),
}


IMG = 96  # small grids: float64 depthwise convolutions take PyTorch's slow per-group path on the CPU


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _create_focalnet(name, **CONFIGS[name]).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_focalnet_all_visible_matches_timm(name, seed):
    model = _model(name, seed)
    green = gmc.convert(model, img_size=IMG)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    out = green(images, torch.ones(2, *green.mask_grid, dtype=torch.bool))
    _, stages = model.forward_intermediates(images)
    assert len(stages) == len(out.stages)
    for got, want in zip(out.stages, stages):
        assert rel_err(got.to_dense(), want) <= 1e-10


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_focalnet_masked_matches_reference(name, seed):
    model = _model(name, seed)
    green = gmc.convert(model, img_size=IMG)
    done = {p.name: p.counts for p in green.report.passes}
    assert done["pooling"]["spatial mean -> per-sample mean"] == sum(SMALL["depths"])
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.6, gen)
    check_against_reference(model, green, images, visible, gen=gen)


def test_global_context_is_the_visible_mean(seed):
    """Masked-dense differs from dense here: the dense mean over the grid would see masked positions."""
    from greenmim_convert.reference import dense_masked_reference

    model = _model("focalnet_tiny_srf", seed)
    green = gmc.convert(model, img_size=IMG)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(2, green.mask_grid, 0.5, gen)
    hidden = ~visible.repeat_interleave(green.mask_unit, 1).repeat_interleave(green.mask_unit, 2)
    other = images.clone()
    other[hidden[:, None].expand_as(other)] = torch.randn(int(hidden.sum()) * 3, generator=gen, dtype=torch.float64)
    assert torch.equal(green(other, visible).last.feats, green(images, visible).last.feats)
    ref = dense_masked_reference(model, other, visible).last.feats
    assert rel_err(green(images, visible).last.feats, ref) <= 1e-10
