"""Sparse 2-D convolution over packed visible tokens against the dense masked convolution.

The oracle is ``F.conv2d`` on the dense input with masked cells zeroed, read at the output sites: it
shares nothing with the code under test but the ``Sites`` layout. The Triton kernel runs under the
interpreter in one subprocess, since ``TRITON_INTERPRET`` only takes effect when set before Triton is
first imported, which other test modules of the same process may already have done.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from greenmim_convert.kernels.sparse_conv import (
    BackendUnavailableError,
    build_neighbor_map,
    build_tile_plan,
    conv_output_grid,
    select_backend,
    sparse_conv2d,
)
from greenmim_convert.kernels.spconv_backend import spconv_available, spconv_conv2d, torch_weight_to_spconv
from greenmim_convert.runtime.plan.sites import Sites

REPO = Path(__file__).resolve().parents[2]
F64_TOL = 1e-10


def dense_masked_conv(
    feats: torch.Tensor,
    in_sites: Sites,
    out_sites: Sites,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """Oracle: scatter the visible tokens into a zero canvas, ``F.conv2d``, read the output sites."""
    b = in_sites.batch_size
    h, w = in_sites.grid
    canvas = feats.new_zeros(b, h, w, feats.shape[1])
    canvas = canvas.index_put((in_sites.batch, in_sites.coords[:, 0], in_sites.coords[:, 1]), feats)
    x = canvas.permute(0, 3, 1, 2)
    if not isinstance(padding, (int, str)) and len(padding) == 4:  # (top, bottom, left, right): a zero pad first
        x, padding = F.pad(x, (padding[2], padding[3], padding[0], padding[1])), 0
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    assert tuple(out.shape[2:]) == tuple(out_sites.grid)
    return out.permute(0, 2, 3, 1)[out_sites.batch, out_sites.coords[:, 0], out_sites.coords[:, 1]]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (absolute when the reference is all zero)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def outputs_and_grads(fn, feats, weight, bias, cotangent) -> List[torch.Tensor]:
    """The output of ``fn()`` and the gradients of <output, cotangent> w.r.t. feats, weight, bias."""
    out = fn()
    leaves = [t for t in (feats, weight, bias) if t is not None]
    grads = torch.autograd.grad((out * cotangent).sum(), leaves, allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def check_backend(
    backend: str,
    feats,
    in_sites,
    out_sites,
    weight,
    bias,
    stride,
    padding,
    dilation,
    groups,
    tol: float = F64_TOL,
    **extra,
) -> None:
    """One backend vs the oracle: output and all three gradients within ``tol`` relative."""
    cot = torch.randn(out_sites.num_tokens, weight.shape[0], dtype=feats.dtype)
    got = outputs_and_grads(
        lambda: sparse_conv2d(
            feats, in_sites, out_sites, weight, bias, stride, padding, dilation, groups, backend=backend, **extra
        ),
        feats,
        weight,
        bias,
        cot,
    )
    want = outputs_and_grads(
        lambda: dense_masked_conv(feats, in_sites, out_sites, weight, bias, stride, padding, dilation, groups),
        feats,
        weight,
        bias,
        cot,
    )
    for name, g, w in zip(("output", "d feats", "d weight", "d bias"), got, want):
        assert g.shape == w.shape, (backend, name)
        assert rel_err(g, w) <= tol, (backend, name, rel_err(g, w))


def random_params(
    c_in: int, c_out: int, groups: int, k: Tuple[int, int], has_bias: bool, gen: torch.Generator, dtype=torch.float64
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fresh random weight and bias as leaves; ``feats`` is drawn by the caller."""
    weight = torch.randn(c_out, c_in // groups, *k, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(c_out, generator=gen, dtype=dtype).requires_grad_() if has_bias else None
    return weight, bias


@st.composite
def dim_geometry(draw) -> Dict[str, int]:
    """One spatial dimension: mask units, kernel, stride, padding, dilation, input and output sizes."""
    units = draw(st.integers(1, 3))
    k = draw(st.integers(1, 7))
    s = draw(st.integers(1, 4))
    d = draw(st.integers(1, 2))
    p = draw(st.integers(0, d * (k - 1) // 2 + 1))
    n_out = units * draw(st.integers(1, 3))
    lo = max(1, s * (n_out - 1) + d * (k - 1) + 1 - 2 * p)
    hi = s * (n_out - 1) + d * (k - 1) + s - 2 * p
    sizes = [n for n in range(lo, hi + 1) if n % units == 0]
    assume(sizes)
    n_in = draw(st.sampled_from(sizes))
    return dict(units=units, k=k, s=s, d=d, p=p, n_in=n_in, n_out=n_out)


@st.composite
def conv_cases(draw) -> Dict[str, object]:
    """Geometry per dimension, channel/group layout (dense, depthwise, multiplier, grouped), mask, seed."""
    rows, cols = draw(dim_geometry()), draw(dim_geometry())
    mode = draw(st.sampled_from(["dense", "depthwise", "depthwise_multiplier", "grouped"]))
    if mode == "dense":
        groups, c_in, c_out = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif mode == "depthwise":
        groups = c_in = c_out = draw(st.integers(1, 5))
    elif mode == "depthwise_multiplier":
        groups = c_in = draw(st.integers(1, 4))
        c_out = c_in * draw(st.integers(2, 3))
    else:
        groups = draw(st.integers(2, 3))
        c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    return dict(
        rows=rows,
        cols=cols,
        groups=groups,
        c_in=c_in,
        c_out=c_out,
        batch=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        keep=draw(st.floats(0.2, 1.0)),
        tile=draw(st.sampled_from([None, 1, 2, 3, 5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(case=conv_cases())
def test_matches_dense_masked_conv(case):
    """Random geometry, groups and per-sample masks; float64 outputs and gradients within 1e-10."""
    rows, cols = case["rows"], case["cols"]
    gen = torch.Generator().manual_seed(case["seed"])
    visible = torch.rand(case["batch"], rows["units"], cols["units"], generator=gen) < case["keep"]
    in_sites = Sites.from_mask(visible, (rows["n_in"], cols["n_in"]), 1)
    out_sites = Sites.from_mask(visible, (rows["n_out"], cols["n_out"]), 1)
    k, s = (rows["k"], cols["k"]), (rows["s"], cols["s"])
    p, d = (rows["p"], cols["p"]), (rows["d"], cols["d"])
    assert conv_output_grid(in_sites.grid, k, s, p, d) == out_sites.grid
    weight, bias = random_params(case["c_in"], case["c_out"], case["groups"], k, case["bias"], gen)
    feats = torch.randn(in_sites.num_tokens, case["c_in"], generator=gen, dtype=torch.float64).requires_grad_()
    args = (feats, in_sites, out_sites, weight, bias, s, p, d, case["groups"])
    check_backend("torch", *args)
    check_backend("tiles", *args, tile_plan=build_tile_plan(in_sites, out_sites, k, s, p, d, tile=case["tile"]))
    check_backend("auto", *args)
    if case["groups"] == case["c_in"] == case["c_out"]:
        check_backend("gather", *args)


def brute_force_neighbor_map(in_sites: Sites, out_sites: Sites, k, s, p, d) -> torch.Tensor:
    """Python loops over sites and taps, straight from the definition."""
    lookup = {(int(b), int(y), int(x)): i for i, (b, (y, x)) in enumerate(zip(in_sites.batch, in_sites.coords))}
    out = torch.full((k[0] * k[1], out_sites.num_tokens), -1, dtype=torch.long)
    for t, (b, (oy, ox)) in enumerate(zip(out_sites.batch, out_sites.coords)):
        for ky in range(k[0]):
            for kx in range(k[1]):
                cell = (int(b), int(oy) * s[0] - p[0] + ky * d[0], int(ox) * s[1] - p[1] + kx * d[1])
                out[ky * k[1] + kx, t] = lookup.get(cell, -1)
    return out


@pytest.mark.parametrize(
    "k,s,p,d",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((2, 4), (2, 3), (0, 2), (1, 1)),
        ((3, 5), (2, 1), (2, 3), (2, 1)),
        ((7, 7), (4, 4), (3, 3), (1, 1)),
    ],
    ids=["3x3", "2x4-strided", "3x5-dilated", "7x7-s4"],
)
def test_neighbor_map_and_independent_cell_masks(k, s, p, d):
    """Map vs brute force; then the conv with unrelated random cell-level masks on input and output."""
    gen = torch.Generator().manual_seed(1234 + k[0] * 10 + s[1])
    h, w = 13, 11
    ho, wo = conv_output_grid((h, w), k, s, p, d)
    in_sites = Sites.from_mask(torch.rand(2, h, w, generator=gen) < 0.6, (h, w), 1)
    out_sites = Sites.from_mask(torch.rand(2, ho, wo, generator=gen) < 0.5, (ho, wo), 1)
    nmap = build_neighbor_map(in_sites, out_sites, k, s, p, d)
    assert nmap.dtype == torch.long and nmap.shape == (k[0] * k[1], out_sites.num_tokens)
    assert torch.equal(nmap, brute_force_neighbor_map(in_sites, out_sites, k, s, p, d))
    weight, bias = random_params(3, 4, 1, k, True, gen)
    feats = torch.randn(in_sites.num_tokens, 3, generator=gen, dtype=torch.float64).requires_grad_()
    for backend in ("torch", "tiles", "auto"):
        check_backend(backend, feats, in_sites, out_sites, weight, bias, s, p, d, 1)
    dw, db = random_params(3, 3, 3, k, False, gen)
    check_backend("torch", feats, in_sites, out_sites, dw, db, s, p, d, 3)


ALL_VISIBLE_CASES = [
    # c_in, c_out, kernel, stride, padding, dilation, groups, input grid
    (8, 16, 3, 1, 1, 1, 1, (14, 14)),  # submanifold 3x3
    (16, 16, 7, 1, 3, 1, 16, (14, 14)),  # depthwise 7x7 (ConvNeXt-style)
    (16, 16, 3, 1, "same", 1, 16, (9, 12)),
    (4, 6, 4, 1, "same", 1, 1, (9, 10)),  # even kernel: torch pads 1 before, 2 after
    (8, 16, 2, 2, 0, 1, 1, (14, 14)),  # patch-merging conv
    (3, 12, 4, 4, 0, 1, 1, (32, 32)),  # patch embedding on pixels
    (12, 12, 3, 2, 1, 2, 3, (16, 15)),  # grouped, strided, dilated
    (8, 8, 8, 8, 0, 1, 1, (56, 56)),  # spatial-reduction conv of sub-sampled attention
    (8, 16, 3, 1, 1, 1, 8, (7, 7)),  # depthwise with channel multiplier 2
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", ALL_VISIBLE_CASES, ids=lambda c: f"k{c[2]}s{c[3]}p{c[4]}d{c[5]}g{c[6]}")
def test_all_visible_equals_nn_conv2d(case):
    """With every cell visible the sparse conv is ``nn.Conv2d`` up to float32 rounding, gradients too."""
    c_in, c_out, k, s, p, d, g, grid = case
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(c_in, c_out, k, s, p, d, g, bias=True)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, c_in, *grid, requires_grad=True)
    ref = conv(x)
    in_sites = Sites.from_mask(torch.ones(2, 1, 1, dtype=torch.bool), grid, 1)
    out_sites = Sites.from_mask(torch.ones(2, 1, 1, dtype=torch.bool), tuple(ref.shape[2:]), 1)
    feats = x.detach().permute(0, 2, 3, 1).reshape(-1, c_in).requires_grad_()
    cot = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * cot).sum(), [x, conv.weight, conv.bias])
    cot_sparse = cot.permute(0, 2, 3, 1).reshape(-1, c_out)
    for backend in ("torch", "tiles", "auto"):
        out = sparse_conv2d(feats, in_sites, out_sites, conv.weight, conv.bias, s, p, d, g, backend=backend)
        dense_out = out.view(2, *ref.shape[2:], c_out).permute(0, 3, 1, 2)
        torch.testing.assert_close(dense_out, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad((out * cot_sparse).sum(), [feats, conv.weight, conv.bias])
        assert rel_err(grads[0].view(2, *grid, c_in).permute(0, 3, 1, 2), ref_grads[0]) < 1e-5
        assert rel_err(grads[1], ref_grads[1]) < 1e-5
        assert rel_err(grads[2], ref_grads[2]) < 1e-5


@pytest.mark.parametrize("k,s,p", [(4, 4, 0), (7, 4, 3), (16, 16, 0)])
def test_raw_pixel_patch_embedding(k, s, p):
    """Input sites on the pixel grid (32-pixel mask units), output sites on the patch grid."""
    gen = torch.Generator().manual_seed(99 + k)
    visible = torch.rand(3, 2, 2, generator=gen) < 0.5
    visible[:, 0, 1] = True
    pixels = Sites.from_mask(visible, (64, 64), 1)
    out_grid = conv_output_grid((64, 64), k, s, p)
    patches = Sites.from_mask(visible, out_grid, s)
    weight, bias = random_params(3, 8, 1, (k, k), True, gen)
    feats = torch.randn(pixels.num_tokens, 3, generator=gen, dtype=torch.float64).requires_grad_()
    for backend in ("torch", "tiles", "auto"):
        check_backend(backend, feats, pixels, patches, weight, bias, s, p, 1, 1)


def test_geometry_errors():
    """Inconsistent grids, batches, channels, maps and plans are rejected with a clear message."""
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    sites = Sites.from_mask(visible, (8, 8), 1)
    feats = torch.randn(sites.num_tokens, 4)
    weight = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="output grid"):
        sparse_conv2d(feats, sites, Sites.from_mask(visible, (8, 8), 2), weight, stride=2, padding=1)
    with pytest.raises(ValueError, match="batch sizes"):
        build_neighbor_map(sites, Sites.from_mask(visible[:1], (8, 8), 1), 3, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        sparse_conv2d(feats, sites, sites, torch.randn(4, 3, 3, 3), padding=1)
    with pytest.raises(ValueError, match="neighbor_map"):
        sparse_conv2d(
            feats, sites, sites, weight, padding=1, neighbor_map=torch.zeros(4, 3, dtype=torch.long), backend="torch"
        )
    plan = build_tile_plan(sites, sites, 1)
    with pytest.raises(ValueError, match="tile_plan"):
        sparse_conv2d(feats, sites, sites, weight, padding=1, tile_plan=plan, backend="tiles")


def test_backend_selection_and_errors(monkeypatch):
    """auto never silently picks an unavailable kernel; naming one that cannot run raises."""
    visible = torch.rand(2, 2, 2) < 0.7
    visible[:, 0, 0] = True
    sites = Sites.from_mask(visible, (8, 8), 1)
    feats = torch.randn(sites.num_tokens, 6)
    depthwise = torch.randn(6, 1, 3, 3)
    dense = torch.randn(5, 6, 3, 3)
    with pytest.raises(ValueError, match="unknown sparse-conv backend"):
        sparse_conv2d(feats, sites, sites, dense, padding=1, backend="cudnn")
    with pytest.raises(BackendUnavailableError, match="depthwise"):
        sparse_conv2d(feats, sites, sites, dense, padding=1, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="triton"):
        sparse_conv2d(feats, sites, sites, depthwise, padding=1, groups=6, backend="triton")
    with pytest.raises(BackendUnavailableError, match="groups == 1"):
        sparse_conv2d(feats, sites, sites, depthwise, padding=1, groups=6, backend="spconv")
    with pytest.raises(BackendUnavailableError, match="spconv"):
        sparse_conv2d(feats, sites, sites, dense, padding=1, backend="spconv")
    with pytest.raises(BackendUnavailableError, match="depthwise"):
        sparse_conv2d(feats, sites, sites, dense, padding=1, backend="gather")
    assert select_backend(feats, depthwise, 6) == "gather"
    assert select_backend(feats, torch.randn(12, 1, 3, 3), 6) == "torch"  # channel multiplier: not depthwise
    assert select_backend(feats, dense, 1) == "torch"
    blocky = build_tile_plan(sites, sites, 3, 1, 1, 1, tile=4)
    assert blocky.occupancy == 1.0
    assert select_backend(feats, depthwise, 6, tile_plan=blocky) == "gather"  # the native CPU loops win
    monkeypatch.setenv("GREENMIM_CPU_KERNELS", "0")
    assert select_backend(feats, depthwise, 6, tile_plan=blocky) == "tiles"
    scattered_mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    scattered_mask[0, ::4, ::4] = True
    scattered = Sites.from_mask(scattered_mask, (16, 16), 1)
    sparse_plan = build_tile_plan(scattered, scattered, 3, 1, 1, 1)
    assert sparse_plan.occupancy < 0.5
    assert select_backend(feats, depthwise, 6, tile_plan=sparse_plan) == "gather"
    assert select_backend(feats, dense, 1, tile_plan=sparse_plan) == "torch"
    assert select_backend(feats, depthwise, 6, backend="tiles") == "tiles"


def test_spconv_backend_guard():
    """spconv is optional: its absence is reported, not hidden, and its weight layout is KRSC."""
    assert isinstance(spconv_available(), bool)
    w = torch.randn(5, 3, 2, 4)
    krsc = torch_weight_to_spconv(w)
    assert krsc.shape == (5, 2, 4, 3) and torch.equal(krsc[4, 1, 3], w[4, :, 1, 3])
    assert torch.equal(torch_weight_to_spconv(w, "RSCK")[1, 2], w[:, :, 1, 2].t())
    if not spconv_available():
        sites = Sites.from_mask(torch.ones(1, 1, 1, dtype=torch.bool), (4, 4), 1)
        with pytest.raises(BackendUnavailableError):
            spconv_conv2d(torch.randn(16, 3), sites, sites, torch.randn(5, 3, 3, 3), None, 1, 1, 1)


class _FakeSparseTensor:
    """Stand-in for ``spconv.pytorch.SparseConvTensor``: features, (N, 3) int32 indices, grid, batch."""

    def __init__(self, features, indices, spatial_shape, batch_size):
        self.features, self.indices = features, indices
        self.spatial_shape, self.batch_size = list(spatial_shape), batch_size


class _FakeSpconvConv(torch.nn.Module):
    """Dense emulation of spconv's conv modules: KRSC weight; submanifold convs keep the input sites,
    regular ones output every cell whose receptive field holds an input site, in raster order."""

    subm = False

    def __init__(self, c_in, c_out, kernel, stride, padding, dilation, bias):
        super().__init__()
        self.geometry = (tuple(stride), tuple(padding), tuple(dilation))
        self.weight = torch.nn.Parameter(torch.empty(c_out, *kernel, c_in))
        self.bias = torch.nn.Parameter(torch.empty(c_out)) if bias else None

    def forward(self, x):
        """Dense conv on a zero canvas, read at spconv's output sites."""
        stride, padding, dilation = self.geometry
        b, (h, w) = x.batch_size, x.spatial_shape
        idx = x.indices.long()
        canvas = x.features.new_zeros(b, h, w, x.features.shape[1]).index_put(
            (idx[:, 0], idx[:, 1], idx[:, 2]), x.features
        )
        weight = self.weight.permute(0, 3, 1, 2)
        out = F.conv2d(canvas.permute(0, 3, 1, 2), weight, None, stride, padding, dilation).permute(0, 2, 3, 1)
        if self.subm:
            keep = idx
        else:
            occupied = canvas.new_zeros(b, h, w, 1)
            occupied[idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
            ones = torch.ones(1, 1, *weight.shape[2:], dtype=canvas.dtype)
            reach = F.conv2d(occupied.permute(0, 3, 1, 2), ones, None, stride, padding, dilation)[:, 0]
            keep = (reach > 0).nonzero()
        feats = out[keep[:, 0], keep[:, 1], keep[:, 2]]
        if self.bias is not None:
            feats = feats + self.bias
        return _FakeSparseTensor(feats, keep.int(), out.shape[1:3], b)


class _FakeSubM(_FakeSpconvConv):
    subm = True


def _fake_module(cls):
    return lambda c_in, c_out, kernel, stride, padding, dilation, bias: cls(
        c_in, c_out, kernel, stride, padding, dilation, bias
    )


@pytest.mark.parametrize("k,s,p,same_sites", [(3, 1, 1, True), (3, 2, 1, False), (2, 2, 0, False), (3, 1, 0, False)])
def test_spconv_glue_against_a_dense_stand_in(monkeypatch, k, s, p, same_sites):
    """The spconv backend's glue (layout, submanifold choice, output-site lookup, bias fill) against a
    stand-in with spconv's documented semantics; the real library needs CUDA."""
    import types

    from greenmim_convert.kernels import spconv_backend

    fake = types.SimpleNamespace(
        SparseConvTensor=_FakeSparseTensor,
        SubMConv2d=_fake_module(_FakeSubM),
        SparseConv2d=_fake_module(_FakeSpconvConv),
    )
    monkeypatch.setattr(spconv_backend, "_import_spconv", lambda: fake)
    monkeypatch.setattr(spconv_backend, "_MODULES", {})
    gen = torch.Generator().manual_seed(5 + k + s)
    h = w = 12
    ho, wo = conv_output_grid((h, w), k, s, p)
    in_sites = Sites.from_mask(torch.rand(2, h, w, generator=gen) < 0.4, (h, w), 1)
    out_sites = in_sites if same_sites else Sites.from_mask(torch.rand(2, ho, wo, generator=gen) < 0.5, (ho, wo), 1)
    weight, bias = random_params(3, 4, 1, (k, k), True, gen)
    feats = torch.randn(in_sites.num_tokens, 3, generator=gen, dtype=torch.float64).requires_grad_()
    cot = torch.randn(out_sites.num_tokens, 4, generator=gen, dtype=torch.float64)
    got = outputs_and_grads(
        lambda: spconv_conv2d(feats, in_sites, out_sites, weight, bias, s, p, 1), feats, weight, bias, cot
    )
    want = outputs_and_grads(
        lambda: dense_masked_conv(feats, in_sites, out_sites, weight, bias, s, p, 1, 1), feats, weight, bias, cot
    )
    for g, wt in zip(got, want):
        assert rel_err(g, wt) <= F64_TOL
    assert any(key[0] == same_sites for key in spconv_backend._MODULES)


def test_empty_sites():
    """A batch with no visible cell gives empty outputs and zero-size gradients on every path."""
    sites = Sites.from_mask(torch.zeros(2, 2, 2, dtype=torch.bool), (8, 8), 1)
    feats = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    for backend in ("torch", "gather", "tiles", "auto"):
        out = sparse_conv2d(feats, sites, sites, weight, None, 1, 1, 1, 4, backend=backend)
        assert out.shape == (0, 4)
        out.sum().backward()


def _triton_interpreter_checks() -> None:
    """Triton depthwise kernel vs the PyTorch reference, outputs and gradients (run with TRITON_INTERPRET=1)."""
    from greenmim_convert.kernels.triton_depthwise_conv import depthwise_conv_triton

    assert os.environ.get("TRITON_INTERPRET") == "1"
    gen = torch.Generator().manual_seed(2024)
    cases = [
        # dtype, batch, grid, mask grid, channels, kernel, stride, padding, dilation, bias, feats need grad
        (torch.float64, 2, (8, 8), (2, 2), 5, 3, 1, 1, 1, True, True),
        (torch.float64, 2, (8, 8), (2, 2), 5, 3, 2, 1, 1, False, True),
        (torch.float64, 1, (8, 12), (2, 3), 3, 7, 1, 3, 1, True, True),
        (torch.float64, 2, (8, 8), (2, 2), 4, 3, 1, 1, 1, True, False),
        (torch.float32, 2, (8, 8), (2, 2), 6, 5, 1, 4, 2, True, True),
        (torch.float32, 1, (12, 12), (3, 3), 130, 3, 1, 1, 1, True, True),
        (torch.float64, 2, (8, 8), (2, 2), 3, 3, 1, 1, 1, True, True),
    ]
    for n, (dtype, b, grid, units, c, k, s, p, d, has_bias, feat_grad) in enumerate(cases):
        visible = torch.rand(b, *units, generator=gen) < 0.6
        visible[0, 0, 0] = True
        if n == len(cases) - 1:
            visible[:] = False
        in_sites = Sites.from_mask(visible, grid, 1)
        out_sites = Sites.from_mask(visible, conv_output_grid(grid, k, s, p, d), s)
        weight = torch.randn(c, 1, k, k, generator=gen, dtype=dtype).requires_grad_()
        bias = torch.randn(c, generator=gen, dtype=dtype).requires_grad_() if has_bias else None
        feats = torch.randn(in_sites.num_tokens, c, generator=gen, dtype=dtype).requires_grad_(feat_grad)
        cot = torch.randn(out_sites.num_tokens, c, generator=gen, dtype=dtype)
        leaves = [t for t in (feats, weight, bias) if t is not None and t.requires_grad]
        results = []
        for backend in ("triton", "torch"):
            out = sparse_conv2d(feats, in_sites, out_sites, weight, bias, s, p, d, c, backend=backend)
            grads = torch.autograd.grad((out * cot).sum(), leaves, allow_unused=True)
            results.append(
                [out.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
            )
        tol = F64_TOL if dtype == torch.float64 else 1e-5
        for got, want in zip(*results):
            assert got.dtype == want.dtype and got.shape == want.shape, (n, got.shape, want.shape)
            assert rel_err(got, want) <= tol, (n, rel_err(got, want))
        nmap = build_neighbor_map(in_sites, out_sites, k, s, p, d)
        direct = depthwise_conv_triton(feats.detach(), nmap, weight.detach(), None if bias is None else bias.detach())
        assert rel_err(direct, results[1][0]) <= tol
    cpu_feats = torch.randn(4, 6)
    assert select_backend(cpu_feats, torch.randn(6, 1, 3, 3), 6, backend="triton") == "triton"
    assert select_backend(cpu_feats, torch.randn(6, 1, 3, 3), 6) != "triton"
    print(f"checked {len(cases)} triton depthwise cases")


def test_triton_depthwise_matches_reference_under_interpreter():
    """Runs :func:`_triton_interpreter_checks` in a fresh interpreter with ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r})['_triton_interpreter_checks']()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked 7 triton depthwise cases" in proc.stdout


def test_benchmark_smoke(capsys):
    """The benchmark's --small mode runs and prints its ratios."""
    spec = importlib.util.spec_from_file_location("bench_sparse_conv", REPO / "benchmarks" / "bench_sparse_conv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--small"])
    out = capsys.readouterr().out
    assert "sparse/dense time ratio" in out and "neighbour map" in out


@pytest.mark.parametrize(
    "k,s,p,g",
    [((3, 3), (2, 2), (0, 1, 0, 1), 4), ((3, 3), (1, 1), (1, 1, 1, 1), 1), ((4, 2), (2, 1), (1, 2, 0, 1), 1)],
    ids=["tf-same-s2-depthwise", "symmetric", "uneven"],
)
def test_four_sided_padding(k, s, p, g):
    """(top, bottom, left, right) padding, as a zero pad before the conv (TensorFlow SAME): every backend vs the
    oracle."""
    gen = torch.Generator().manual_seed(99 + k[0] + p[1])
    h, w = 12, 10
    ho, wo = conv_output_grid((h, w), k, s, p)
    assert (ho, wo) == tuple((n + a + b - kk) // ss + 1 for n, a, b, kk, ss in zip((h, w), p[::2], p[1::2], k, s))
    in_sites = Sites.from_mask(torch.rand(2, h, w, generator=gen) < 0.6, (h, w), 1)
    out_sites = Sites.from_mask(torch.rand(2, ho, wo, generator=gen) < 0.6, (ho, wo), 1)
    weight, bias = random_params(4, 4, g, k, True, gen)
    feats = torch.randn(in_sites.num_tokens, 4, generator=gen, dtype=torch.float64).requires_grad_()
    for backend in ("torch", "tiles", "auto") + (("gather",) if g == 4 else ()):
        check_backend(backend, feats, in_sites, out_sites, weight, bias, s, p, (1, 1), g)


def saved_float_bytes(fn) -> int:
    """Bytes of floating-point tensors that ``fn()``'s autograd graph keeps for backward, once per storage."""
    seen = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("backend", ["gather", "tiles"])
def test_lean_backends_keep_only_their_input(backend):
    """The gather and tiles paths keep the packed input (and the weight) for backward, not a gathered copy
    per tap or per patch as the plain-autograd reference does, and their gradients still match the oracle."""
    gen = torch.Generator().manual_seed(5)
    visible = torch.rand(2, 4, 4, generator=gen) < 0.5
    visible[:, 0, 0] = True
    sites = Sites.from_mask(visible, (16, 16), 1)
    weight, bias = random_params(8, 8, 8, (7, 7), True, gen)
    feats = torch.randn(sites.num_tokens, 8, generator=gen, dtype=torch.float64).requires_grad_()
    run = lambda name: sparse_conv2d(feats, sites, sites, weight, bias, 1, 3, 1, 8, backend=name)  # noqa: E731
    lean = saved_float_bytes(lambda: run(backend))
    assert lean == feats.nbytes + weight.nbytes
    assert saved_float_bytes(lambda: run("torch")) >= 49 * feats.nbytes
    check_backend(backend, feats, sites, sites, weight, bias, 1, 3, 1, 8)


@pytest.mark.parametrize("backend", ["torch", "tiles", "gather"])
def test_weight_gradient_has_the_parameter_strides(backend):
    """DDP compares every stride of a gradient with its bucket's (size-one axes included): a depthwise weight's
    gradient keeps the ``(k*k, k*k, k, 1)`` strides of its ``(C, 1, k, k)`` parameter on every backend."""
    gen = torch.Generator().manual_seed(5)
    visible = torch.rand(2, 2, 2, generator=gen) < 0.6
    visible[:, 0, 0] = True
    sites = Sites.from_mask(visible, (8, 8), 1)
    weight = torch.randn(6, 1, 3, 3, generator=gen, requires_grad=True)
    feats = torch.randn(sites.num_tokens, 6, generator=gen)
    extra = {"tile_plan": build_tile_plan(sites, sites, 3, 1, 1)} if backend == "tiles" else {}
    out = sparse_conv2d(feats, sites, sites, weight, padding=1, groups=6, backend=backend, **extra)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    assert weight.grad.stride() == weight.stride()
