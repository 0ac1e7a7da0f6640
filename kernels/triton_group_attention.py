"""Fused Triton group window attention, forward and backward.

Computes, per group, what the runtime's PyTorch path of ``greenmim_convert.runtime.attention.window_attention``
computes for a bucket of a grouping (the tests' oracle; dropout excluded)::

    out[G, h] = softmax(scale * q k^T + bias[h, pos_i, pos_j] + (-inf where seg_i != seg_j)) v

but without materialising the ``(G, heads, g, g)`` bias and mask tensors: each program owns one
``(group, head, tile)`` and gathers the relative-position bias from the ``(heads, N, N)`` table by
the two slots' in-window positions on the fly. Softmax runs online in float32 over key tiles, so
any group size works (slots past ``g`` are masked, ``g`` need not be a power of two).

Backward follows the usual recompute scheme: the forward saves the per-row log-sum-exp; one kernel
walks every key tile over all query tiles (dk, dv and the bias gradient, the latter scattered into
the table with float32 atomic adds), another walks every query tile over all key tiles (dq).

On machines without a GPU the kernels run on CPU tensors in Triton's interpreter, which requires
``TRITON_INTERPRET=1`` before ``triton`` is first imported (see :func:`interpreter_active`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    SEG,
    POS,
    BIAS,
    O,
    LSE,
    stride_qg,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_og,
    stride_oh,
    stride_om,
    stride_od,
    H,
    g,
    d,
    N,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (group * head, query tile): online-softmax attention over all key tiles of the group."""
    pid_gh = tl.program_id(0)
    pid_m = tl.program_id(1)
    grp = (pid_gh // H).to(tl.int64)
    head = pid_gh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < g
    d_ok = offs_d < d

    q = tl.load(
        Q + grp * stride_qg + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    seg_i = tl.load(SEG + grp * g + offs_m, mask=row_ok, other=0)
    if HAS_BIAS:
        pos_i = tl.load(POS + grp * g + offs_m, mask=row_ok, other=0).to(tl.int32)
        bias_row = BIAS + head * N * N + pos_i * N

    # Finite floor for the running max: a key tile whose pairs are all masked then gives p = 0 and
    # alpha = 1 instead of exp(-inf - -inf) = NaN. Rows past g end with l = 0 and are not stored.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, g, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < g
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + grp * stride_kg + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        ).to(DOT_DTYPE)
        v = tl.load(
            V + grp * stride_vg + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        ).to(DOT_DTYPE)
        seg_j = tl.load(SEG + grp * g + offs_n, mask=col_ok, other=0)
        keep = (seg_i[:, None] == seg_j[None, :]) & row_ok[:, None] & col_ok[None, :]

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_BIAS:
            pos_j = tl.load(POS + grp * g + offs_n, mask=col_ok, other=0).to(tl.int32)
            s += tl.load(bias_row[:, None] + pos_j[None, :], mask=keep, other=0.0).to(tl.float32)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(Q.dtype.element_ty).to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + grp * stride_og + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_gh.to(tl.int64) * g + offs_m, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    SEG,
    POS,
    BIAS,
    LSE,
    DELTA,
    DK,
    DV,
    DBIAS,
    stride_qg,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dog,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_gg,
    stride_gh,
    stride_gn,
    stride_gd,
    H,
    g,
    d,
    N,
    scale,
    HAS_BIAS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (group * head, key tile): dk, dv over all query tiles; dbias scattered atomically."""
    pid_gh = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = (pid_gh // H).to(tl.int64)
    head = pid_gh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < g
    d_ok = offs_d < d
    kv_mask = col_ok[:, None] & d_ok[None, :]

    k = tl.load(
        K + grp * stride_kg + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    ).to(DOT_DTYPE)
    v = tl.load(
        V + grp * stride_vg + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    ).to(DOT_DTYPE)
    seg_j = tl.load(SEG + grp * g + offs_n, mask=col_ok, other=0)
    if HAS_BIAS:
        pos_j = tl.load(POS + grp * g + offs_n, mask=col_ok, other=0).to(tl.int32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for start_m in range(0, g, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < g
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(
            Q + grp * stride_qg + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=q_mask,
            other=0.0,
        ).to(DOT_DTYPE)
        do = tl.load(
            DO + grp * stride_dog + head * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
            mask=q_mask,
            other=0.0,
        ).to(DOT_DTYPE)
        seg_i = tl.load(SEG + grp * g + offs_m, mask=row_ok, other=0)
        lse = tl.load(LSE + pid_gh.to(tl.int64) * g + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_gh.to(tl.int64) * g + offs_m, mask=row_ok, other=0.0)
        keep = (seg_i[:, None] == seg_j[None, :]) & row_ok[:, None] & col_ok[None, :]

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_BIAS:
            pos_i = tl.load(POS + grp * g + offs_m, mask=row_ok, other=0).to(tl.int32)
            pair = head * N * N + pos_i[:, None] * N + pos_j[None, :]
            s += tl.load(BIAS + pair, mask=keep, other=0.0).to(tl.float32)
        p = tl.exp(tl.where(keep, s - lse[:, None], float("-inf")))

        dv += tl.dot(tl.trans(p.to(Q.dtype.element_ty).to(DOT_DTYPE)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(DOT_DTYPE)), q, input_precision=PRECISION)
        if NEED_DBIAS:
            tl.atomic_add(DBIAS + pair, ds, mask=keep, sem="relaxed")

    grad_off = grp * stride_gg + head * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    tl.store(DK + grad_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + grad_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    SEG,
    POS,
    BIAS,
    LSE,
    DELTA,
    DQ,
    stride_qg,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dog,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_gg,
    stride_gh,
    stride_gm,
    stride_gd,
    H,
    g,
    d,
    N,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (group * head, query tile): dq over all key tiles."""
    pid_gh = tl.program_id(0)
    pid_m = tl.program_id(1)
    grp = (pid_gh // H).to(tl.int64)
    head = pid_gh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < g
    d_ok = offs_d < d
    q_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(
        Q + grp * stride_qg + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    ).to(DOT_DTYPE)
    do = tl.load(
        DO + grp * stride_dog + head * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=q_mask,
        other=0.0,
    ).to(DOT_DTYPE)
    seg_i = tl.load(SEG + grp * g + offs_m, mask=row_ok, other=0)
    lse = tl.load(LSE + pid_gh.to(tl.int64) * g + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_gh.to(tl.int64) * g + offs_m, mask=row_ok, other=0.0)
    if HAS_BIAS:
        pos_i = tl.load(POS + grp * g + offs_m, mask=row_ok, other=0).to(tl.int32)
        bias_row = BIAS + head * N * N + pos_i * N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, g, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < g
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + grp * stride_kg + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        ).to(DOT_DTYPE)
        v = tl.load(
            V + grp * stride_vg + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        ).to(DOT_DTYPE)
        seg_j = tl.load(SEG + grp * g + offs_n, mask=col_ok, other=0)
        keep = (seg_i[:, None] == seg_j[None, :]) & row_ok[:, None] & col_ok[None, :]

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_BIAS:
            pos_j = tl.load(POS + grp * g + offs_n, mask=col_ok, other=0).to(tl.int32)
            s += tl.load(bias_row[:, None] + pos_j[None, :], mask=keep, other=0.0).to(tl.float32)
        p = tl.exp(tl.where(keep, s - lse[:, None], float("-inf")))

        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(Q.dtype.element_ty).to(DOT_DTYPE), k, input_precision=PRECISION)

    tl.store(
        DQ + grp * stride_gg + head * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


def interpreter_active() -> bool:
    """Whether these kernels run in Triton's CPU interpreter.

    Triton fixes the mode when it is first imported (its own library functions are jitted then),
    so this is true only when ``TRITON_INTERPRET=1`` was set before ``triton`` was imported.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_fwd_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


class _LaunchConfig(NamedTuple):
    """Tile sizes, dot precision and warps of one problem (same for forward and backward)."""

    block: int
    block_d: int
    precision: Optional[str]
    warps_fwd: int
    warps_bwd: int


def _precision(dtype: torch.dtype) -> Optional[str]:
    """fp32 dots are exact ("ieee") unless torch itself allows TF32 matmuls; half types keep the default."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch_config(g: int, d: int, dtype: torch.dtype) -> _LaunchConfig:
    """Tiles of 16..64 slots (tl.dot needs >= 16), head dim padded to a power of two >= 16.

    Chosen from compiled register use (ptxas, sm_80 and sm_90: at most a few bytes spilled), not
    yet from timings: tensor-core dots (half types, TF32) take 64-slot tiles up to d = 64 and 32
    beyond; exact fp32 dots run on FMA units and need 32-slot (d <= 32) or 16-slot tiles. The
    backward kernels hold more live tiles and use 8 warps.
    """
    precision = _precision(dtype)
    if precision == "ieee":
        block = 32 if d <= 32 else 16
    else:
        block = 64 if d <= 64 else 32
    block = min(block, max(16, triton.next_power_of_2(g)))
    return _LaunchConfig(block, max(16, triton.next_power_of_2(d)), precision, 4, 8)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of the kernels' tl.dot: the input type, except bf16 under the CPU interpreter.

    Triton's interpreter keeps bf16 as raw uint16 words and multiplies those bits in tl.dot, so
    there bf16 operands (already rounded to bf16) are widened to fp32 first; the products are the
    same real numbers, only the interpreter's result is then correct.
    """
    if dtype == torch.bfloat16 and interpreter_active():
        return tl.float32
    return _TL_DTYPES[dtype]


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """The four strides of a (G, heads, g, d) tensor."""
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: torch.Tensor,
    position: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> None:
    """Raise ``ValueError`` for inputs outside what the fused kernel handles, ``RuntimeError`` for
    CPU tensors outside the interpreter."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share a (G, heads, g, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == segment.device):
        raise ValueError("q, k, v and segment must be on one device")
    if q.device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "the fused Triton group attention needs GPU tensors; CPU tensors run only in "
            "Triton's interpreter, which needs TRITON_INTERPRET=1 set before triton is first "
            "imported in the process (or use the PyTorch path: attention_backend='torch')"
        )
    G, _, g, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} exceeds the fused kernel's limit {MAX_HEAD_DIM}")
    if segment.shape != (G, g) or segment.dtype.is_floating_point:
        raise ValueError(f"segment must be an integer (G, g) = {(G, g)} tensor, got {tuple(segment.shape)}")
    if bias is not None:
        if bias.dim() != 3 or bias.shape[0] != q.shape[1] or bias.shape[1] != bias.shape[2]:
            raise ValueError(f"bias must be (heads, N, N) with heads={q.shape[1]}, got {tuple(bias.shape)}")
        if position is None or position.shape != (G, g) or position.dtype.is_floating_point:
            raise ValueError("position must be an integer (G, g) tensor when bias is given")
        if bias.device != q.device or position.device != q.device:
            raise ValueError("bias and position must be on q's device")


class _GroupAttention(torch.autograd.Function):
    """Autograd wrapper: fused forward saving the log-sum-exp, fused recompute backward."""

    @staticmethod
    def forward(ctx, q, k, v, segment, position, bias, scale):
        G, H, g, d = q.shape
        cfg = _launch_config(g, d, q.dtype)
        segment = segment.contiguous()
        has_bias = bias is not None
        if has_bias:
            position = position.contiguous()
            bias_c = bias.contiguous()
            n = bias.shape[-1]
        else:
            position, bias_c, n = segment, q, 1
        out = torch.empty((G, H, g, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((G, H, g), dtype=torch.float32, device=q.device)
        if out.numel():
            _fwd_kernel[(G * H, triton.cdiv(g, cfg.block))](
                q,
                k,
                v,
                segment,
                position,
                bias_c,
                out,
                lse,
                *_strides(q),
                *_strides(k),
                *_strides(v),
                *_strides(out),
                H,
                g,
                d,
                n,
                float(scale),
                HAS_BIAS=has_bias,
                PRECISION=cfg.precision,
                DOT_DTYPE=_dot_dtype(q.dtype),
                BLOCK_M=cfg.block,
                BLOCK_N=cfg.block,
                BLOCK_D=cfg.block_d,
                num_warps=cfg.warps_fwd,
            )
        ctx.save_for_backward(q, k, v, segment, position, bias_c, out, lse)
        ctx.cfg = cfg
        ctx.has_bias = has_bias
        ctx.scale = float(scale)
        ctx.n = n
        ctx.bias_dtype = bias.dtype if has_bias else None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, segment, position, bias_c, out, lse = ctx.saved_tensors
        G, H, g, d = q.shape
        cfg = ctx.cfg
        need_dbias = ctx.has_bias and ctx.needs_input_grad[5]
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty((G, H, g, d), dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        dbias = torch.zeros(bias_c.shape, dtype=torch.float32, device=q.device) if need_dbias else dq
        if dq.numel():
            grid = (G * H, triton.cdiv(g, cfg.block))
            common = (
                *_strides(q),
                *_strides(k),
                *_strides(v),
                *_strides(dout),
                *_strides(dq),
                H,
                g,
                d,
                ctx.n,
                ctx.scale,
            )
            tiles = dict(BLOCK_M=cfg.block, BLOCK_N=cfg.block, BLOCK_D=cfg.block_d, num_warps=cfg.warps_bwd)
            _bwd_dkdv_kernel[grid](
                q,
                k,
                v,
                dout,
                segment,
                position,
                bias_c,
                lse,
                delta,
                dk,
                dv,
                dbias,
                *common,
                HAS_BIAS=ctx.has_bias,
                NEED_DBIAS=need_dbias,
                PRECISION=cfg.precision,
                DOT_DTYPE=_dot_dtype(q.dtype),
                **tiles,
            )
            _bwd_dq_kernel[grid](
                q,
                k,
                v,
                dout,
                segment,
                position,
                bias_c,
                lse,
                delta,
                dq,
                *common,
                HAS_BIAS=ctx.has_bias,
                PRECISION=cfg.precision,
                DOT_DTYPE=_dot_dtype(q.dtype),
                **tiles,
            )
        grad_bias = dbias.to(ctx.bias_dtype) if need_dbias else None
        return dq, dk, dv, None, None, grad_bias, None


def group_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: torch.Tensor,
    position: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Fused group window attention: ``softmax(scale * q kᵀ + bias[pos_i, pos_j], -inf across segments) v``.

    ``q, k, v`` are ``(G, heads, g, d)`` in fp32/fp16/bf16 (any strides), ``segment`` and
    ``position`` integer ``(G, g)``, ``bias`` ``(heads, N, N)`` or None. Differentiable in q, k, v
    and bias; all accumulation is float32.
    """
    check_inputs(q, k, v, segment, position, bias)
    return _GroupAttention.apply(q, k, v, segment, position, bias, scale)
