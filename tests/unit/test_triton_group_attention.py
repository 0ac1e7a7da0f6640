"""Fused Triton group attention against the PyTorch reference, and the backend dispatcher.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which Triton fixes when it is
first imported (``TRITON_INTERPRET=1`` must precede ``import triton``). Other test files may import
triton earlier in the same pytest process, so when this process is not in interpreter mode,
``test_kernels_under_interpreter`` reruns this file in one subprocess with ``TRITON_INTERPRET=1``;
the kernel-launching tests (those using the ``interpret`` fixture) are collected only there. Shapes are small: the
interpreter is slow.

Tolerances (relative: max |error| / max |reference|):
- fp32: forward and every gradient (dq, dk, dv, dbias) within 1e-5 of the reference;
- fp16 / bf16: the kernel and the PyTorch path both run on the same rounded inputs and are compared
  with an fp32 reference on those inputs; the kernel must be within 4e-3 (fp16) / 4e-2 (bf16)
  and no worse than 3x the PyTorch low-precision path's own error plus a small slack (the kernel
  rounds probabilities and their gradients to the input type before its tensor-core dots, as GPU
  flash attention does, while PyTorch's CPU path keeps them in fp32).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import types
from typing import List, Sequence, Tuple

import pytest
import torch

pytest.importorskip("triton")

from greenmim_convert.kernels import attention_dispatch as dispatch  # noqa: E402
from greenmim_convert.kernels import triton_group_attention as tga  # noqa: E402
from greenmim_convert.kernels.group_attention import group_attention_reference  # noqa: E402
from greenmim_convert.kernels.triton_group_attention import group_attention_triton  # noqa: E402

INTERPRETER = tga.interpreter_active()
FP32_TOL = 1e-5
LOW_TOL = {torch.float16: 4e-3, torch.bfloat16: 4e-2}
LOW_SLACK = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
SUBPROCESS_TIMEOUT_S = 240


@pytest.fixture
def interpret() -> None:
    """Marks kernel-launching tests: conftest collects them only where Triton runs in interpreter mode."""
    assert INTERPRETER


def test_kernels_under_interpreter() -> None:
    """Run the kernel tests of this file in a process whose Triton starts in interpreter mode."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "not test_kernels_under_interpreter"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, report


def fresh_seed() -> int:
    """A new seed per test run (reported in failure messages to reproduce)."""
    return secrets.randbits(31)


def make_groups(
    windows: Sequence[Sequence[int]], g: int, n: int, gen: torch.Generator, shuffle: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``segment`` and ``position`` (G, g) for groups holding windows of the given token counts.

    Window ids are unique across groups, padding slots get unique negative ids, positions are
    distinct inside a window; ``shuffle`` permutes the slots of each group (windows need not be
    contiguous for the kernel).
    """
    segment = torch.empty(len(windows), g, dtype=torch.long)
    position = torch.empty(len(windows), g, dtype=torch.long)
    next_id, next_pad = 0, -1
    for row, sizes in enumerate(windows):
        assert sum(sizes) <= g and max(sizes) <= n
        seg: List[int] = []
        pos: List[int] = []
        for size in sizes:
            seg += [next_id] * size
            pos += torch.randperm(n, generator=gen)[:size].tolist()
            next_id += 1
        for _ in range(g - len(seg)):
            seg.append(next_pad)
            pos.append(int(torch.randint(0, n, (1,), generator=gen)))
            next_pad -= 1
        order = torch.randperm(g, generator=gen) if shuffle else torch.arange(g)
        segment[row] = torch.tensor(seg)[order]
        position[row] = torch.tensor(pos)[order]
    return segment, position


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_both(
    windows: Sequence[Sequence[int]],
    heads: int,
    g: int,
    d: int,
    n: int,
    with_bias: bool,
    seed: int,
    shuffle: bool = False,
    strided: bool = False,
) -> List[Tuple[str, float]]:
    """Forward + backward of kernel and reference on one random fp32 problem; relative errors."""
    gen = torch.Generator().manual_seed(seed)
    segment, position = make_groups(windows, g, n, gen, shuffle)
    G = len(windows)
    shape = (G, g, 3, heads, d) if strided else (3, G, heads, g, d)
    qkv = torch.randn(*shape, generator=gen).requires_grad_()
    leaves = [qkv]
    bias = torch.randn(heads, n, n, generator=gen).requires_grad_() if with_bias else None
    if bias is not None:
        leaves.append(bias)
    scale = d ** -0.5 * (0.5 + torch.rand((), generator=gen).item())

    def split(t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return t.permute(2, 0, 3, 1, 4).unbind(0) if strided else t.unbind(0)

    grad_out = torch.randn(G, heads, g, d, generator=gen)
    out_t = group_attention_triton(*split(qkv), segment, position if with_bias else None, bias, scale)
    grads_t = torch.autograd.grad(out_t, leaves, grad_out)
    out_r = group_attention_reference(*split(qkv), segment, position, bias, scale)
    grads_r = torch.autograd.grad(out_r, leaves, grad_out)

    errors = [("out", rel_err(out_t, out_r))]
    dq_t, dk_t, dv_t = split(grads_t[0])
    dq_r, dk_r, dv_r = split(grads_r[0])
    errors += [("dq", rel_err(dq_t, dq_r)), ("dk", rel_err(dk_t, dk_r)), ("dv", rel_err(dv_t, dv_r))]
    if bias is not None:
        errors.append(("dbias", rel_err(grads_t[1], grads_r[1])))
    return errors


FP32_CASES = {
    # name: (windows per group, heads, g, d, N, bias, shuffle, strided)
    "padding_g13_d32": ([[5, 6], [13], [1, 7], [3]], 2, 13, 32, 16, True, False, False),
    "single_token_windows_g7_d64": ([[1, 1, 1, 1, 1, 1, 1], [2, 1, 3], [1]], 3, 7, 64, 4, True, False, False),
    "one_window_per_group_g16": ([[16], [16], [11]], 2, 16, 32, 16, True, False, False),
    "no_bias_g13_d64": ([[4, 4, 4], [13], [2]], 2, 13, 64, 16, False, False, False),
    "two_key_tiles_g70_d32": ([[49, 21], [35, 30], [1]], 2, 70, 32, 49, True, False, False),
    "four_key_tiles_g256": ([[49, 49, 49, 49, 40, 3]], 1, 256, 32, 49, True, False, False),
    "shuffled_slots_heavy_bias_reuse": ([[6, 6], [5, 3, 2]], 2, 13, 32, 6, True, True, False),
    "strided_qkv_d16": ([[9, 4], [7]], 3, 13, 16, 9, True, False, True),
    "head_dim_128": ([[8, 8], [12]], 1, 16, 128, 16, True, False, False),
    "head_dim_24_padded": ([[3, 4], [7]], 2, 7, 24, 7, True, False, False),
}


@pytest.mark.parametrize("case", list(FP32_CASES), ids=list(FP32_CASES))
def test_fp32_matches_reference(interpret: None, case: str) -> None:
    """fp32 output and dq, dk, dv, dbias equal the reference within 1e-5 relative."""
    windows, heads, g, d, n, with_bias, shuffle, strided = FP32_CASES[case]
    seed = fresh_seed()
    errors = run_both(windows, heads, g, d, n, with_bias, seed, shuffle, strided)
    bad = [(name, err) for name, err in errors if not err <= FP32_TOL]
    assert not bad, f"seed {seed}: {bad} exceed {FP32_TOL} (all: {errors})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_forward_and_backward(interpret: None, dtype: torch.dtype) -> None:
    """fp16/bf16: fp32 accumulation keeps the kernel near an fp32 reference and PyTorch's own half path."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    heads, g, d, n = 2, 20, 32, 25
    segment, position = make_groups([[9, 8], [20], [1, 5]], g, n, gen)
    q, k, v = torch.randn(3, 3, heads, g, d, generator=gen).to(dtype).unbind(0)
    bias = torch.randn(heads, n, n, generator=gen)
    grad_out = torch.randn(3, heads, g, d, generator=gen).to(dtype)
    scale = d ** -0.5

    def fwd_bwd(fn, qq, kk, vv, bb, go):
        leaves = [t.detach().requires_grad_() for t in (qq, kk, vv, bb)]
        out = fn(*leaves[:3], segment, position, leaves[3], scale)
        return [out] + list(torch.autograd.grad(out, leaves, go))

    exact = fwd_bwd(group_attention_reference, q.float(), k.float(), v.float(), bias, grad_out.float())
    fused = fwd_bwd(group_attention_triton, q, k, v, bias, grad_out)
    torch_low = fwd_bwd(group_attention_reference, q, k, v, bias.to(dtype), grad_out)
    for name, f, t, e in zip(("out", "dq", "dk", "dv", "dbias"), fused, torch_low, exact):
        assert f.dtype == (dtype if name != "dbias" else torch.float32)
        err, err_torch = rel_err(f, e), rel_err(t, e)
        assert err <= LOW_TOL[dtype], f"seed {seed}: {name} error {err:.2e} > {LOW_TOL[dtype]}"
        assert err <= 3 * err_torch + LOW_SLACK[dtype], (
            f"seed {seed}: {name} error {err:.2e} vs PyTorch {dtype} path {err_torch:.2e}")


def test_padding_slot_sees_only_itself(interpret: None) -> None:
    """A padding slot attends only to itself, so its output is its own value row."""
    gen = torch.Generator().manual_seed(fresh_seed())
    segment, position = make_groups([[3, 2], [4]], 7, 5, gen)
    q, k, v = torch.randn(3, 2, 2, 7, 32, generator=gen).unbind(0)
    out = group_attention_triton(q, k, v, segment, position, torch.randn(2, 5, 5, generator=gen), 0.2)
    pad = segment < 0
    assert pad.any()
    torch.testing.assert_close(out.transpose(1, 2)[pad], v.transpose(1, 2)[pad], rtol=1e-6, atol=1e-6)


def test_bias_without_grad_and_inputs_validated(interpret: None) -> None:
    """A bias without grad gets none; malformed inputs raise ValueError before any launch."""
    gen = torch.Generator().manual_seed(fresh_seed())
    segment, position = make_groups([[4, 3]], 7, 4, gen)
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 1, 2, 7, 32, generator=gen).unbind(0))
    bias = torch.randn(2, 4, 4, generator=gen)
    out = group_attention_triton(q, k, v, segment, position, bias, 0.3)
    out.sum().backward()
    assert bias.grad is None and q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="shape"):
        group_attention_triton(q, k[..., :16], v, segment, position, bias, 0.3)
    with pytest.raises(ValueError, match="position"):
        group_attention_triton(q, k, v, segment, None, bias, 0.3)
    with pytest.raises(ValueError, match="bias"):
        group_attention_triton(q, k, v, segment, position, bias[:1], 0.3)
    with pytest.raises(ValueError):
        group_attention_triton(q.double(), k.double(), v.double(), segment, position, bias, 0.3)
    wide = torch.randn(1, 2, 7, 256, generator=gen)
    with pytest.raises(ValueError, match="head dim"):
        group_attention_triton(wide, wide, wide, segment, position, bias, 0.3)


def test_kernel_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors outside interpreter mode raise a clear error instead of a compiler failure."""
    q = torch.randn(1, 1, 4, 16)
    segment = torch.arange(4)[None]
    if not INTERPRETER:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="before triton is first imported"):
            group_attention_triton(q, q, q, segment, None, None, 1.0)
    monkeypatch.setattr(tga, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        group_attention_triton(q, q, q, segment, None, None, 1.0)


# --------------------------------------------------------------------------------------------
# dispatcher


def fake_cuda(dtype: torch.dtype = torch.float32, d: int = 32) -> types.SimpleNamespace:
    """Stand-in for a CUDA q (only device, dtype and shape are read by the backend choice)."""
    shape = torch.Size((2, 3, 16, d))
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=shape, dim=lambda: 4)


def small_problem(seed: int) -> Tuple[torch.Tensor, ...]:
    """q, k, v, segment, position, bias of a two-group fp32 problem."""
    gen = torch.Generator().manual_seed(seed)
    segment, position = make_groups([[3, 4], [5]], 7, 5, gen)
    q, k, v = torch.randn(3, 2, 2, 7, 32, generator=gen).unbind(0)
    return q, k, v, segment, position, torch.randn(2, 5, 5, generator=gen)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Monkeypatch with the backend environment variable unset."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return monkeypatch


def test_auto_choices(no_env: pytest.MonkeyPatch) -> None:
    """auto: Triton only for CUDA tensors it supports, without dropout, when Triton is installed."""
    assert dispatch.triton_available()
    assert dispatch.resolve_backend(torch.randn(1, 1, 4, 32)) == "torch"
    assert dispatch.resolve_backend(fake_cuda()) == "triton"
    assert dispatch.resolve_backend(fake_cuda(torch.bfloat16)) == "triton"
    assert dispatch.resolve_backend(fake_cuda(), dropout_p=0.1) == "torch"
    assert dispatch.resolve_backend(fake_cuda(torch.float64)) == "torch"
    assert dispatch.resolve_backend(fake_cuda(d=256)) == "torch"
    assert dispatch.resolve_backend(fake_cuda(), backend="torch") == "torch"
    no_env.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.resolve_backend(fake_cuda()) == "torch"
    with pytest.raises(RuntimeError, match="not installed"):
        dispatch.resolve_backend(fake_cuda(), backend="triton")


def test_env_overrides_auto_only(no_env: pytest.MonkeyPatch) -> None:
    """The environment variable replaces 'auto' but not an explicit backend, and is validated."""
    no_env.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve_backend(fake_cuda()) == "torch"
    assert dispatch.resolve_backend(fake_cuda(), backend="triton") == "triton"
    no_env.setenv(dispatch.ENV_VAR, "Triton")
    assert dispatch.resolve_backend(fake_cuda(torch.float64)) == "triton"
    assert dispatch.resolve_backend(fake_cuda(), backend="torch") == "torch"
    no_env.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve_backend(fake_cuda()) == "triton"
    no_env.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.resolve_backend(fake_cuda())


def test_forced_triton_errors(no_env: pytest.MonkeyPatch) -> None:
    """Forced Triton never falls back: dropout and CPU-without-interpreter raise."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    with pytest.raises(ValueError, match="backend"):
        dispatch.group_attention(q, k, v, segment, position, bias, 0.2, backend="fast")
    with pytest.raises(ValueError, match="dropout"):
        dispatch.group_attention(q, k, v, segment, position, bias, 0.2, dropout_p=0.1, backend="triton")
    no_env.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="dropout"):
        dispatch.group_attention(q, k, v, segment, position, bias, 0.2, dropout_p=0.1)
    no_env.setattr(tga, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.group_attention(q, k, v, segment, position, bias, 0.2)
    no_env.delenv(dispatch.ENV_VAR)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.group_attention(q, k, v, segment, position, bias, 0.2, backend="triton")


def test_dispatch_on_cpu_defaults_to_reference(no_env: pytest.MonkeyPatch) -> None:
    """CPU tensors take the reference path, bit for bit, without touching the kernel."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    ref = group_attention_reference(q, k, v, segment, position, bias, 0.2)
    no_env.setattr(tga, "group_attention_triton", pytest.fail)
    out = dispatch.group_attention(q, k, v, segment, position, bias, 0.2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    no_env.setenv(dispatch.ENV_VAR, "torch")
    out = dispatch.group_attention(q, k, v, segment, position, bias, 0.2, backend="auto")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dispatch_forced_triton_runs_kernel(interpret: None, no_env: pytest.MonkeyPatch) -> None:
    """Forced Triton (argument or environment) runs the fused kernel and matches the reference."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    ref = group_attention_reference(q, k, v, segment, position, bias, 0.2)
    calls: List[str] = []
    real = tga.group_attention_triton

    def spy(*args):
        calls.append("triton")
        return real(*args)

    no_env.setattr(tga, "group_attention_triton", spy)
    out = dispatch.group_attention(q, k, v, segment, position, bias, 0.2, backend="triton")
    assert calls == ["triton"] and rel_err(out, ref) <= FP32_TOL
    no_env.setenv(dispatch.ENV_VAR, "triton")
    out = dispatch.group_attention(q, k, v, segment, position, bias, 0.2)
    assert calls == ["triton", "triton"] and rel_err(out, ref) <= FP32_TOL


def test_auto_with_dropout_uses_reference(no_env: pytest.MonkeyPatch) -> None:
    """auto with dropout_p > 0 runs the reference, dropout included."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    with torch.random.fork_rng():
        torch.manual_seed(1)
        out = dispatch.group_attention(q, k, v, segment, position, bias, 0.2, dropout_p=0.5)
        torch.manual_seed(1)
        ref = group_attention_reference(q, k, v, segment, position, bias, 0.2, dropout_p=0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, group_attention_reference(q, k, v, segment, position, bias, 0.2))
