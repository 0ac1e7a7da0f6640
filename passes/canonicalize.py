"""Canonical form: one spelling per piece of mathematics, before any rule reads the graph.

Models written elsewhere spell the same operation many ways. This pass rewrites each spelling to
one form, so the rules after it are written once:

- metadata asserts (``_assert_tensor_metadata`` of ``x.to(dtype)``) are dropped;
- casts to the dtype and device a value already has are dropped;
- layout aliases become views: ``reshape_as``/``view_as`` -> ``reshape``/``view``, ``expand_as`` and a
  ``repeat``/``tile`` of size-one axes -> ``expand``, ``unflatten`` -> ``view``, ``movedim`` -> ``permute``,
  ``swapaxes``/``swapdims`` -> ``transpose``, ``stack`` -> ``cat`` of ``unsqueeze``;
- ``split``, ``split_with_sizes``, ``chunk`` and ``narrow`` become slices; ``unbind`` parts become ``select``;
- ``max.dim``/``min.dim`` read for their values only become ``amax``/``amin``;
- a reduction of a reduction of the same kind (``mean(2).mean(3)``) becomes one reduction over both;
- ``exp(x - amax(x)) / sum(exp(x - amax(x)))`` (the max optional) becomes ``softmax``, and its log form
  ``log_softmax``;
- ``x @ W`` with a 2-D Parameter ``W`` becomes ``linear(x, Wᵀ)``;
- a matmul over a contracted axis of size one is the broadcast product ``a * b``, and one of a single row by a single
  column the sum ``(aᵀ * b).sum(-2, keepdim=True)`` (attention over one key: the in-patch attention of a grid that is
  one patch);
- ``pixel_unshuffle``/``pixel_shuffle`` and ``unfold``/``fold`` (``im2col``/``col2im``) of non-overlapping patches
  (kernel == stride, no padding or dilation) become the views and permute they stand for;
- ``group_norm`` becomes its definition: a mean and a variance over each group's channels and positions;
- population ``var``/``std`` become means of squared deviations.
"""

from __future__ import annotations

import operator
from typing import List, Optional

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property

from . import rules
from .base import GreenPass, args_of, aten, fetch_attr, is_op, shape_of
from .base import emit_call as _emit

ASSERTS = (
    "_assert_tensor_metadata",
    "_assert_scalar",
    "_assert_async",
    "sym_constrain_range_for_size",
    "sym_constrain_range",
)
REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin)


def _name(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", "")


def _val(node: fx.Node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _replace(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    """``new`` takes ``node``'s place: its users, and its recorded value when it has none."""
    if "val" in node.meta and "val" not in new.meta:
        new.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _broadcast_repeat(node: fx.Node) -> bool:
    """``repeat``/``tile`` that only copies size-one axes: the same values as ``expand``."""
    src, reps = _val(node.args[0]), list(node.args[1])
    if src is None or len(reps) != src.dim():
        return False
    return all(r == 1 or s == 1 for r, s in zip(reps, src.shape))


def _same_value(node: fx.Node) -> bool:
    """A cast to the dtype, device and layout its input already has: the input itself."""
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    return (
        src is not None
        and out is not None
        and src.dtype == out.dtype
        and src.device == out.device
        and src.shape == out.shape
        and not node.kwargs.get("memory_format")
    )


def _dims(dims, ndim: int) -> List[int]:
    dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
    return sorted({d % ndim for d in dims})


class CanonicalizePass(GreenPass):
    name = "canonicalize"
    description = "one spelling per operation: aliases, splits, reductions, softmax, matmul by a weight, group norm"
    requires = frozenset({Property.FUNCTIONAL})
    ensures = frozenset({Property.CANONICAL})

    def run(self, gm: fx.GraphModule) -> None:
        spellings = rules.spelling.ordered()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.graph is not gm.graph:
                continue
            for rule in spellings:
                done = rule(gm, node)
                if done:
                    self.report[done] += 1
                    break
        changed = True
        while changed:  # chains fold pairwise: mean(2).mean(3).mean(1) takes two rounds
            changed = False
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and (self._reduction_chain(gm, node) or self._softmax(gm, node)):
                    changed = True
        gm.graph.eliminate_dead_code()

    # ---- one rule per spelling ---------------------------------------------------------------------------
    @staticmethod
    @rules.spelling("assert", priority=10)
    def _assert(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        if _name(node) not in ASSERTS or node.users:
            return None
        gm.graph.erase_node(node)
        return "metadata assert dropped"

    @staticmethod
    @rules.spelling("alias", priority=20)
    def _alias(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        name = _name(node)
        out = shape_of(node)
        if name in ("reshape_as", "view_as", "unflatten") and out is not None:
            target = aten.view.default if name == "view_as" else aten.reshape.default
            new = _emit(gm, node, target, (node.args[0], list(out)), node)
        elif name == "expand_as" and out is not None:
            new = _emit(gm, node, aten.expand.default, (node.args[0], list(out)), node)
        elif name == "movedim" and out is not None:
            src, dst = node.args[1], node.args[2]
            src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
            ndim = len(out)
            src, dst = [s % ndim for s in src], [d % ndim for d in dst]
            rest = iter(d for d in range(ndim) if d not in src)
            placed = {d: s for s, d in zip(src, dst)}
            order = [placed[i] if i in placed else next(rest) for i in range(ndim)]
            new = _emit(gm, node, aten.permute.default, (node.args[0], order), node)
        elif name in ("repeat", "tile") and out is not None and _broadcast_repeat(node):
            new = _emit(gm, node, aten.expand.default, (node.args[0], list(out)), node)
        elif name in ("swapaxes", "swapdims"):
            new = _emit(gm, node, aten.transpose.int, tuple(node.args[:3]), node)
        elif name in ("to", "_to_copy", "type_as") and _same_value(node):
            new = node.args[0]
        elif name == "stack" and out is not None:
            dim = args_of(node).get("dim", 0) % len(out)
            parts = [_emit(gm, node, aten.unsqueeze.default, (t, dim), node) for t in node.args[0]]
            new = _emit(gm, node, aten.cat.default, (parts, dim), node)
        else:
            return None
        _replace(gm, node, new)
        return f"{name} -> {str(new.target).split('.')[1] if new.op == 'call_function' else 'its input'}"

    @staticmethod
    @rules.spelling("split", priority=30)
    def _split(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """Parts of ``split``/``chunk``/``unbind`` read by ``getitem`` become slices (``select`` for unbind);
        ``narrow`` a slice."""
        name = _name(node)
        val = _val(node.args[0]) if node.args else None
        if val is None:
            return None
        if name == "narrow":
            a = args_of(node)
            dim = a["dim"] % val.dim()
            new = _emit(gm, node, aten.slice.Tensor, (node.args[0], dim, a["start"], a["start"] + a["length"]), node)
            _replace(gm, node, new)
            return "narrow -> slice"
        if name not in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
            return None
        if name == "tensor_split" or not all(u.target is operator.getitem for u in node.users):
            return None
        a = args_of(node)
        dim = a["dim"] % val.dim()
        size = val.shape[dim]
        if name == "unbind":
            bounds = [(i, None) for i in range(size)]
        else:
            if name == "chunk":
                step = -(-size // a["chunks"])
                sizes = [min(step, size - s) for s in range(0, size, step)]
            elif name == "split" and isinstance(a["split_size"], int):
                sizes = [min(a["split_size"], size - s) for s in range(0, size, a["split_size"])]
            else:
                sizes = list(a.get("split_sizes") or a.get("split_size"))
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            bounds = [(s, s + n) for s, n in zip(starts, sizes)]
        for user in list(node.users):
            start, stop = bounds[user.args[1]]
            if stop is None:
                new = _emit(gm, user, aten.select.int, (node.args[0], dim, start), node)
            else:
                new = _emit(gm, user, aten.slice.Tensor, (node.args[0], dim, start, stop), node)
            _replace(gm, user, new)
        gm.graph.erase_node(node)
        return f"{name} -> {'select' if name == 'unbind' else 'slice'}"

    @staticmethod
    @rules.spelling("max-values", priority=40)
    def _max_values(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        if not (is_op(node, aten.max, aten.min) and len(node.args) >= 2 and isinstance(node.args[1], int)):
            return None
        for user in list(node.users):
            if not user.users and user.target is operator.getitem:
                gm.graph.erase_node(user)  # the unread indices
        if not node.users or any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return None
        a = args_of(node)
        target = aten.amax.default if is_op(node, aten.max) else aten.amin.default
        for user in list(node.users):
            new = _emit(gm, user, target, (node.args[0], [a["dim"]], bool(a["keepdim"])), node)
            _replace(gm, user, new)
        gm.graph.erase_node(node)
        return f"{_name(node)}(dim).values -> {str(target).split('.')[1]}"

    @staticmethod
    @rules.spelling("degenerate-matmul", priority=70)
    def _degenerate_matmul(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """``a @ b`` contracting an axis of size one -> ``a * b`` (an outer product); ``a @ b`` of one row by one
        column -> ``(aᵀ * b).sum(-2, keepdim=True)`` (a dot product): the same values, with the batch axes
        broadcast as the matmul broadcasts them."""
        if not is_op(node, aten.matmul, aten.bmm) or len(node.args) != 2:
            return None
        a, b = (_val(x) for x in node.args)
        if a is None or b is None or a.dim() < 2 or b.dim() < 2:
            return None
        if a.shape[-1] == 1:
            new = _emit(gm, node, aten.mul.Tensor, tuple(node.args), node)
            _replace(gm, node, new)
            return "matmul over one element -> mul"
        if a.shape[-2] == 1 and b.shape[-1] == 1:
            at = _emit(gm, node, aten.transpose.int, (node.args[0], -1, -2), node)
            prod = _emit(gm, node, aten.mul.Tensor, (at, node.args[1]), node)
            new = _emit(gm, node, aten.sum.dim_IntList, (prod, [-2], True), node)
            _replace(gm, node, new)
            return "matmul of one row by one column -> mul, sum"
        return None

    @staticmethod
    @rules.spelling("patch-views", priority=80)
    def _patch_views(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """Space-to-depth and its inverse written as ``pixel_unshuffle``/``unfold`` and ``pixel_shuffle``/``fold`` of
        non-overlapping patches -> ``view``, ``permute``, ``reshape``: the channels of a patch are channel-major,
        then the rows and columns inside the patch; the patches in raster order."""
        name, src, out = _name(node), _val(node.args[0]) if node.args else None, shape_of(node)
        if src is None or out is None or name not in ("pixel_unshuffle", "pixel_shuffle", "im2col", "col2im"):
            return None
        if name in ("im2col", "col2im"):
            a = args_of(node)
            plain = list(a["dilation"]) == [1, 1] and list(a["padding"]) == [0, 0]
            if not plain or list(a["stride"]) != list(a["kernel_size"]):
                return None
            kh, kw = a["kernel_size"]
        else:
            kh = kw = int(args_of(node)["downscale_factor" if name == "pixel_unshuffle" else "upscale_factor"])
        if name in ("pixel_unshuffle", "im2col"):
            *lead, c, h, w = src.shape
            if h % kh or w % kw:
                return None
            n = len(lead)
            split = [*lead, c, h // kh, kh, w // kw, kw]
            order = [*range(n), n, n + 2, n + 4, n + 1, n + 3]
        else:
            lead, c = list(out[:-3]), out[-3]
            if out[-2] % kh or out[-1] % kw:
                return None
            n = len(lead)
            split = [*lead, c, kh, kw, out[-2] // kh, out[-1] // kw]
            order = [*range(n), n, n + 3, n + 1, n + 4, n + 2]
        view = _emit(gm, node, aten.reshape.default, (node.args[0], split), node)
        moved = _emit(gm, node, aten.permute.default, (view, order), node)
        new = _emit(gm, node, aten.reshape.default, (moved, list(out)), node)
        _replace(gm, node, new)
        return f"{name} of patches -> views"

    @staticmethod
    @rules.spelling("param-matmul", priority=60)
    def _param_matmul(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """``x @ W`` with ``W`` a 2-D Parameter (a Linear written as a matmul) -> ``linear(x, Wᵀ)``."""
        if not is_op(node, aten.matmul, aten.mm) or len(node.args) != 2:
            return None
        w = node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        weight = fetch_attr(gm, w.target)
        if not (isinstance(weight, torch.nn.Parameter) and weight.dim() == 2):
            return None
        wt = _emit(gm, node, aten.t.default, (w,), node)
        new = _emit(gm, node, aten.linear.default, (node.args[0], wt), node)
        _replace(gm, node, new)
        return "matmul by a weight -> linear"

    @staticmethod
    @rules.spelling("group-norm", priority=50)
    def _group_norm(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """``group_norm(x, G, w, b, eps)`` -> mean and variance over each group's channels and positions."""
        if not is_op(node, aten.group_norm):
            return None
        a = args_of(node)
        x, groups, eps = a["input"], a["num_groups"], a["eps"]
        shape = list(_val(x).shape)
        b, c = shape[0], shape[1]

        def emit(target, *args):
            return _emit(gm, node, target, args, node)

        xg = emit(aten.view.default, x, [b, groups, -1])
        mean = emit(aten.mean.dim, xg, [2], True)
        d = emit(aten.sub.Tensor, xg, mean)
        var = emit(aten.mean.dim, emit(aten.mul.Tensor, d, d), [2], True)
        y = emit(aten.mul.Tensor, d, emit(aten.rsqrt.default, emit(aten.add.Tensor, var, eps)))
        y = emit(aten.view.default, y, shape)
        affine = [c] + [1] * (len(shape) - 2)
        if a["weight"] is not None:
            y = emit(aten.mul.Tensor, y, emit(aten.view.default, a["weight"], affine))
        if a["bias"] is not None:
            y = emit(aten.add.Tensor, y, emit(aten.view.default, a["bias"], affine))
        _replace(gm, node, y)
        return "group_norm -> its mean and variance"

    @staticmethod
    @rules.spelling("variance", priority=90)
    def _variance(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """Population ``var``/``std`` (correction 0) -> ``mean((x - mean)²)`` (and its square root), so that a
        variance over grid positions is a mean over the visible ones like any other."""
        if not is_op(node, aten.var, aten.std) or _val(node.args[0]) is None:
            return None
        a = args_of(node)
        if "dim" not in a:
            return None
        x = node.args[0]
        src = _val(x)
        dims = _dims(a["dim"], src.dim())
        correction = a.get("correction")
        if correction is None:
            correction = 1 if a.get("unbiased", True) else 0
        if correction:
            return None  # n - correction counts positions, which masking changes: left to the channel rules
        keep = bool(a.get("keepdim"))

        def emit(target, *args):
            return _emit(gm, node, target, args, node)

        d = emit(aten.sub.Tensor, x, emit(aten.mean.dim, x, dims, True))
        sq = emit(aten.mean.dim, emit(aten.mul.Tensor, d, d), dims, keep)
        out = sq
        if is_op(node, aten.std):
            out = emit(aten.sqrt.default, out)
        _replace(gm, node, out)
        return f"{_name(node)} -> mean of squared deviations"

    @staticmethod
    def _reduction_chain(gm: fx.GraphModule, node: fx.Node) -> bool:
        """``r(r(x, d1), d2)`` of one kind ``r`` (mean, sum, amax, amin) -> ``r(x, d1 ∪ d2)`` (then a view when
        the first kept its dims and the second did not)."""
        if not is_op(node, *REDUCTIONS) or "dim" not in node.target._schema.arguments[1].name:
            return False
        inner = node.args[0]
        if not (is_op(inner, node.target.overloadpacket) and inner.target == node.target and len(inner.users) == 1):
            return False
        ai, ao = args_of(inner), args_of(node)
        if ai.get("dtype") is not None or ao.get("dtype") is not None:
            return False
        src = _val(inner.args[0])
        if src is None or _val(node) is None:
            return False
        first = _dims(ai["dim"], src.dim())
        kept = list(range(src.dim())) if ai["keepdim"] else [d for d in range(src.dim()) if d not in first]
        second = [kept[d] for d in _dims(ao["dim"], len(kept))]
        both = sorted(set(first) | set(second))
        new = _emit(gm, node, node.target, (inner.args[0], both, bool(ai["keepdim"] and ao["keepdim"])), node)
        out = new
        if tuple(_val(new).shape) != tuple(_val(node).shape):
            out = _emit(gm, node, aten.view.default, (new, list(_val(node).shape)), node)
        _replace(gm, node, out)
        gm.graph.erase_node(inner)
        return True

    @staticmethod
    def _softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
        """``e / sum(e, d, keepdim)`` with ``e = exp(x - amax(x, d, keepdim))`` or ``exp(x)`` -> ``softmax(x, d)``;
        ``y - log(sum(exp(y), d, keepdim))`` with ``y = x - amax(x, d, keepdim)`` (or ``x``) -> ``log_softmax``."""
        if is_op(node, aten.div) and len(node.args) == 2:
            e, s = node.args
            if not (is_op(e, aten.exp) and is_op(s, aten.sum) and s.args[0] is e):
                return False
            d = _single_keepdim(s)
            x = _unshifted(e.args[0], d)
            if d is None or x is None:
                return False
            new = _emit(gm, node, aten.softmax.int, (x, d), node)
            _replace(gm, node, new)
            return True
        if is_op(node, aten.sub) and len(node.args) == 2 and is_op(node.args[1], aten.log):
            y, s = node.args[0], node.args[1].args[0]
            if not (is_op(s, aten.sum) and is_op(s.args[0], aten.exp) and s.args[0].args[0] is y):
                return False
            d = _single_keepdim(s)
            x = _unshifted(y, d)
            if d is None or x is None:
                return False
            new = _emit(gm, node, aten._log_softmax.default, (x, d, False), node)
            _replace(gm, node, new)
            return True
        return False


def _single_keepdim(node: fx.Node) -> Optional[int]:
    """The one dim of a keepdim reduction, as a non-negative index; None otherwise."""
    a = args_of(node)
    val = _val(node.args[0])
    if val is None or not a.get("keepdim"):
        return None
    dims = _dims(a["dim"], val.dim())
    return dims[0] if len(dims) == 1 else None


def _unshifted(y: fx.Node, dim: int) -> Optional[fx.Node]:
    """``x`` for ``y = x - amax(x, dim, keepdim)`` (the shift softmax does not see), else ``y`` itself."""
    if is_op(y, aten.sub) and len(y.args) == 2 and is_op(y.args[1], aten.amax) and y.args[1].args[0] is y.args[0]:
        if _single_keepdim(y.args[1]) == dim:
            return y.args[0]
    return y if isinstance(y, fx.Node) else None
