"""DaViT: window attention without bias, channel attention (per-sample sums over visible tokens), ConvPosEnc."""
from __future__ import annotations

import pytest
import timm
import torch

import greenmim_convert as gmc

from conftest import check_against_reference, masks_with_unequal_counts, rel_err

SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))
IMG_SIZE = {"davit_tiny": 224, "davit_base_fl": 384}


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **SMALL).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("name", sorted(IMG_SIZE))
def test_davit_all_visible_matches_timm(name, seed):
    model = _model(name, seed)
    green = gmc.convert(model, img_size=IMG_SIZE[name])
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    out = green(images, torch.ones(2, *green.mask_grid, dtype=torch.bool))
    _, stages = model.forward_intermediates(images)
    assert len(stages) == len(out.stages)
    for got, want in zip(out.stages, stages):
        assert rel_err(got.to_dense(), want) <= 1e-10


@pytest.mark.parametrize("name", sorted(IMG_SIZE))
def test_davit_masked_matches_reference(name, seed):
    model = _model(name, seed)
    green = gmc.convert(model, img_size=IMG_SIZE[name])
    done = {p.name: p.counts for p in green.report.passes}
    assert done["channel-attention"] and done["window-attention"]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.6, gen)
    check_against_reference(model, green, images, visible, gen=gen)


def test_channel_attention_sums_only_visible_tokens(seed):
    """The oracle's channel attention is not the dense one: a masked token changes dense outputs, not masked-dense."""
    model = _model("davit_tiny", seed)
    green = gmc.convert(model)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(2, green.mask_grid, 0.5, gen)
    first = green(images, visible).last.feats
    other = images.clone()
    hidden = ~visible.repeat_interleave(green.mask_unit, 1).repeat_interleave(green.mask_unit, 2)
    other[hidden[:, None].expand_as(other)] = torch.randn(int(hidden.sum()) * 3, generator=gen, dtype=torch.float64)
    assert torch.equal(green(other, visible).last.feats, first)
