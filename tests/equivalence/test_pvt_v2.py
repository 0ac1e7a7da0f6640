"""PVT v2 beyond the shared harness (tests/test_families.py): what its passes report for SRA and linear SRA."""

from __future__ import annotations

import torch
from test_families import build


def test_b0_report():
    _, green = build("pvt_v2_b0", 0, torch.float32)
    counts = {p.name: p.counts for p in green.report.passes}
    assert counts["attention"] == {
        "per-sample attention": 2,
        "reduced-key attention": 6,
    }  # sr_ratio 1 in the last stage
    assert counts["conv"]["image sparse conv 7x7/4"] == 1 and counts["conv"]["sparse conv (depthwise) 3x3/1"] == 8
    assert green.report.min_mask_unit == 32


def test_b2_li_report():
    """Linear SRA: keys average-pooled to 7x7 in every stage, then attended per sample."""
    _, green = build("pvt_v2_b2_li", 0, torch.float32)
    counts = {p.name: p.counts for p in green.report.passes}
    assert counts["attention"] == {"per-sample attention": 1, "reduced-key attention": 3}
    assert all(counts["pooling"].get(f"mean pool {k}x{k}") == 1 for k in (8, 4, 2))  # 56, 28, 14 -> 7
