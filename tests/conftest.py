"""Shared fixtures: small Swin configurations, fresh random inputs and masks, comparison helpers."""
from __future__ import annotations

import os

import pytest
import timm
import torch

import greenmim_convert as gmc
from greenmim_convert.masking import random_mask

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, img_size=128)
SWIN_T = "swin_tiny_patch4_window7_224"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Triton kernel tests need a process whose Triton started in interpreter mode.

    Outside it they are deselected (``test_kernels_under_interpreter`` runs them in such a process);
    inside it, the test that spawns that process is deselected instead. Tests marked ``cuda`` are
    collected only where a GPU is present.
    """
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    keep, drop = [], []
    for item in items:
        needs = "interpret" in getattr(item, "fixturenames", ())
        spawner = item.name == "test_kernels_under_interpreter"
        needs_gpu = item.get_closest_marker("cuda") is not None and not torch.cuda.is_available()
        (drop if (needs and not interpreting) or (spawner and interpreting) or needs_gpu else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def make_swin(name: str = SWIN_T, dtype: torch.dtype = torch.float64, **kwargs) -> torch.nn.Module:
    """A timm Swin with random weights (relative-position tables are randomised too)."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 0.5)
    return model.to(dtype).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run, printed on failure by pytest's -l."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture(scope="module")
def tiny_swin64():
    torch.manual_seed(1234)
    model = make_swin(dtype=torch.float64, **TINY_SWIN)
    return model, gmc.convert(model)


def masks_with_unequal_counts(batch: int, grid, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random masks, then one sample fully visible and one with a single visible unit."""
    visible = random_mask(batch, grid, ratio, generator=gen)
    if batch >= 3:
        visible[1] = True
        visible[2] = False
        visible[2].view(-1)[int(torch.randint(0, visible[2].numel(), (1,), generator=gen))] = True
    return visible


def check_against_reference(
    model, green, images, visible, tol: float = 1e-10, grads: bool = True, gen=None, zero_grads=(), rng_seed=None,
    **oracle
):
    """Outputs of every stage, and (optionally) parameter gradients of a random weighted loss, vs the oracle.

    ``zero_grads``: names of parameters whose gradient is analytically zero (e.g. a bias added to every
    logit of a softmax): both gradients must be rounding noise, at most ``tol`` times the largest gradient.
    ``oracle``: keyword arguments of ``dense_masked_reference`` (``stages=``, ``last=``, ``key_mask_for=``)
    for models without timm's ``feature_info``/``forward_features``.
    ``rng_seed`` (training mode): both forwards start from this seed, so that per-sample random draws
    (drop-path) are the same draws; the buffers both forwards update (BatchNorm running statistics) must agree.
    """
    from greenmim_convert.reference import dense_masked_reference

    before = {n: b.clone() for n, b in model.named_buffers()}
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out = green(images, visible)
    updated = {n: b.clone() for n, b in model.named_buffers()}
    for n, b in model.named_buffers():  # new objects, not copy_: autograd may have saved the updated ones
        if not torch.equal(b, before[n]):
            owner, _, leaf = n.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = before[n].clone()
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    ref = dense_masked_reference(model, images, visible, **oracle)
    for n, b in model.named_buffers():
        if b.is_floating_point() and not torch.equal(b, before[n]):
            assert rel_err(updated[n], b) <= tol, n
        else:
            assert torch.equal(updated[n], b), n
    pairs = list(zip(out.stages + [out.last], ref.stages + [ref.last]))
    for got, want in pairs:
        assert torch.equal(got.batch, want.batch) and torch.equal(got.coords, want.coords)
        assert torch.isfinite(got.feats).all()
        if want.feats.numel():
            assert rel_err(got.feats, want.feats) <= tol
    if not grads:
        return out
    weights = [torch.randn(w.feats.shape, generator=gen, dtype=w.feats.dtype) for _, w in pairs]
    result = []
    for res in (out, ref):
        model.zero_grad(set_to_none=True)
        sum((w * t.feats).sum() for w, t in zip(weights, res.stages + [res.last])).backward()
        result.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert result[0].keys() == result[1].keys() and result[0]
    assert set(zero_grads) <= result[1].keys()
    scale = max(float(g.abs().max()) for g in result[1].values())
    for name, g in result[1].items():
        if name in zero_grads:
            assert max(float(result[0][name].abs().max()), float(g.abs().max())) <= tol * scale, name
        else:
            assert rel_err(result[0][name], g) <= tol, name
    return out


def _timm_dense_nchw(model, x: torch.Tensor, grid) -> torch.Tensor:
    """A timm feature map as NCHW: it may be NCHW, NHWC (the model's ``output_fmt``) or (B, N, C) tokens, whose
    ``num_prefix_tokens`` leading tokens (a class token) are no grid position."""
    if x.dim() == 3:
        x = x[:, getattr(model, "num_prefix_tokens", 0):]
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
    return x.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else x


def check_all_visible(model, green, images, tol: float = 1e-10):
    """Every unit visible: each stage == timm's ``forward_intermediates`` and the last == ``forward_features``."""
    with torch.no_grad():
        out = green(images, torch.ones(images.shape[0], *green.mask_grid, dtype=torch.bool))
        _, stages = model.forward_intermediates(images)
        final = _timm_dense_nchw(model, model.forward_features(images), out.last.grid)
    assert len(stages) == len(out.stages)
    for got, want in zip(out.stages + [out.last], list(stages) + [final]):
        dense = got.to_dense()
        assert dense.shape == want.shape
        assert rel_err(dense, want) <= tol
    return out
