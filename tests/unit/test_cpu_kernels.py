"""The native CPU loops of the depthwise gather equal its PyTorch loops, and say why when they cannot run."""

from __future__ import annotations

import pytest
import torch

from greenmim_convert.kernels import cpu_kernels
from greenmim_convert.kernels.depthwise_gather import _taps_backward_torch, _taps_torch


def _tables(num_in: int, num_out: int, taps: int, gen: torch.Generator):
    """Random ``(T_out, K)`` rows into ``num_in`` inputs or ``num_in`` (reads zero), and the inverse direction."""
    rows = torch.randint(0, num_in + 1, (num_out, taps), generator=gen)
    inverse = torch.randint(0, num_out + 1, (num_in, taps), generator=gen)
    return rows, inverse


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chans", [1, 37, 64])
def test_native_loops_equal_torch_loops(dtype, tol, threads, chans):
    assert cpu_kernels.cpu_kernel_problem(dtype) is None
    gen = torch.Generator().manual_seed(chans + threads)
    num_in, num_out, taps = 300, 257, 9
    src = torch.randn(num_in, chans, generator=gen, dtype=dtype)
    grad_src = torch.randn(num_out, chans, generator=gen, dtype=dtype)
    feats = torch.randn(num_in, chans, generator=gen, dtype=dtype)
    weight = torch.randn(taps, chans, generator=gen, dtype=dtype)
    rows, inverse = _tables(num_in, num_out, taps, gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernels.taps(src, rows, weight)
        dx = cpu_kernels.taps(grad_src, inverse, weight)
        fused_dx, dw = cpu_kernels.taps_backward(feats, grad_src, inverse, weight)
        none_dx, dw_only = cpu_kernels.taps_backward(feats, grad_src, inverse, weight, need_x=False)
    finally:
        torch.set_num_threads(previous)
    assert none_dx is None and torch.equal(dw_only, dw)
    want_dx, want_dw = _taps_backward_torch(grad_src, inverse, weight, feats, True, True)
    for got, want in ((out, _taps_torch(src, rows, weight)), (dx, want_dx), (fused_dx, want_dx), (dw, want_dw)):
        assert got.dtype == dtype and got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() <= tol


def test_turned_off_and_unbuildable(monkeypatch, tmp_path):
    monkeypatch.setenv("GREENMIM_CPU_KERNELS", "0")
    assert "GREENMIM_CPU_KERNELS=0" in cpu_kernels.cpu_kernel_problem(torch.float32)
    monkeypatch.delenv("GREENMIM_CPU_KERNELS")
    assert "float32 and float64" in cpu_kernels.cpu_kernel_problem(torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, "_libs", {})
    monkeypatch.setattr(cpu_kernels, "_problems", {})
    monkeypatch.setattr(cpu_kernels, "_warned", set())
    monkeypatch.setenv("GREENMIM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert "false failed" in cpu_kernels.cpu_kernel_problem(torch.float32)
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(10, 5, generator=gen)
    rows, _ = _tables(10, 4, 3, gen)
    weight = torch.randn(3, 5, generator=gen)
    with pytest.warns(RuntimeWarning, match="native CPU depthwise loops unavailable"):
        got = torch.ops.greenmim_kernels.depthwise_taps(src, rows, weight)
    assert torch.allclose(got, _taps_torch(src, rows, weight))
    assert not list(tmp_path.glob("*.so"))


def test_indices_outside_the_source_read_zero():
    """Masked taps carry the index ``len(src)``; any index outside ``[0, len(src))`` reads zero, never memory."""
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(10, 6, generator=gen)
    weight = torch.randn(3, 6, generator=gen)
    rows, _ = _tables(10, 5, 3, gen)
    bad = rows.clone()
    bad[rows == 10] = -1
    bad[0, 0], bad[1, 1] = 10**9, -(10**9)
    want = rows.clone()
    want[0, 0] = want[1, 1] = 10
    assert torch.equal(cpu_kernels.taps(src, bad, weight), cpu_kernels.taps(src, want, weight))
    for a, b in zip(
        cpu_kernels.taps_backward(src[:5], src, bad, weight), cpu_kernels.taps_backward(src[:5], src, want, weight)
    ):
        assert torch.equal(a, b)
