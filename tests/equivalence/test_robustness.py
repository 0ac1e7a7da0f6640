"""Odd but legal input still gets the right answer."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SWIN, make_swin, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.oracle.reference import dense_masked_reference

SMALL_SWINS = {
    "w4": TINY_SWIN,
    "w2_d1": dict(embed_dim=16, depths=(1, 2, 1), num_heads=(1, 2, 2), window_size=2, img_size=64),
}


@pytest.fixture(scope="module")
def swins64():
    out = {}
    for name, cfg in SMALL_SWINS.items():
        torch.manual_seed(len(out))
        model = make_swin(dtype=torch.float64, **cfg)
        out[name] = (model, gmc.convert(model))
    return out


def _compare(model, green, images, visible, tol=1e-10):
    out = green(images, visible)
    ref = dense_masked_reference(model, images, visible)
    for got, want in zip(out.stages + [out.last], ref.stages + [ref.last]):
        assert torch.isfinite(got.feats).all()
        assert torch.equal(got.coords, want.coords) and torch.equal(got.batch, want.batch)
        if want.feats.numel():
            assert rel_err(got.feats, want.feats) <= tol
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(sorted(SMALL_SWINS)),
    batch=st.integers(1, 5),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_mask_matches_reference(swins64, name, batch, ratio, seed):
    model, green = swins64[name]
    gen = torch.Generator().manual_seed(seed)
    visible = torch.rand(batch, *green.mask_grid, generator=gen) >= ratio
    images = torch.randn(batch, 3, *green.img_size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _compare(model, green, images, visible)


def test_sample_without_visible_units(swins64, seed):
    model, green = swins64["w4"]
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(3, green.mask_grid, 0.5, generator=gen)
    visible[1] = False
    images = torch.randn(3, 3, 128, 128, generator=gen, dtype=torch.float64, requires_grad=True)
    out = _compare(model, green, images, visible)
    assert (out.last.batch != 1).all() and out.last.counts()[1] == 0
    visible[:] = False
    out = green(images, visible)
    assert out.last.feats.shape[0] == 0 and out.last.to_dense().abs().sum() == 0
    (out.last.feats.sum() + sum(t.feats.sum() for t in out.stages)).backward()
    assert torch.isfinite(images.grad).all()


def test_batch_of_one_full_next_to_single_unit(swins64, seed):
    model, green = swins64["w4"]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 128, 128, generator=gen, dtype=torch.float64)
    visible = torch.zeros(2, *green.mask_grid, dtype=torch.bool)
    visible[0] = True
    visible[1, 3, 0] = True  # a border unit: shifted windows wrap there
    _compare(model, green, images, visible)
    _compare(model, green, images[:1], visible[:1])


def test_channels_last_and_non_contiguous_images(swins64, seed):
    model, green = swins64["w4"]
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(2, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(2, 3, 128, 128, generator=gen, dtype=torch.float64)
    cl = images.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 3, 256, 128, generator=gen, dtype=torch.float64)[:, :, ::2]
    assert not strided.is_contiguous()
    a = _compare(model, green, cl, visible)
    assert torch.equal(a.last.feats, green(images, visible).last.feats)
    _compare(model, green, strided, visible)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_autocast_half_precision(seed, dtype, tol):
    """Half precision under autocast: stated tolerance 5e-2 (bfloat16) / 1e-2 (float16) relative."""
    torch.manual_seed(seed)
    model = make_swin(dtype=torch.float32, **TINY_SWIN)
    green = gmc.convert(model)
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(2, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(2, 3, 128, 128, generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        out = green(images, visible)
    ref = dense_masked_reference(model, images, visible)
    assert rel_err(out.last.feats.float(), ref.last.feats) <= tol


def test_eval_train_no_grad(seed):
    torch.manual_seed(seed)
    cfg = dict(TINY_SWIN, drop_path_rate=0.3, drop_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.2)
    model = make_swin(dtype=torch.float64, **cfg)
    green = gmc.convert(model).eval()
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(2, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(2, 3, 128, 128, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        a = green(images, visible)
    b = green(images, visible)
    assert rel_err(a.last.feats, b.last.feats) <= 1e-12  # no_grad may pick another SDPA kernel
    assert b.last.feats.requires_grad and not a.last.feats.requires_grad
    assert rel_err(a.last.feats, dense_masked_reference(model, images, visible).last.feats) <= 1e-10
    green.train()
    assert model.training and all(m.training for m in model.modules())
    c, d = green(images, visible), green(images, visible)
    assert not torch.equal(c.last.feats, d.last.feats)  # dropout and drop-path are on


def test_determinism(swins64):
    model, green = swins64["w4"]

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        visible = random_mask(3, green.mask_grid, 0.6, generator=gen)
        images = torch.randn(3, 3, 128, 128, generator=gen, dtype=torch.float64)
        return visible, green(images, visible).last.feats

    (v1, f1), (v2, f2) = run(5), run(5)
    assert torch.equal(v1, v2) and torch.equal(f1, f2)
