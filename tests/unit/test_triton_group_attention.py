"""Fused Triton group attention against the runtime's own PyTorch path, and the backend choice.

The oracle is ``attention.window_attention`` with backend "torch" (what the converted model runs without the
kernel), on a ``Grouping`` of exactly the groups a kernel test describes: ``runtime_path`` places window ``w``
on row ``w`` of a grid whose columns are in-window positions, so the runtime reads the bias table at the same
(query position, key position) pairs as the kernel. Padding slots are not tokens of the runtime (their output is
dropped), so outputs are compared on real slots, with zero output gradient on padding slots.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which Triton fixes when it is
first imported (``TRITON_INTERPRET=1`` must precede ``import triton``). Other test files may import
triton earlier in the same pytest process, so when this process is not in interpreter mode,
``test_kernels_under_interpreter`` reruns this file in one subprocess with ``TRITON_INTERPRET=1``;
the kernel-launching tests (those using the ``interpret`` fixture) are collected only there. Shapes are small: the
interpreter is slow.

Tolerances (relative: max |error| / max |reference|):
- fp32: forward and every gradient (dq, dk, dv, dbias) within 1e-5 of the PyTorch path;
- fp16 / bf16: the kernel and the PyTorch path both run on the same rounded inputs and are compared
  with the fp32 PyTorch path on those inputs; the kernel must be within 4e-3 (fp16) / 4e-2 (bf16)
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
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

pytest.importorskip("triton")

from greenmim_convert.kernels import triton_group_attention as tga  # noqa: E402
from greenmim_convert.kernels.triton_group_attention import group_attention_triton  # noqa: E402
from greenmim_convert.runtime import attention as dispatch  # noqa: E402
from greenmim_convert.runtime.attention import AttentionProgram, Step, window_attention  # noqa: E402
from greenmim_convert.runtime.plan import Bucket, Grouping, Sites  # noqa: E402
from greenmim_convert.runtime.plan.grouping import DigitWindows  # noqa: E402
from greenmim_convert.runtime.plan.terms import TermPlan  # noqa: E402

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
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "not test_kernels_under_interpreter",
    ]
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


def runtime_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: torch.Tensor,
    position: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: float,
    n: int,
    backend: str = "auto",
    dropout: float = 0.0,
) -> torch.Tensor:
    """``window_attention`` of the runtime on the groups of ``segment`` and ``position`` ``(G, g)`` (window ids,
    unique negative ids on padding; in-window positions below ``n``), q, k, v ``(G, heads, g, d)`` per slot: the
    logits ``scale * q kᵀ`` plus ``bias[h, pos_q, pos_k]`` (a term read by in-window positions). Returns
    ``(G, heads, g, d)``, zero on padding slots."""
    groups, heads, g, d = q.shape
    slots = (segment.reshape(-1) >= 0).nonzero().squeeze(1)
    tokens = slots.shape[0]
    windows_count = int(segment.max()) + 1
    pos = position if position is not None else torch.zeros_like(segment)
    coords = torch.stack([segment.reshape(-1)[slots], pos.reshape(-1)[slots]], 1)
    windows = DigitWindows((windows_count, n), (0, 0), (("h", windows_count, 1),), (("w", n, 1),))
    index = torch.zeros(groups * g, dtype=torch.long).index_copy(0, slots, torch.arange(tokens))
    sites = Sites(torch.zeros(tokens, dtype=torch.long), coords, (windows_count, n), 1)
    grouping = Grouping([Bucket(g, groups, index, segment, pos)], slots, tokens, groups * g * g, 0, sites, windows)
    steps = [Step("scalar", torch.ops.aten.mul.Tensor, scale)]
    terms = ()
    if bias is not None:
        steps.append(Step("term", torch.ops.aten.add.Tensor, 0))
        terms = (TermPlan(((0, heads, n * n),), (("w", n, 1, n),), (("w", n, 1, 1),)),)
    post = (Step("dropout", None, dropout),) if dropout else ()
    program = AttentionProgram(heads, (heads,), tuple(steps), post, terms, backend)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3).reshape(groups * g, -1).index_select(0, slots)

    out = window_attention(rows(q), rows(k), rows(v), grouping, program, [bias] if bias is not None else [], [])
    full = out.new_zeros(groups * g, out.shape[1]).index_copy(0, slots, out)
    return full.view(groups, g, heads, -1).permute(0, 2, 1, 3)


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
    """Forward + backward of the kernel and the runtime's PyTorch path on one random fp32 problem; relative errors
    (on real slots: the output gradient is zero on padding slots, whose kernel gradients are then zero too)."""
    gen = torch.Generator().manual_seed(seed)
    segment, position = make_groups(windows, g, n, gen, shuffle)
    G = len(windows)
    shape = (G, g, 3, heads, d) if strided else (3, G, heads, g, d)
    qkv = torch.randn(*shape, generator=gen).requires_grad_()
    leaves = [qkv]
    bias = torch.randn(heads, n, n, generator=gen).requires_grad_() if with_bias else None
    if bias is not None:
        leaves.append(bias)
    scale = d**-0.5 * (0.5 + torch.rand((), generator=gen).item())

    def split(t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return t.permute(2, 0, 3, 1, 4).unbind(0) if strided else t.unbind(0)

    real = (segment >= 0)[:, None, :, None]
    grad_out = torch.randn(G, heads, g, d, generator=gen) * real
    out_t = group_attention_triton(*split(qkv), segment, position if with_bias else None, bias, scale)
    grads_t = torch.autograd.grad(out_t, leaves, grad_out)
    out_r = runtime_path(*split(qkv), segment, position, bias, scale, n, backend="torch")
    grads_r = torch.autograd.grad(out_r, leaves, grad_out)

    errors = [("out", rel_err(out_t * real, out_r))]
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
    """fp32 output and dq, dk, dv, dbias equal the runtime's PyTorch path within 1e-5 relative."""
    windows, heads, g, d, n, with_bias, shuffle, strided = FP32_CASES[case]
    seed = fresh_seed()
    errors = run_both(windows, heads, g, d, n, with_bias, seed, shuffle, strided)
    bad = [(name, err) for name, err in errors if not err <= FP32_TOL]
    assert not bad, f"seed {seed}: {bad} exceed {FP32_TOL} (all: {errors})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_forward_and_backward(interpret: None, dtype: torch.dtype) -> None:
    """fp16/bf16: fp32 accumulation keeps the kernel near the fp32 PyTorch path and the PyTorch path in half."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    heads, g, d, n = 2, 20, 32, 25
    segment, position = make_groups([[9, 8], [20], [1, 5]], g, n, gen)
    q, k, v = torch.randn(3, 3, heads, g, d, generator=gen).to(dtype).unbind(0)
    bias = torch.randn(heads, n, n, generator=gen)
    real = (segment >= 0)[:, None, :, None]
    grad_out = (torch.randn(3, heads, g, d, generator=gen) * real).to(dtype)
    scale = d**-0.5

    def fwd_bwd(fn, qq, kk, vv, bb, go):
        leaves = [t.detach().requires_grad_() for t in (qq, kk, vv, bb)]
        out = fn(*leaves[:3], segment, position, leaves[3], scale)
        return [out * real] + list(torch.autograd.grad(out, leaves, go))

    def torch_path(*args):
        return runtime_path(*args, n=n, backend="torch")

    exact = fwd_bwd(torch_path, q.float(), k.float(), v.float(), bias, grad_out.float())
    fused = fwd_bwd(group_attention_triton, q, k, v, bias, grad_out)
    torch_low = fwd_bwd(torch_path, q, k, v, bias.to(dtype), grad_out)
    for name, f, t, e in zip(("out", "dq", "dk", "dv", "dbias"), fused, torch_low, exact):
        assert f.dtype == (dtype if name != "dbias" else torch.float32)
        err, err_torch = rel_err(f, e), rel_err(t, e)
        assert err <= LOW_TOL[dtype], f"seed {seed}: {name} error {err:.2e} > {LOW_TOL[dtype]}"
        assert err <= 3 * err_torch + LOW_SLACK[dtype], (
            f"seed {seed}: {name} error {err:.2e} vs PyTorch {dtype} path {err_torch:.2e}"
        )


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
# backend choice


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
    """Forced Triton never falls back: an unknown backend, dropout and CPU-without-interpreter raise."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    with pytest.raises(ValueError, match="backend"):
        runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="fast")
    with pytest.raises(RuntimeError, match="dropout"):
        runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="triton", dropout=0.1)
    no_env.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="dropout"):
        runtime_path(q, k, v, segment, position, bias, 0.2, 5, dropout=0.1)
    no_env.setattr(tga, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        runtime_path(q, k, v, segment, position, bias, 0.2, 5)
    no_env.delenv(dispatch.ENV_VAR)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="triton")


def test_auto_on_cpu_runs_the_pytorch_path(no_env: pytest.MonkeyPatch) -> None:
    """CPU tensors take the PyTorch path under "auto" (argument or environment), without touching the kernel."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    ref = runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="torch")
    no_env.setattr(tga, "group_attention_triton", pytest.fail)
    out = runtime_path(q, k, v, segment, position, bias, 0.2, 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    no_env.setenv(dispatch.ENV_VAR, "torch")
    out = runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="auto")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_forced_triton_runs_kernel(interpret: None, no_env: pytest.MonkeyPatch) -> None:
    """Forced Triton (argument or environment) runs the fused kernel inside the runtime, equal to its PyTorch path."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    ref = runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="torch")
    calls: List[str] = []
    real = tga.group_attention_triton

    def spy(*args):
        calls.append("triton")
        return real(*args)

    no_env.setattr(tga, "group_attention_triton", spy)
    out = runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="triton")
    assert calls == ["triton"] and rel_err(out, ref) <= FP32_TOL
    no_env.setenv(dispatch.ENV_VAR, "triton")
    out = runtime_path(q, k, v, segment, position, bias, 0.2, 5)
    assert calls == ["triton", "triton"] and rel_err(out, ref) <= FP32_TOL


def test_auto_with_dropout_runs_the_pytorch_path(no_env: pytest.MonkeyPatch) -> None:
    """ "auto" with attention dropout runs the PyTorch path, dropout included."""
    q, k, v, segment, position, bias = small_problem(fresh_seed())
    with torch.random.fork_rng():
        torch.manual_seed(1)
        out = runtime_path(q, k, v, segment, position, bias, 0.2, 5, dropout=0.5)
        torch.manual_seed(1)
        ref = runtime_path(q, k, v, segment, position, bias, 0.2, 5, backend="torch", dropout=0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, runtime_path(q, k, v, segment, position, bias, 0.2, 5))
