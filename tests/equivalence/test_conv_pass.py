"""The conv pass on a small hierarchical conv/attention hybrid: every conv geometry the ViT families use."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import rel_err

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.oracle.reference import dense_masked_reference


class TinyConvNet(nn.Module):
    """Overlapping 7x7/4 embedding on pixels, a depthwise PEG with residual, a 2x2/2 patchify conv,
    a 3x3/2 strided conv and a dilated grouped conv, with token-wise norms and MLPs between them."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 7, stride=4, padding=3)
        self.peg = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.down1 = nn.Conv2d(dim, 2 * dim, 2, stride=2)
        self.down2 = nn.Conv2d(2 * dim, 4 * dim, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(4 * dim, 4 * dim, 3, padding=2, dilation=2, groups=4)
        self.norm2 = nn.LayerNorm(4 * dim)
        self.output_fmt = "NCHW"
        self.feature_info = [
            dict(module="peg", reduction=4, num_chs=dim),
            dict(module="down1", reduction=8, num_chs=2 * dim),
            dict(module="mix", reduction=16, num_chs=4 * dim),
        ]

    def forward_features(self, x):
        x = self.stem(x)
        x = x + self.peg(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm1(t))
        x = t.transpose(1, 2).reshape(b, c, h, w)
        x = self.down1(x)
        x = self.down2(x)
        x = x + self.mix(x)
        return self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    model = TinyConvNet().double().eval()
    return model, gmc.convert(model, img_size=64, mask_unit=16)


def test_report_lists_every_conv_kind(convnet):
    _, green = convnet
    counts = {k: v for p in green.report.passes if p.name == "conv" for k, v in p.counts.items()}
    assert counts == {
        "image sparse conv 7x7/4": 1,
        "sparse conv (depthwise) 3x3/1": 1,
        "per-unit linear 2x2/2": 1,
        "sparse conv 3x3/2": 1,
        "sparse conv 3x3/1": 1,
    }
    assert green.report.min_mask_unit == 16


def test_conv_net_matches_reference_outputs_and_gradients(convnet, seed):
    model, green = convnet
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(3, green.mask_grid, 0.6, generator=gen)
    visible[0] = True
    images = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)
    out = green(images, visible)
    ref = dense_masked_reference(model, images, visible)
    weights = [torch.randn(t.feats.shape, generator=gen, dtype=torch.float64) for t in ref.stages + [ref.last]]
    for got, want in zip(out.stages + [out.last], ref.stages + [ref.last]):
        assert torch.equal(got.coords, want.coords)
        assert rel_err(got.feats, want.feats) <= 1e-10
    grads = []
    for res in (out, ref):
        model.zero_grad()
        sum((w * t.feats).sum() for w, t in zip(weights, res.stages + [res.last])).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[1]:
        assert rel_err(grads[0][name], grads[1][name]) <= 1e-10, name


def test_all_visible_equals_dense(convnet, seed):
    model, green = convnet
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = green(images, torch.ones(2, *green.mask_grid, dtype=torch.bool))
    assert rel_err(out.last.to_dense(), model.forward_features(images)) <= 1e-10


def test_mask_unit_must_cover_strided_grids():
    model = TinyConvNet().double()
    with pytest.raises(gmc.MaskUnitError, match="minimal mask unit 16"):
        gmc.convert(model, img_size=64, mask_unit=8)
