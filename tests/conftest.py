"""Shared fixtures: small Swin configurations, fresh random inputs and masks, comparison helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import timm
import torch

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, img_size=128)
SWIN_T = "swin_tiny_patch4_window7_224"

# two threads, or the cores shared out among pytest-xdist's workers (make test-fast runs two)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


TIERS = ("unit", "equivalence", "tools")  # the folder of a test is its marker: pytest -m unit


def pytest_collection_modifyitems(config, items):
    """Triton kernel tests need a process whose Triton started in interpreter mode.

    Outside it they are deselected (``test_kernels_under_interpreter`` runs them in such a process);
    inside it, the test that spawns that process is deselected instead. Tests marked ``cuda`` are
    collected only where a GPU is present.
    """
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    keep, drop = [], []
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(tier)
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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models: a second one gains nothing, and on a busy machine a
    two-thread pool waits for its descheduled thread at every op (minutes instead of seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    model,
    green,
    images,
    visible,
    tol: float = 1e-10,
    grads: bool = True,
    gen=None,
    zero_grads=(),
    rng_seed=None,
    grad_floor: float = 0.0,
    **oracle,
):
    """Outputs of every stage, and (optionally) parameter gradients of a random weighted loss, vs the oracle.

    ``zero_grads``: names of parameters whose gradient is analytically zero (e.g. a bias added to every
    logit of a softmax): both gradients must be rounding noise, at most ``tol`` times the largest gradient;
    ``grad_floor``: as ``assert_same_grads``'s ``floor``. ``oracle``: keyword arguments of
    ``dense_masked_reference`` (``stages=``, ``last=``, ``key_mask_for=``) for models without timm's
    ``feature_info``/``forward_features``.
    ``rng_seed`` (training mode): both forwards start from this seed, so that per-sample random draws
    (drop-path) are the same draws; the buffers both forwards update (BatchNorm running statistics) must agree.
    """
    from greenmim_convert.oracle.reference import dense_masked_reference

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
    assert len(out.stages) == len(ref.stages)
    for i, (got, want) in enumerate(zip(out.stages + [out.last], ref.stages + [ref.last])):
        assert got.grid == want.grid, i
        assert torch.equal(got.batch, want.batch) and torch.equal(got.coords, want.coords), i
        assert torch.isfinite(got.feats).all(), i
        if want.feats.numel():
            assert rel_err(got.feats, want.feats) <= tol, i
    if not grads:
        return out
    (_, got), (_, want) = weighted_loss_grads(model, [lambda: _feats(out), lambda: _feats(ref)], gen)
    assert_same_grads(got, want, tol, zero_grads=zero_grads, floor=grad_floor)
    return out


def _feats(out) -> List[torch.Tensor]:
    """The features of every stage and the final ones, as ``dense_masked_reference`` orders them."""
    return [t.feats for t in out.stages + [out.last]]


Grads = Dict[str, torch.Tensor]


def weighted_loss_grads(
    model: torch.nn.Module, runs: Sequence[Callable[[], List[torch.Tensor]]], gen: Optional[torch.Generator] = None
) -> List[Tuple[List[torch.Tensor], Grads]]:
    """For each run (a function giving output tensors of ``model``): its outputs, detached, and the parameter
    gradients of ``sum(w * output)``, one set of random weights ``w`` for all runs (drawn for the first run's
    output shapes): one random direction in which the runs' gradients are compared."""
    results, weights = [], None
    for run in runs:
        model.zero_grad(set_to_none=True)
        feats = run()
        if weights is None:
            weights = [torch.randn(f.shape, generator=gen, dtype=f.dtype) for f in feats]
        assert [f.shape for f in feats] == [w.shape for w in weights]
        sum((w * f).sum() for w, f in zip(weights, feats)).backward()
        results.append(
            (
                [f.detach() for f in feats],
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    return results


def assert_same_grads(got: Grads, want: Grads, tol: float, zero_grads: Sequence[str] = (), floor: float = 0.0) -> None:
    """The same parameters have gradients, each within ``tol`` of ``want``'s, relative to its own size or to
    ``floor`` times the largest gradient, whichever is larger (a gradient that is rounding noise, analytically
    zero, or formed by cancellation carries rounding of that size).

    ``zero_grads``: parameters whose gradient is analytically zero (a bias added to every logit of a softmax):
    both must be rounding noise, at most ``tol`` times the largest gradient.
    """
    assert got.keys() == want.keys() and want
    assert set(zero_grads) <= want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    for name, g in want.items():
        if name in zero_grads:
            assert max(float(got[name].abs().max()), float(g.abs().max())) <= tol * scale, name
        else:
            size = max(float(g.abs().max()), floor * scale)
            assert float((got[name] - g).abs().max()) <= tol * size, name


def _timm_dense_nchw(model, x: torch.Tensor, grid) -> torch.Tensor:
    """A timm feature map as NCHW: it may be NCHW, NHWC (the model's ``output_fmt``) or (B, N, C) tokens, whose
    ``num_prefix_tokens`` leading tokens (a class token) are no grid position."""
    if x.dim() == 3:
        x = x[:, getattr(model, "num_prefix_tokens", 0) :]
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
