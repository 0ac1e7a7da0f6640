"""Attention, recognised by its operations -> attention over packed visible tokens.

``q @ kᵀ`` (``matmul``/``bmm``) whose operands hold token digits on their row axes and contract a
channel digit makes a *pair* layout: the digits both share (sample, window, head) index the
attention batch, the query's and the key's token digits its two token axes. Any layout op,
elementwise op with image-independent operands (relative-position bias after its gathers, a full
``(heads, N, N)`` bias, a continuous-position-bias MLP's output, a seam mask built in ``forward``,
a logit scale), ``softmax`` over the key axis and dropout may follow; ``@ v`` contracts the key
axis back to tokens. ``scaled_dot_product_attention`` is the same with its ``attn_mask`` as the
term. Each such region becomes one runtime op that gathers every term per (query, key) pair of
packed groups: group window attention when query and key share window digits, per-sample
attention (keys possibly on a reduced grid) when they share only the sample.
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, QueryTerm, facts, peek
from greenmim_convert.compiler.layout import Atom, Axis, Layout, LayoutError
from greenmim_convert.runtime import attention as runtime
from greenmim_convert.runtime import plan as planner
from greenmim_convert.runtime.attention import AttentionProgram, Step
from greenmim_convert.runtime.plan.grouping import DigitWindows
from greenmim_convert.runtime.plan.terms import TermPlan

from . import rules
from .base import GreenPass, args_of, aten, constant, context_of, is_op, layout_of, shape_of, sites_node
from .block_masks import evaluate_constant, region_labels
from .grid_padding import pooled_onto
from .tokenwise import BINARY, UNARY

KEY = {"h": "kh", "w": "kw"}
KEY_KINDS = ("kh", "kw")
MATMULS = (aten.matmul, aten.bmm)
SOFTMAX = (aten.softmax, aten._softmax)


def _spatial(ax) -> bool:
    return bool(ax) and all(a.kind in "hw" for a in ax)


def _pair_layout(q: Layout, k: Layout, kt: bool) -> Layout:
    """Pair layout of ``q @ kᵀ``: ``q`` is ``(..., Nq, D)``, ``k`` is ``(..., D, Nk)`` (``kt``) or ``(..., Nk, D)``."""
    n = max(len(q.axes), len(k.axes))
    q, k = q.padded_to(n), k.padded_to(n)
    k_tok, k_red = (k.axes[-1], k.axes[-2]) if kt else (k.axes[-2], k.axes[-1])
    if q.axes[-1] != k_red or not all(a.kind == "c" for a in q.axes[-1]):
        raise LayoutError("q @ kᵀ does not contract one channel digit of both")
    if not _spatial(q.axes[-2]) or not _spatial(k_tok):
        raise LayoutError("q @ kᵀ whose row axes are not token axes")
    if not same_batch(q, k):
        raise LayoutError("query and key do not share their batch (sample, window, head) digits")
    if q.is_pair() or k.is_pair():
        raise LayoutError("attention of attention")
    if not _padded_alike(q, k):
        raise LayoutError("queries and keys padded differently")
    key_axis = tuple(Atom(KEY[a.kind], a.size, a.inner) for a in k_tok)
    return Layout(q.axes[:-2] + (q.axes[-2], key_axis), q.grid, q.stride, q.offset, q.prefix, k.prefix, q.border)


def _padded_alike(q: Layout, k: Layout) -> bool:
    """Queries and keys hold the same padded positions: one border of one grid, or the border of the finer grid
    pooled onto the coarser one (``grid_padding.pooled_onto``)."""
    if q.stride == k.stride or not any(q.border + k.border):
        return q.border == k.border
    fine, coarse = (q, k) if q.stride < k.stride else (k, q)
    return pooled_onto(fine, coarse)


def _batch_key(lay: Layout, absolute: bool) -> tuple:
    """The batch axes (all but the last two) as comparable digits: a channel digit (a head) by its size only, since
    batch axes of a matmul pair by position and each operand reads its own columns; spatial digits in pixels
    (``inner * stride``) when ``absolute``, to compare digits across grids."""

    def key(a: Atom) -> tuple:
        if a.kind == "c":
            return ("c", a.size)
        return (a.kind, a.size, a.inner * (lay.stride if absolute and a.kind in "hw" else 1))

    return tuple(tuple(key(a) for a in ax) for ax in lay.axes[:-2])


def same_batch(q: Layout, k: Layout) -> bool:
    """Query and key (or value) share their batch axes: the same sample, head and window digits, where the
    query may live on a coarser grid (queries pooled per cell, as Hiera's): then windows compare in pixels."""
    if _batch_key(q, False) == _batch_key(k, False):
        return True
    return q.offset == k.offset == (0, 0) and _batch_key(q, True) == _batch_key(k, True)


def _own_heads(pair: Layout, other: Layout) -> Tuple[Axis, ...]:
    """``pair``'s batch axes with each head digit replaced by the one ``other`` holds at its place: the
    columns of ``other`` the heads read (``same_batch`` checked that the digits pair up)."""
    axes = []
    for mine, theirs in zip(pair.axes[:-2], other.axes[:-2]):
        axes.append(tuple(b if a.kind == "c" else a for a, b in zip(mine, theirs)))
    return tuple(axes)


def _qk_rule(node: fx.Node) -> Optional[Layout]:
    a, b = node.args[0], node.args[1]
    la, lb = layout_of(a), layout_of(b)
    if la is None or lb is None:
        return None
    if la.is_pair():
        return _pv_layout(node, la, lb)
    sample = sample_matmul_layout(la, lb)
    if sample is not None:
        facts(node).sample_matmul = True
        return sample
    out = _pair_layout(la, lb, True)
    facts(node).attention_qk = (a, b)
    return out


def sample_matmul_layout(la: Layout, lb: Layout) -> Optional[Layout]:
    """Layout of a matmul that sums over every token of a sample (``kᵀ @ v`` of channel attention), or of
    a per-sample matrix applied to tokens; None for other matmuls.

    Both run on per-sample padded dense tensors. The second operand's own channel digits are
    renamed above the first's, so the per-sample result keeps distinct digits.
    """
    n = max(len(la.axes), len(lb.axes))
    la, lb = la.padded_to(n), lb.padded_to(n)
    whole = lambda lay, axis: (
        bool(lay.axes[axis])
        and all(a.kind in "hw" for a in lay.axes[axis])
        and sum(a.kind in "hw" for ax in lay.axes for a in ax) == len(lay.axes[axis])
    )
    if not la.is_per_sample() and not lb.is_per_sample() and whole(la, -1) and whole(lb, -2):
        if la.axes[-1] != lb.axes[-2] or la.axes[:-2] != lb.axes[:-2]:
            raise LayoutError("token sum of two operands over different positions")
        top = max((a.inner * a.size for ax in la.axes + lb.axes for a in ax if a.kind == "c"), default=1)
        right = tuple(Atom(a.kind, a.size, a.inner * top) for a in lb.axes[-1])
        out = Layout(la.axes[:-1] + (right,), la.grid, la.stride)
        if any(a.kind != "c" for a in la.axes[-2] + right):
            raise LayoutError("token sum whose result keeps token digits")
        return out
    if la.is_per_sample() != lb.is_per_sample():
        tokens = lb if la.is_per_sample() else la
        axis = -1 if la.is_per_sample() else -2
        if not whole(tokens, axis) or la.axes[:-2] != lb.axes[:-2] or la.shape[-1] != lb.shape[-2]:
            raise LayoutError("per-sample matrix times tokens whose token digits are not one whole axis")
        return Layout(la.axes[:-1] + (lb.axes[-1],), tokens.grid, tokens.stride, tokens.offset, border=tokens.border)
    return None


def _pv_layout(node: fx.Node, p: Layout, v: Layout) -> Layout:
    n = max(len(p.axes), len(v.axes))
    p, v = p.padded_to(n), v.padded_to(n)
    key = tuple(Atom(KEY[a.kind], a.size, a.inner) for a in v.axes[-2] if a.kind in KEY)
    if (
        len(key) != len(v.axes[-2])
        or key != p.axes[-1]
        or not same_batch(p, v)
        or p.key_prefix != v.prefix
        or not _padded_alike(p, v)
    ):
        raise LayoutError("probabilities @ v does not contract the key axis with the value tokens")
    facts(node).attention_pv = True
    out = Layout(_own_heads(p, v) + (p.axes[-2], v.axes[-1]), p.grid, p.stride, p.offset, p.prefix, border=p.border)
    out.check_packed()
    return out


def _sdpa_rule(node: fx.Node) -> Optional[Layout]:
    a = args_of(node)
    lq, lk, lv = (layout_of(a[n]) for n in ("query", "key", "value"))
    if lq is None or lk is None or lv is None:
        raise LayoutError("attention between image features and constants")
    if a["is_causal"]:
        raise LayoutError("causal attention has no meaning on image tokens")
    if layout_of(a["attn_mask"]) is not None:
        raise LayoutError("attention mask computed from the images")
    pair = _pair_layout(lq, lk, False)
    if pair.key_prefix != lv.prefix:
        raise LayoutError("keys and values hold different prefix tokens")
    lv = lv.padded_to(len(pair.axes))
    if not same_batch(pair, lv):
        raise LayoutError("query and value do not share their batch (sample, window, head) digits")
    out = Layout(
        _own_heads(pair, lv) + (pair.axes[-2], lv.axes[-1]), lq.grid, lq.stride, lq.offset, lq.prefix, border=lq.border
    )
    facts(node).attention_sdpa = pair
    out.check_packed()
    return out


def _query_term_rule(node: fx.Node) -> Optional[Layout]:
    """Logits plus (or minus) a token-valued tensor whose channel digits stand where the logits hold key digits:
    a query-dependent term (MViTv2's ``q · R[qh, kh]``), read per (query, key) through those digits."""
    image = [a for a in node.args[:2] if layout_of(a) is not None]
    if len(image) != 2 or len(node.all_input_nodes) != 2:
        return None
    pairs = [layout_of(a).is_pair() for a in image]
    if pairs.count(True) != 1:
        return None
    pair, other = (layout_of(a) for a in (image if pairs[0] else image[::-1]))
    n = max(len(pair.axes), len(other.axes))
    pair, other = pair.padded_to(n), other.padded_to(n)
    if (pair.grid, pair.stride, pair.offset, pair.border) != (other.grid, other.stride, other.offset, other.border):
        raise LayoutError("a term computed from the queries on another grid than the logits")
    keys = []
    for pa, oa in zip(pair.axes, other.axes):
        if not oa or oa == pa:
            continue
        aligned = len(pa) == len(oa) and all(
            a.kind == "c" and b.kind in KEY_KINDS and a.size == b.size for a, b in zip(oa, pa)
        )
        if not aligned:
            raise LayoutError(
                f"a term computed from the queries of layout {other.shape} that does not broadcast against "
                f"the logits {pair.shape}"
            )
        keys.extend((a, Atom(b.kind[1], b.size, b.inner)) for a, b in zip(oa, pa))
    if not keys:
        raise LayoutError("logits combined with image features that hold no key digits")
    facts(node).query_term = QueryTerm(image[1] if pairs[0] else image[0], tuple(keys), not pairs[0])
    return pair


@rules.layout("attention", priority=70)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if is_op(node, aten.add, aten.sub):
        found = _query_term_rule(node)
        if found is not None:
            return found
    if is_op(node, *MATMULS):
        return _qk_rule(node)
    if is_op(node, aten.scaled_dot_product_attention):
        return _sdpa_rule(node)
    src = node.args[0] if node.args else None
    lay = layout_of(src)
    if lay is not None and lay.is_pair() and is_op(node, *SOFTMAX):
        dim = args_of(node)["dim"] % len(lay.axes)
        if not lay.axes[dim] or any(a.kind not in ("kh", "kw") for a in lay.axes[dim]) or dim != len(lay.axes) - 1:
            raise LayoutError("softmax over an axis that is not the key axis")
        return lay
    return None


# ---- compile a region into one runtime op ---------------------------------------------------------------


def _heads(pair: Layout, q: Layout) -> Tuple[int, List[Atom]]:
    """The channel digits shared by query and key (heads), checked to be the major digits of q's columns."""
    shared = [a for ax in pair.axes[:-2] for a in ax if a.kind == "c"]
    if any(a.kind == "b" for a in pair.axes[-2] + pair.axes[-1]):
        raise LayoutError("batch digits inside the token axes")
    sig = q.channel_atoms()
    if sig[: len(shared)] != sorted(shared, key=lambda a: -a.inner):
        raise LayoutError("attention heads are not the major channel digits of the queries")
    heads = 1
    for a in shared:
        heads *= a.size
    return heads, sorted(shared, key=lambda a: -a.inner)


def check_heads_major(pair: Layout, lay: Layout, role: str) -> None:
    """The head digits ``lay`` (a key or value operand) holds where ``pair`` holds its heads must be the major digits
    of its columns: the runtime splits every operand's columns head-major."""
    n = len(pair.axes)
    heads = [a for ax in _own_heads(pair, lay.padded_to(n)) for a in ax if a.kind == "c"]
    if lay.channel_atoms()[: len(heads)] != sorted(heads, key=lambda a: -a.inner):
        raise LayoutError(f"attention heads are not the major channel digits of the {role}")


def _windows(pair: Layout, q: Layout, k: Layout) -> Optional[DigitWindows]:
    """Digit windows when queries and keys share window digits on one grid; None for per-sample attention."""
    shared = [a for ax in pair.axes[:-2] for a in ax if a.kind in "hw"]
    token = list(pair.axes[-2])
    if (q.grid, q.stride, q.offset) != (k.grid, k.stride, k.offset):
        return None
    keys = [Atom(a.kind[1], a.size, a.inner) for a in pair.axes[-1]]
    if sorted(keys, key=lambda a: (a.kind, a.inner)) != sorted(token, key=lambda a: (a.kind, a.inner)):
        raise LayoutError("keys and queries cover different positions of their window")
    if not shared:
        return None
    return DigitWindows(
        q.grid,
        q.offset,
        tuple((a.kind, a.size, a.inner) for a in shared),
        tuple((a.kind, a.size, a.inner) for a in token),
    )


def _cross_windows(pair: Layout, q: Layout, k: Layout) -> Optional[Tuple[DigitWindows, DigitWindows]]:
    """Windows of queries on a coarser grid than their keys (pooled queries): the window digits on each grid."""
    if (q.grid, q.stride) == (k.grid, k.stride):
        return None
    n = len(pair.axes)
    found = []
    for lay in (q.padded_to(n), k.padded_to(n)):
        shared = tuple((a.kind, a.size, a.inner) for ax in lay.axes[:-2] for a in ax if a.kind in "hw")
        found.append(DigitWindows(lay.grid, lay.offset, shared, ()))
    return tuple(found) if found[0].shared else None


def _equal_along(value: Optional[torch.Tensor], size: int, stride: int) -> bool:
    """The contiguous ``value`` is the same at every index of the digit of ``size`` and element ``stride``."""
    if value is None:
        return False
    v = value.contiguous().view(-1, size, stride)
    return bool((v == v[:, :1]).all())


def term_plan(term: fx.Node, at: Layout, heads: List[Atom], gm: Optional[fx.GraphModule] = None) -> TermPlan:
    """How to read an image-independent term broadcast against the pair layout ``at`` for one (head, query, key).

    A term indexed by sample digits (a seam mask expanded or repeated over the batch) is judged by its value
    for random weights: when it is equal across samples it is read at sample 0; otherwise it is refused.
    """
    shape = shape_of(term) or ()
    value: List[Optional[torch.Tensor]] = []
    if len(shape) > len(at.axes):
        raise LayoutError(f"attention term of shape {shape} has more axes than the logits")
    padded = (1,) * (len(at.axes) - len(shape)) + tuple(shape)
    strides, place = [], 1
    for size in reversed(padded):
        strides.append(place)
        place *= size
    strides = strides[::-1]
    head, query, key = [], [], []
    for size, stride, ax in zip(padded, strides, at.axes):
        if size == 1:
            continue
        if size != prod(a.size for a in ax):
            raise LayoutError(f"attention term of shape {shape} does not broadcast against the logits")
        within = 1
        for a in reversed(ax):
            digit = (a.kind, a.size, a.inner, stride * within)
            within *= a.size
            if a.kind == "b":
                if not value:
                    value.append(evaluate_constant(gm, term, random_parameters=True) if gm is not None else None)
                if not _equal_along(value[0], a.size, digit[3]):
                    raise LayoutError("attention term that differs between samples")
                continue
            if a.kind == "c":
                if a not in heads:
                    raise LayoutError("attention term indexed by a channel digit that is not a head")
                head.append((heads.index(a), a.size, stride * (within // a.size)))
            elif a.kind in ("kh", "kw"):
                key.append((a.kind[1], a.size, a.inner, digit[3]))
            else:
                query.append(digit)
    return TermPlan(tuple(head), tuple(query), tuple(key))


def query_term_plan(lay: Layout, keys, heads: List[Atom]) -> TermPlan:
    """How to read a query term's packed columns for one (head, key): its channel digits are heads or stand for
    the key digits ``keys`` (channel atom, key atom on the key grid)."""
    atoms = lay.channel_atoms()
    by_atom = dict(keys)
    head, key, stride = [], [], 1
    for a in reversed(atoms):
        if a in by_atom:
            k = by_atom[a]
            key.append((k.kind, k.size, k.inner, stride))
        elif a in heads:
            head.append((heads.index(a), a.size, stride))
        else:
            raise LayoutError(
                "a term computed from the queries holds channels that are neither heads nor key positions"
            )
        stride *= a.size
    return TermPlan(tuple(head), (), tuple(key))


class AttentionPass(GreenPass):
    name = "attention"
    description = "q @ kᵀ / softmax / @ v regions and SDPA -> attention over packed groups of visible tokens"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.ATTENTION})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if peek(node).attention_pv:
                self._compile_matmul(gm, node)
            elif peek(node).attention_sdpa is not None:
                self._compile_sdpa(gm, node)
        gm.graph.eliminate_dead_code()

    def _compile_matmul(self, gm: fx.GraphModule, pv: fx.Node) -> None:
        chain, node, blocks, allowed = [], pv.args[0], {}, set()
        while peek(node).attention_qk is None:
            if len(set(node.users) - allowed) != 1:
                self.fail(node, "attention logits used or combined outside one softmax chain")
            if peek(node).block_scatter is not None:
                base, inner, region = self._grid_block(node)
                blocks[node] = inner
                allowed = region - {node}
                chain.append(node)
                node = base
                continue
            pair_inputs = [a for a in node.all_input_nodes if layout_of(a) is not None and layout_of(a).is_pair()]
            if len(pair_inputs) != 1:
                self.fail(node, "attention logits used or combined outside one softmax chain")
            chain.append(node)
            allowed = set()
            node = pair_inputs[0]
        qk = node
        if len(set(qk.users) - allowed) != 1:
            self.fail(qk, "attention logits used outside one softmax chain")
        q, kt = peek(qk).attention_qk
        steps, terms, post, qterms = [], [], [], []
        seen_softmax = False
        for n in reversed(chain):
            lay = layout_of(n)
            if n in blocks:
                for inner in blocks[n]:
                    if is_op(inner, *SOFTMAX):
                        self.fail(inner, "softmax over the grid part of attention logits")
                    steps.append(replace(self._step(gm, inner, layout_of(inner), qk, q, terms, qterms), block=True))
                continue
            if peek(n).layout_op:
                continue
            if is_op(n, *SOFTMAX):
                if seen_softmax:
                    self.fail(n, "two softmaxes in one attention")
                seen_softmax = True
                continue
            step = self._step(gm, n, lay, qk, q, terms, qterms)
            (post if seen_softmax else steps).append(step)
        if not seen_softmax:
            self.fail(pv, "attention without a softmax over the keys")
        if any(s.kind not in ("dropout", "cast") for s in post):
            self.fail(pv, "ops other than dropout between softmax and @ v")
        self._emit(gm, pv, q, kt, pv.args[1], layout_of(qk), steps, post, terms, key_transposed=True, qterms=qterms)
        for n in chain + [qk]:  # random ops (dropout) are not removed as dead code
            if not n.users:
                gm.graph.erase_node(n)

    def _grid_block(self, scatter: fx.Node) -> Tuple[fx.Node, List[fx.Node], set]:
        """``slice_scatter`` of ``f(logits[..., Pq:, Pk:])`` back into the logits (functionalized
        ``attn[:, :, 1:, 1:] = ...``): the logits, the ops of ``f`` after the slices (graph order) that act on
        the grid block only, and every node of the region (users of the logits it may have)."""
        base, value = scatter.args[0], scatter.args[1]
        dims = [peek(scatter).block_scatter]
        region = {scatter}
        if peek(value).block_scatter is not None and is_op(value.args[0], aten.slice) and value.args[0].args[0] is base:
            region |= {value, value.args[0]}
            dims.append(peek(value).block_scatter)
            value = value.args[1]
        lay = layout_of(base)
        if sorted(dims) != sorted(lay.prefixed_axes()):
            self.fail(scatter, "an update of attention logits that is not exactly their grid part")
        inner, node = [], value
        while True:
            if is_op(node, aten.slice) and peek(node).prefix_slice is not None:
                views, src = [], node
                while is_op(src, aten.slice) and src is not base:
                    views.append(src)
                    src = src.args[0]
                if src is base:
                    sliced = sorted(args_of(v)["dim"] % len(lay.axes) for v in views)
                    if sliced != sorted(dims):
                        self.fail(node, "an update of attention logits read from another part of them")
                    region |= set(views)
                    break
            pair_inputs = [a for a in node.all_input_nodes if layout_of(a) is not None and layout_of(a).is_pair()]
            if len(pair_inputs) != 1 or len(node.users) != 1:
                self.fail(node, "attention logits used or combined outside one softmax chain")
            inner.append(node)
            region.add(node)
            node = pair_inputs[0]
        return base, [n for n in reversed(inner) if not peek(n).layout_op], region

    def _step(self, gm, n: fx.Node, lay: Layout, qk: fx.Node, q: fx.Node, terms: List, qterms: List) -> Step:
        if peek(n).query_term is not None:
            operand, keys, swap = peek(n).query_term
            heads = _heads(layout_of(qk), layout_of(q))[1]
            qterms.append((operand, query_term_plan(layout_of(operand), keys, heads)))
            return Step("qterm", n.target, len(qterms) - 1, swap=swap)
        other = [a for a in list(n.args[1:]) if not (isinstance(a, fx.Node) and layout_of(a) is not None)]
        if is_op(n, aten.dropout):
            p, train = args_of(n)["p"], args_of(n)["train"]
            return Step("dropout", None, p if train else 0.0)
        if is_op(n, aten._to_copy):
            return Step("cast", None, args_of(n).get("dtype"))
        if not is_op(n, *UNARY, *BINARY):
            self.fail(n, f"{n.target} on attention logits")
        pair_first = isinstance(n.args[0], fx.Node) and layout_of(n.args[0]) is not None
        if is_op(n, *UNARY) or not other:
            return Step("unary", n.target, tuple(n.args[1:]))
        operand = other[0]
        if isinstance(operand, fx.Node):
            shape = shape_of(operand) or ()
            if all(s == 1 for s in shape):
                return Step("scalar-tensor", n.target, len(terms), swap=not pair_first, tensor=operand)
            heads = _heads(layout_of(qk), layout_of(q))[1]
            terms.append((operand, term_plan(operand, lay, heads, gm)))
            return Step("term", n.target, len(terms) - 1, swap=not pair_first)
        return Step("scalar", n.target, operand, swap=not pair_first)

    def _compile_sdpa(self, gm: fx.GraphModule, node: fx.Node) -> None:
        a = args_of(node)
        pair = peek(node).attention_sdpa
        q, k, v = a["query"], a["key"], a["value"]
        d = shape_of(q)[-1]
        scale = a.get("scale") or d**-0.5
        steps, terms = [Step("scalar", aten.mul.Tensor, scale)], []
        mask = a["attn_mask"]
        if mask is not None:
            if shape_of(mask) is not None and mask.meta["val"].dtype == torch.bool:
                self.fail(node, "boolean attn_mask: pass an additive float mask")
            heads = _heads(pair, layout_of(q))[1]
            terms.append((mask, term_plan(mask, pair, heads, gm)))
            steps.append(Step("term", aten.add.Tensor, 0))
        post = [Step("dropout", None, float(a["dropout_p"] or 0.0))] if a["dropout_p"] else []
        self._emit(gm, node, q, k, v, pair, steps, post, terms, key_transposed=False)

    def _split_block_masks(self, gm, steps, terms, program_heads, windows):
        """Drop additive block-mask terms (seam masks) in favour of region labels for the grouping."""
        labels = None
        for i, step in enumerate(steps):
            if step.kind != "term" or step.op not in (aten.add.Tensor,) or step.swap or labels is not None:
                continue
            node, plan = terms[step.value]
            value = evaluate_constant(gm, node)
            found = region_labels(value, plan, program_heads, windows) if value is not None else None
            if found is not None:
                labels = found
                steps = steps[:i] + steps[i + 1 :]
                self.report["block mask -> window regions"] += 1
        if labels is None:
            return steps, terms, None
        used = sorted({s.value for s in steps if s.kind == "term"})
        remap = {old: new for new, old in enumerate(used)}
        steps = [replace(s, value=remap[s.value]) if s.kind == "term" else s for s in steps]
        return steps, [terms[i] for i in used], labels

    def _fold_query_scale(self, q: fx.Node, steps: List[Step]) -> Tuple[fx.Node, List[Step]]:
        """``(q * s) @ kᵀ`` -> ``s * (q @ kᵀ)``: the scale joins the logits' steps (one ``baddbmm`` alpha)
        instead of a pass over every query."""
        if (
            is_op(q, aten.mul)
            and len(q.users) == 1
            and isinstance(q.args[1], (int, float))
            and layout_of(q.args[0]) == layout_of(q)
        ):
            self.report["query scale -> logits"] += 1
            return q.args[0], [Step("scalar", aten.mul.Tensor, q.args[1])] + list(steps)
        return q, steps

    def _emit(
        self, gm, at: fx.Node, q, k, v, pair: Layout, steps, post, terms, key_transposed: bool, qterms=()
    ) -> None:
        ctx = context_of(gm)
        lq, lk = layout_of(q), layout_of(k)
        if key_transposed:
            lk = lk.transpose(-1, -2)
        heads, head_atoms = _heads(pair, lq)
        for lay, role in ((lk, "keys"), (layout_of(v), "values")):
            check_heads_major(pair, lay, role)
        windows = _windows(pair, lq, lk)
        scalar_steps = [i for i, s in enumerate(steps) if s.kind == "scalar-tensor"]
        tensors = [steps[i].tensor for i in scalar_steps]
        for n, i in enumerate(scalar_steps):
            steps[i] = replace(steps[i], value=n)
        q, steps = self._fold_query_scale(q, steps)
        labels = None
        if windows is not None:
            steps, terms, labels = self._split_block_masks(
                gm, steps, terms, program_heads=tuple(a.size for a in head_atoms), windows=windows
            )
        program = AttentionProgram(
            heads,
            tuple(a.size for a in head_atoms),
            tuple(steps),
            tuple(post),
            tuple(p for _, p in terms),
            ctx.attention_backend,
            tuple(p for _, p in qterms),
        )
        term_nodes = [t for t, _ in terms]
        program_node = constant(gm, program, at, "attention_program")
        if windows is not None:
            sites = sites_node(gm, lq)
            key = (windows, ctx.grouping, None if labels is None else tuple(labels.reshape(-1).tolist()), sites)
            if key not in ctx.grouping_nodes:
                spec = constant(gm, windows, ctx.visible.next, "windows")
                label_node = constant(gm, labels, ctx.visible.next, "regions") if labels is not None else None
                with gm.graph.inserting_after(sites):
                    ctx.grouping_nodes[key] = gm.graph.call_function(
                        planner.digit_grouping, (sites, spec, label_node, ctx.grouping)
                    )
                self.report["groupings"] += 1
        cross = _cross_windows(pair, lq, lk) if windows is None else None
        if (pair.prefix or pair.key_prefix) and (windows is not None or cross is not None):
            self.fail(
                at, "prefix tokens (a class token) in window attention (supported: attention over a whole sample)"
            )
        if (pair.prefix or pair.key_prefix) and any(s.kind == "term" and not s.block for s in steps):
            self.fail(at, "an attention term over the prefix tokens' logits (supported: terms on the grid part)")
        if qterms and cross is not None:
            self.fail(
                at, "a term computed from the queries in windows whose queries live on a coarser grid than their keys"
            )
        if cross is not None and terms:
            self.fail(at, "attention terms in windows whose queries live on a coarser grid than their keys")
        with gm.graph.inserting_before(at):
            if windows is not None:
                args = (q, k, v, ctx.grouping_nodes[key], program_node, term_nodes, tensors, [t for t, _ in qterms])
                new = gm.graph.call_function(runtime.window_attention, args)
                kind = "window attention"
            elif cross is not None:
                specs = [constant(gm, w, at, "windows") for w in cross]
                new = gm.graph.call_function(
                    runtime.cross_window_attention,
                    (q, sites_node(gm, lq), specs[0], k, sites_node(gm, lk), specs[1], v, program_node, tensors),
                )
                kind = "pooled-query window attention"
            else:
                args = (
                    q,
                    sites_node(gm, lq),
                    k,
                    sites_node(gm, lk),
                    v,
                    program_node,
                    term_nodes,
                    tensors,
                    (lq.offset, lk.offset),
                )
                if qterms:
                    args += ([t for t, _ in qterms],)
                new = gm.graph.call_function(runtime.sample_attention, args)
                kind = (
                    "per-sample attention"
                    if lq.grid == lk.grid
                    else "reduced-key attention"
                    if lq.stride < lk.stride
                    else "subsampled-query attention"
                )
        facts(new).layout = layout_of(at)
        at.replace_all_uses_with(new)
        gm.graph.erase_node(at)
        self.report[kind] += 1
