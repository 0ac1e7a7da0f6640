"""DaViT beyond the shared harness (tests/test_families.py): what its passes report, masked pixels never read."""

from __future__ import annotations

import pytest
import torch
from conftest import masks_with_unequal_counts
from test_families import build


@pytest.mark.parametrize("name", ["davit_base_fl", "davit_tiny"])
def test_davit_report(name):
    _, green = build(name, 0, torch.float32)
    counts = {p.name: p.counts for p in green.report.passes}
    assert counts["sample-matmul"] == {"per-sample padded matmul": 8}  # channel attention: 2 token sums x 4 blocks
    attention = counts["attention"]
    assert attention["window attention"] == 3 and attention["per-sample attention"] == 1  # last grid is one window
    assert counts["conv"]["sparse conv (depthwise) 3x3/1"] == 16  # two ConvPosEnc per block


def test_channel_attention_sums_only_visible_tokens(seed):
    """The oracle's channel attention is not the dense one: a masked token changes dense outputs, not masked-dense."""
    model, green = build("davit_tiny", seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(2, green.mask_grid, 0.5, gen)
    first = green(images, visible).last.feats
    other = images.clone()
    hidden = ~visible.repeat_interleave(green.mask_unit, 1).repeat_interleave(green.mask_unit, 2)
    other[hidden[:, None].expand_as(other)] = torch.randn(int(hidden.sum()) * 3, generator=gen, dtype=torch.float64)
    assert torch.equal(green(other, visible).last.feats, first)
