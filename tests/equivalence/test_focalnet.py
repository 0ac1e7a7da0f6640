"""FocalNet beyond the shared harness (tests/test_families.py): what its passes report, the visible-only global
context."""

from __future__ import annotations

import pytest
import torch
from conftest import masks_with_unequal_counts, rel_err
from test_families import CASES, build


@pytest.mark.parametrize("name", ["focalnet_tiny_lrf", "focalnet_tiny_srf"])
def test_focalnet_report(name):
    _, green = build(name, 0, torch.float32)
    counts = {p.name: p.counts for p in green.report.passes}
    blocks = sum(CASES[name].kwargs["depths"])
    pooling = counts["pooling"]
    assert all(k.startswith("spatial mean -> per-sample") for k in pooling)  # every modulation's global context
    assert sum(pooling.values()) == blocks
    levels = CASES[name].kwargs["focal_levels"][0]
    convs = counts["conv"]
    assert sum(v for k, v in convs.items() if k.startswith("sparse conv (depthwise)")) == levels * blocks
    assert convs["patch embedding 4x4/4"] == 1 and convs["per-unit linear 2x2/2"] == 3


def test_global_context_is_the_visible_mean(seed):
    """Masked-dense differs from dense here: the dense mean over the grid would see masked positions."""
    from greenmim_convert.oracle.reference import dense_masked_reference

    model, green = build("focalnet_tiny_srf", seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(2, green.mask_grid, 0.5, gen)
    hidden = ~visible.repeat_interleave(green.mask_unit, 1).repeat_interleave(green.mask_unit, 2)
    other = images.clone()
    other[hidden[:, None].expand_as(other)] = torch.randn(int(hidden.sum()) * 3, generator=gen, dtype=torch.float64)
    assert torch.equal(green(other, visible).last.feats, green(images, visible).last.feats)
    ref = dense_masked_reference(model, other, visible).last.feats
    assert rel_err(green(images, visible).last.feats, ref) <= 1e-10
