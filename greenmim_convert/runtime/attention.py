"""Runtime of compiled attention regions: logits of packed groups, their terms, softmax, ``@ v``.

An ``AttentionProgram`` is what the attention pass read from the graph between ``q @ kᵀ`` and
``@ v``: elementwise steps with scalars or image-independent *terms* (each read per (head, query,
key) through a ``TermPlan``), the softmax over keys, then dropout. ``window_attention`` runs it on
the padded groups of a ``Grouping`` (keys of other windows and padding slots get ``-inf``);
``sample_attention`` runs it per sample with keys possibly on another grid; ``cross_window_attention``
runs it in windows whose queries were pooled to a coarser grid than their keys.

Window attention runs on the PyTorch path here or in the fused Triton kernel (``kernels/triton_group_attention.py``).

Rules (``backend`` argument, or the ``GREENMIM_ATTENTION_BACKEND`` environment variable, which
replaces ``"auto"`` when set; both take ``"auto" | "torch" | "triton"``):

- ``"torch"``: always the PyTorch path (any device, supports dropout).
- ``"triton"``: always the fused kernel. Raises instead of falling back when it cannot run: Triton
  missing, ``dropout_p > 0`` (the kernel has no dropout), or CPU tensors outside Triton's CPU
  interpreter (``TRITON_INTERPRET=1`` set before triton is imported; slow, meant for tests).
- ``"auto"``: the fused kernel for CUDA tensors when Triton is installed, ``dropout_p == 0`` and
  the dtype/head dim are supported; the PyTorch path otherwise (so attention dropout during training
  takes the PyTorch path, the only one implementing it).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.plan.terms import TermPlan, head_offsets, head_offsets_cpu, term_offsets

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "GREENMIM_ATTENTION_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (the fused kernel's only extra dependency)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreter_active() -> bool:
    """Whether the fused kernels run in Triton's CPU interpreter in this process."""
    from greenmim_convert.kernels.triton_group_attention import interpreter_active

    return interpreter_active()


def _check_backend(name: str, source: str) -> str:
    """Validate a backend name coming from ``source`` (argument or environment variable)."""
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return value


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for: ``backend``, or the environment variable when ``backend`` is "auto"."""
    backend = _check_backend(backend, "backend")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            backend = _check_backend(env, ENV_VAR)
    return backend


def resolve_backend(q: torch.Tensor, dropout_p: float = 0.0, backend: str = "auto") -> str:
    """The implementation window attention runs for ``q`` ``(G, heads, g, d)``: "torch" or "triton" (see module doc).

    Raises ``RuntimeError``/``ValueError`` when "triton" is forced but cannot run.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if q.device.type != "cuda" or dropout_p > 0.0 or not triton_available():
            return "torch"
        from greenmim_convert.kernels.triton_group_attention import MAX_HEAD_DIM, SUPPORTED_DTYPES

        fits = q.dtype in SUPPORTED_DTYPES and q.dim() == 4 and q.shape[-1] <= MAX_HEAD_DIM
        return "triton" if fits else "torch"
    if dropout_p > 0.0:
        raise ValueError(
            f"the Triton group attention has no dropout (dropout_p={dropout_p}); use "
            f"backend='torch' or 'auto' (which takes the PyTorch path when dropout_p > 0)"
        )
    if not triton_available():
        raise RuntimeError(
            "backend 'triton' requested but Triton is not installed (pip install 'greenmim-convert[triton]')"
        )
    if q.device.type == "cpu" and not _interpreter_active():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (tests only, it is slow), move the tensors to a "
            "GPU, or use backend='torch'"
        )
    return "triton"


@dataclass(frozen=True)
class Step:
    """One op on the logits: ``kind`` is scalar, scalar-tensor, term, qterm (a query term), unary, dropout or cast."""

    kind: str
    op: Any
    value: Any
    swap: bool = False  # the logits are the second operand (``bias - logits``)
    tensor: Any = None  # the graph node of a one-element tensor operand (at compile time only)
    block: bool = False  # acts on the grid part of the logits only: queries and keys past their prefix tokens

    def __reduce__(self):
        return (Step, (self.kind, self.op, self.value, self.swap, None, self.block))


@dataclass(frozen=True)
class AttentionProgram:
    """Everything between ``q @ kᵀ`` and ``@ v``, and the number of heads."""

    heads: int
    head_sizes: Tuple[int, ...]
    steps: Tuple[Step, ...]
    post: Tuple[Step, ...]
    terms: Tuple[TermPlan, ...]
    backend: str = "auto"
    qterms: Tuple[
        TermPlan, ...
    ] = ()  # query terms: packed per-query columns read per (head, key), see sample_attention


def _apply(step: Step, x: torch.Tensor, other: Any) -> torch.Tensor:
    return step.op(other, x) if step.swap else step.op(x, other)


def _run_steps(
    logits: torch.Tensor,
    steps: Sequence[Step],
    term_values: List[torch.Tensor],
    scalars: List[torch.Tensor],
    query_values: Sequence[torch.Tensor] = (),
    prefix: Tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Apply the program's steps to the logits, in graph order; a ``block`` step acts on the logits of grid
    queries and grid keys, past the ``prefix`` (query, key) tokens."""
    for step in steps:
        if step.block and any(prefix):
            pq, pk = prefix
            grid = _run_steps(logits[..., pq:, pk:], [replace(step, block=False)], term_values, scalars, query_values)
            logits = torch.cat([logits[..., :pq, :], torch.cat([logits[..., pq:, :pk], grid], -1)], -2)
        elif step.kind == "qterm":
            logits = _apply(step, logits, query_values[step.value])
        elif step.kind == "scalar":
            logits = _apply(step, logits, step.value)
        elif step.kind == "scalar-tensor":
            logits = _apply(step, logits, scalars[step.value].reshape(()))
        elif step.kind == "term":
            logits = _apply(step, logits, term_values[step.value])
        elif step.kind == "unary":
            logits = step.op(logits, *step.value)
        elif step.kind == "cast" and step.value is not None:
            logits = logits.to(step.value)
    return logits


def _run_post(probs: torch.Tensor, post: Sequence[Step], training_dropout: bool = True) -> torch.Tensor:
    for step in post:
        if step.kind == "dropout" and step.value:
            probs = F.dropout(probs, step.value, training=True)
        elif step.kind == "cast" and step.value is not None:
            probs = probs.to(step.value)
    return probs


def _folded(program: AttentionProgram) -> Optional[Tuple[float, int]]:
    """``(scale, term)`` when the logits are ``scale * q kᵀ + term``: one gather and one ``baddbmm``."""
    steps = program.steps
    if not steps or steps[-1].kind != "term" or steps[-1].op is not torch.ops.aten.add.Tensor or steps[-1].swap:
        return None
    scale = 1.0
    for step in steps[:-1]:
        if step.kind != "scalar" or step.op is not torch.ops.aten.mul.Tensor:
            return None
        scale *= float(step.value)
    return scale, steps[-1].value


def fusable(program: AttentionProgram, windows) -> Optional[Tuple[float, Optional[int]]]:
    """``(scale, term)`` when the fused kernel computes this program: dot-product logits, at most one
    additive term read by in-window positions only, no dropout."""
    if any(s.kind == "dropout" and s.value for s in program.post):
        return None
    if not program.steps:
        return 1.0, None
    if all(s.kind == "scalar" and s.op is torch.ops.aten.mul.Tensor for s in program.steps):
        scale = 1.0
        for s in program.steps:
            scale *= float(s.value)
        return scale, None
    folded = _folded(program)
    if folded is None:
        return None
    plan = program.terms[folded[1]]
    token = {(k, n, i) for k, n, i in windows.token}
    if any((k, n, i) not in token for k, n, i, _ in plan.query + plan.key):
        return None
    return folded


def window_bias(term: torch.Tensor, plan: TermPlan, head_sizes: Sequence[int], windows) -> torch.Tensor:
    """``(heads, N, N)`` term of one window, indexed by in-window positions (for the fused kernel)."""
    area = windows.area
    pos = torch.arange(area, device=term.device)
    digits = {}
    rest = pos
    for kind, size, inner in reversed(windows.token):
        digits[(kind, size, inner)] = rest % size
        rest = torch.div(rest, size, rounding_mode="floor")
    q = sum((digits[(k, n, i)] * st for k, n, i, st in plan.query), torch.zeros_like(pos))
    k = sum((digits[(kk, n, i)] * st for kk, n, i, st in plan.key), torch.zeros_like(pos))
    heads = 1
    for h in head_sizes:
        heads *= h
    hoff = head_offsets(plan, heads, head_sizes, term.device)
    index = hoff[:, None, None] + q[None, :, None] + k[None, None, :]
    return term.reshape(-1)[index.reshape(-1)].view(heads, area, area)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grouping,
    program: AttentionProgram,
    terms: Sequence[torch.Tensor],
    scalars: Sequence[torch.Tensor],
    qterms: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Attention of packed tokens inside their windows, bucket by bucket; returns ``(T, heads * dv)``. ``qterms``
    are query terms (packed per query, read per (head, key) as in ``sample_attention``)."""
    heads = program.heads
    t = q.shape[0]
    dq, dv = q.shape[1] // heads, v.shape[1] // heads
    fused = _fused_call(q, program, grouping, terms)
    if not grouping.buckets:
        return v.new_zeros(0, heads * dv)
    rows = grouping.slot_rows(heads, 1)
    sizes = [heads * b.num_slots for b in grouping.buckets]
    qb = rows.split(q.reshape(t * heads, dq), sizes)
    kb = rows.split(k.reshape(t * heads, dq), sizes)
    vb = rows.split(v.reshape(t * heads, dv), sizes)
    folded = _folded(program) if fused is None else None
    tables = [head_table(x, plan, program.head_sizes) for x, plan in zip(terms, program.terms)]
    if folded is not None:
        table = tables[folded[1]]
        table = torch.cat([table, table.new_full((heads, 1), float("-inf"))], 1)
    outs = []
    for i, b in enumerate(grouping.buckets):
        g, n = b.group_size, b.num_groups
        qi, ki, vi = qb[i].view(heads * n, g, dq), kb[i].view(heads * n, g, dq), vb[i].view(heads * n, g, dv)
        if fused is not None:
            q4, k4, v4 = (x.view(heads, n, g, -1).transpose(0, 1) for x in (qi, ki, vi))
            out = fused(q4, k4, v4, b.segment, b.position)
            outs.append(out.transpose(0, 1).reshape(heads * n * g, dv))
            continue
        if folded is not None:
            plan = program.terms[folded[1]]
            bias = table.index_select(1, grouping.term_index(i, plan, program.head_sizes, masked=table.shape[1] - 1))
            logits = torch.baddbmm(bias.view(heads * n, g, g), qi, ki.transpose(1, 2), alpha=folded[0])
        else:
            logits = torch.bmm(qi, ki.transpose(1, 2))
            values = [
                _per_head(tab[:, 0], n)
                if not (plan.query or plan.key)
                else tab.index_select(1, grouping.term_index(i, plan, program.head_sizes)).view(heads * n, g, g)
                for tab, plan in zip(tables, program.terms)
            ]
            query_values = [
                _window_query_term(x, plan, program.head_sizes, grouping, i) for x, plan in zip(qterms, program.qterms)
            ]
            logits = _run_steps(logits, program.steps, values, list(scalars), query_values)
            low = torch.finfo(logits.dtype).min
            logits = logits.view(heads, n, g, g).masked_fill(grouping.cross_mask(i)[None], low).view(heads * n, g, g)
        probs = _run_post(logits.softmax(dim=-1), program.post)
        outs.append(torch.bmm(probs, vi).view(heads * n * g, dv))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return grouping.slot_rows(heads, 1).t()(out).view(t, heads * dv)


def _window_query_term(
    x: torch.Tensor, plan: TermPlan, head_sizes: Sequence[int], grouping, bucket: int
) -> torch.Tensor:
    """``(heads * G, g, g)`` values of a query term in one bucket: each query slot's packed row read at the
    (head, key slot) column offsets (pairs across windows or with padding slots are masked afterwards)."""
    b = grouping.buckets[bucket]
    g, n = b.group_size, b.num_groups
    coords = grouping.sites.coords.index_select(0, b.index)
    h, _, k = term_offsets(plan, head_sizes, coords, grouping.windows.grid, grouping.windows.offset)
    heads, cols = h.shape[0], x.shape[1]
    rows = x.index_select(0, b.index).view(1, n, g, cols).expand(heads, n, g, cols)
    index = (h[:, None, None, None] + k.view(1, n, 1, g)).expand(heads, n, g, g)
    return torch.gather(rows, 3, index).reshape(heads * n, g, g)


def _per_head(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """A term that varies by head only (a logit scale): ``(heads * G, 1, 1)``, broadcast over the pairs."""
    return per_head[:, None].expand(per_head.shape[0], groups).reshape(-1, 1, 1)


def head_table(term: torch.Tensor, plan: TermPlan, head_sizes: Sequence[int]) -> torch.Tensor:
    """``(heads, span)``: row ``h`` holds the term's elements from head ``h``'s offset on, so that one gather
    of ``(G * g * g,)`` pair offsets reads every head (the saved index is ``heads`` times smaller)."""
    heads = math.prod(head_sizes)
    span = 1 + sum((size - 1) * stride for _, size, _, stride in plan.query + plan.key)
    if term.numel() == heads * span and _heads_stacked(plan, heads, tuple(head_sizes), span):
        return term.reshape(heads, span)  # heads one after the other, each span long: a view
    rows = head_offsets(plan, heads, head_sizes, term.device)[:, None] + torch.arange(span, device=term.device)
    return term.reshape(-1)[rows]


@functools.lru_cache(maxsize=None)
def _heads_stacked(plan: TermPlan, heads: int, head_sizes: Tuple[int, ...], span: int) -> bool:
    return torch.equal(head_offsets_cpu(plan, heads, head_sizes), torch.arange(heads) * span)


def _fused_call(q: torch.Tensor, program: AttentionProgram, grouping, terms: Sequence[torch.Tensor]):
    """The fused Triton kernel for this program when the backend resolves to it, else None."""
    choice = requested_backend(program.backend)
    if choice == "torch":
        return None
    plan = fusable(program, grouping.windows)
    if plan is None:
        if choice == "triton":
            raise RuntimeError(
                "attention_backend='triton': the fused kernel computes softmax(scale * q kᵀ + bias) v "
                "without dropout; this attention does more (use 'auto' or 'torch')"
            )
        return None
    heads = program.heads
    probe = q.new_empty(0, heads, 0, q.shape[1] // heads)
    if resolve_backend(probe, 0.0, program.backend) != "triton":
        return None
    from greenmim_convert.kernels.triton_group_attention import group_attention_triton

    scale, term = plan
    bias = None if term is None else window_bias(terms[term], program.terms[term], program.head_sizes, grouping.windows)
    if bias is None:
        area = grouping.windows.area
        bias = q.new_zeros(heads, area, area)
    return lambda q4, k4, v4, seg, pos: group_attention_triton(q4, k4, v4, seg, pos, bias.to(q4.dtype), scale)


def sample_attention(
    q: torch.Tensor,
    q_sites: Sites,
    k: torch.Tensor,
    k_sites: Sites,
    v: torch.Tensor,
    program: AttentionProgram,
    terms: Sequence[torch.Tensor],
    scalars: Sequence[torch.Tensor],
    rolls: Tuple[Tuple[int, int], Tuple[int, int]] = ((0, 0), (0, 0)),
    qterms: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Every visible query of a sample attends to the visible keys of that sample (padded per sample);
    ``rolls`` are the query and key layouts' rolls, which the terms' digits are read after. ``qterms`` are
    query terms: ``(Tq, columns)`` packed per query, element (head, key) at the offsets ``program.qterms`` give."""
    if requested_backend(program.backend) == "triton":
        raise RuntimeError(
            "attention_backend='triton': the fused kernel runs window attention; per-sample attention "
            "(keys of a whole sample or a reduced grid) runs on the PyTorch path (use 'auto' or 'torch')"
        )
    prefix = (getattr(q_sites, "prefix", 0), getattr(k_sites, "prefix", 0))
    if any(prefix):
        return _prefixed_sample_attention(q, q_sites, k, k_sites, v, program, terms, scalars, rolls, qterms, prefix)
    qp, _ = q_sites.pad(q)
    kp, kvalid = k_sites.pad(k)
    vp, _ = k_sites.pad(v)
    shape = (qp.shape[0], program.heads, qp.shape[1], kp.shape[1])
    values = []
    for flat, plan in zip(terms, program.terms):
        index = _padded_term_index(plan, program.head_sizes, q_sites, k_sites, rolls)
        values.append(flat.reshape(-1).index_select(0, index.reshape(-1)).view(shape))
    query_values = [
        _query_term(x, plan, program.head_sizes, q_sites, k_sites, rolls) for x, plan in zip(qterms, program.qterms)
    ]
    return q_sites.unpad(_padded_attention(qp, kp, vp, kvalid, program, values, scalars, query_values))


def _pad_prefixed(x: torch.Tensor, sites, prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample padded rows with the sample's prefix tokens first: ``(B, prefix + Nmax, C)`` and validity."""
    if not prefix:
        return sites.pad(x)
    b = sites.batch_size
    grid, valid = sites.sites.pad(x[: x.shape[0] - b * prefix])
    own = x[x.shape[0] - b * prefix :].view(b, prefix, x.shape[1])
    return torch.cat([own, grid], 1), torch.cat([valid.new_ones(b, prefix), valid], 1)


def _prefixed_sample_attention(
    q, q_sites, k, k_sites, v, program: AttentionProgram, terms, scalars, rolls, qterms, prefix: Tuple[int, int]
) -> torch.Tensor:
    """``sample_attention`` whose queries or keys hold prefix tokens (a class token, always visible) before
    the grid tokens: every query attends to its sample's prefix keys and visible grid keys; terms and query
    terms are read on the grid part (``block`` steps)."""
    if terms:
        raise RuntimeError("attention terms over prefix tokens are not supported")
    grid_q = q_sites.sites if prefix[0] else q_sites
    grid_k = k_sites.sites if prefix[1] else k_sites
    qp, _ = _pad_prefixed(q, q_sites, prefix[0])
    kp, kvalid = _pad_prefixed(k, k_sites, prefix[1])
    vp, _ = _pad_prefixed(v, k_sites, prefix[1])
    grid_rows = q.shape[0] - q_sites.batch_size * prefix[0]
    query_values = [
        _query_term(x[:grid_rows], plan, program.head_sizes, grid_q, grid_k, rolls)
        for x, plan in zip(qterms, program.qterms)
    ]
    out = _padded_attention(qp, kp, vp, kvalid, program, [], scalars, query_values, prefix)
    rows = grid_q.unpad(out[:, prefix[0] :])
    return torch.cat([rows, out[:, : prefix[0]].reshape(-1, out.shape[-1])]) if prefix[0] else rows


def _query_term(
    x: torch.Tensor, plan: TermPlan, head_sizes: Sequence[int], q_sites: Sites, k_sites: Sites, rolls
) -> torch.Tensor:
    """``(B, heads, Nq, Nk)`` values of a query term: each padded query's row read at (head, key) column offsets."""
    h, _, k = term_offsets(
        plan, head_sizes, q_sites.coords, q_sites.grid, rolls[0], k_sites.coords, k_sites.grid, rolls[1]
    )
    xp, _ = q_sites.pad(x)
    kpad, _ = k_sites.pad(k[:, None])
    b, nq, cols = xp.shape
    index = h[None, :, None, None] + kpad[:, None, None, :, 0]
    shape = (b, h.shape[0], nq, index.shape[-1])
    return torch.gather(xp[:, None].expand(b, h.shape[0], nq, cols), 3, index.expand(shape))


def _padded_attention(
    qp: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    kvalid: torch.Tensor,
    program: AttentionProgram,
    values: List[torch.Tensor],
    scalars: Sequence[torch.Tensor],
    query_values: Sequence[torch.Tensor] = (),
    prefix: Tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """The program on padded sets ``(S, N, heads * d)`` of queries, keys and values (S samples or windows):
    padding keys (``kvalid`` False) get the lowest logit; returns ``(S, Nq, heads * dv)``. ``prefix``: the
    (query, key) prefix tokens standing before the grid tokens, which ``block`` steps skip."""
    heads = program.heads
    s, nq, nk = qp.shape[0], qp.shape[1], kp.shape[1]
    dq, dv = qp.shape[2] // heads, vp.shape[2] // heads
    qh = qp.view(s, nq, heads, dq).transpose(1, 2)
    kh = kp.view(s, nk, heads, dq).transpose(1, 2)
    vh = vp.view(s, nk, heads, dv).transpose(1, 2)
    logits = _run_steps(qh @ kh.transpose(-1, -2), program.steps, values, list(scalars), query_values, prefix)
    logits = logits.masked_fill(~kvalid[:, None, None, :], torch.finfo(logits.dtype).min)
    probs = _run_post(logits.softmax(dim=-1), program.post)
    return (probs @ vh).transpose(1, 2).reshape(s, nq, heads * dv)


def _padded_term_index(
    plan: TermPlan, head_sizes: Sequence[int], q_sites: Sites, k_sites: Sites, rolls
) -> torch.Tensor:
    """``(B, heads, Nq, Nk)`` term offsets of padded per-sample attention."""
    h, q, k = term_offsets(
        plan, head_sizes, q_sites.coords, q_sites.grid, rolls[0], k_sites.coords, k_sites.grid, rolls[1]
    )
    qpad, _ = q_sites.pad(q[:, None])
    kpad, _ = k_sites.pad(k[:, None])
    return h[None, :, None, None] + qpad[:, None, :, :] + kpad[:, None, None, :, 0]


def _segment_pad(x: torch.Tensor, seg: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``x`` grouped by segment: ``(count, Nmax, C)`` zero-padded, the validity mask and each row's rank."""
    sizes = torch.bincount(seg, minlength=count)
    order = torch.argsort(seg, stable=True)
    rank = torch.empty_like(seg)
    rank[order] = torch.arange(seg.shape[0], device=seg.device) - (torch.cumsum(sizes, 0) - sizes)[seg[order]]
    nmax = int(sizes.max().item()) if count else 0
    out = x.new_zeros(count, nmax, x.shape[1]).index_put((seg, rank), x)
    valid = torch.zeros(count, nmax, dtype=torch.bool, device=x.device)
    valid[seg, rank] = True
    return out, valid, rank


def cross_window_attention(
    q: torch.Tensor,
    q_sites: Sites,
    q_windows,
    k: torch.Tensor,
    k_sites: Sites,
    k_windows,
    v: torch.Tensor,
    program: AttentionProgram,
    scalars: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Attention inside windows whose queries live on a coarser grid than their keys (queries max-pooled per
    cell, as in Hiera's mask-unit attention): each window's visible queries attend to its visible keys,
    windows padded to their largest count; windows without a visible query are skipped."""
    if requested_backend(program.backend) == "triton":
        raise RuntimeError(
            "attention_backend='triton': the fused kernel runs window attention on one grid; pooled-query "
            "windows run on the PyTorch path (use 'auto' or 'torch')"
        )
    per_sample = q_windows.windows_per_sample
    q_win = q_sites.batch * per_sample + q_windows.digits(q_sites.coords, q_windows.shared)
    k_win = k_sites.batch * per_sample + k_windows.digits(k_sites.coords, k_windows.shared)
    used, q_seg = torch.unique(q_win, return_inverse=True)
    lookup = torch.full((k_sites.batch_size * per_sample,), -1, dtype=torch.long, device=k.device)
    lookup[used] = torch.arange(used.shape[0], device=k.device)
    k_seg = lookup[k_win]
    keep = (k_seg >= 0).nonzero().squeeze(1)
    k_seg = k_seg.index_select(0, keep)
    qp, _, q_rank = _segment_pad(q, q_seg, used.shape[0])
    kp, kvalid, _ = _segment_pad(k.index_select(0, keep), k_seg, used.shape[0])
    vp, _, _ = _segment_pad(v.index_select(0, keep), k_seg, used.shape[0])
    return _padded_attention(qp, kp, vp, kvalid, program, [], scalars)[q_seg, q_rank]
