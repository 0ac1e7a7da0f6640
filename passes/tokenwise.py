"""Token-wise ops run unchanged on packed ``(rows, C)`` tensors: one generic rule for every model.

``linear`` and ``layer_norm`` over the channels (or over the minor channel digits of every head), ``batch_norm`` (in
training mode its statistics
are taken over the visible tokens of the batch, and update the running statistics: the sparse
BatchNorm of SparK and FCMAE), elementwise ops (activations, residual adds,
per-channel scales, dropout, dtype casts), and reductions or softmax over channel digits act on
each token (or each sample) on its own. Operands of an elementwise op may hold different channel
digits (a per-head norm against per-head features), be per-sample values (a global mean, a
drop-path keep mask), constants shaped for the dense layout (``(1, C, 1, 1)``) or constants that
vary over positions (a position embedding, read at the visible tokens): the pass views,
gathers and reshapes them so the op broadcasts on packed rows exactly as it did densely. A random
tensor of one value per sample (``new_empty((B, 1, 1)).bernoulli_``, stochastic depth) stays one
value per sample.
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import List, Optional, Sequence

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, SpaceToDepth, copy_meta, facts, peek
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError, space_to_depth_plan
from greenmim_convert.runtime import ops

from . import rules
from .base import (
    GreenPass,
    args_of,
    aten,
    constant,
    context_of,
    emit_call,
    is_op,
    layout_of,
    replace_with_call,
    shape_of,
    sites_node,
)

UNARY = (
    aten.gelu,
    aten.relu,
    aten.silu,
    aten.sigmoid,
    aten.tanh,
    aten.hardswish,
    aten.hardsigmoid,
    aten.mish,
    aten.leaky_relu,
    aten.elu,
    aten.exp,
    aten.log,
    aten.sqrt,
    aten.rsqrt,
    aten.abs,
    aten.neg,
    aten.erf,
    aten.clamp,
    aten.clamp_min,
    aten.clamp_max,
    aten.hardtanh,
    aten.softplus,
    aten.reciprocal,
    aten.square,
    aten.dropout,
    aten.bernoulli,
    aten._to_copy,
    aten.to,
    aten.type_as,
    aten.pow,
    aten.sign,
    aten.relu6,
    aten.floor,
    aten.ceil,
    aten.round,
    aten.trunc,
    aten.frac,
    aten.logical_not,
    aten.bitwise_not,
)
BINARY = (
    aten.add,
    aten.sub,
    aten.mul,
    aten.div,
    aten.maximum,
    aten.minimum,
    aten.where,
    aten.rsub,
    aten.addcmul,
    aten.addcdiv,
    aten.lerp,
    aten.lt,
    aten.le,
    aten.gt,
    aten.ge,
    aten.eq,
    aten.ne,
    aten.logical_and,
    aten.logical_or,
    aten.floor_divide,
    aten.remainder,
    aten.fmod,
)
IN_PLACE = (aten.add_, aten.sub_, aten.mul_, aten.div_, aten.bernoulli_, aten.clamp_, aten.relu_, aten.fill_)
ELEMENTWISE = UNARY + BINARY + IN_PLACE
CREATION = (aten.empty, aten.zeros, aten.ones, aten.full, aten.rand, aten.randn)
CHANNEL_REDUCTIONS = (aten.linalg_vector_norm, aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std)
FACTORIES = (aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full)


def _minor_channel_axis(lay: Layout) -> Optional[int]:
    """Size of the last axis when it holds the least significant channel digits, in packed order (a per-head
    head_dim axis with the heads on another axis); else None."""
    last = list(lay.axes[-1]) if lay.axes else []
    chans = lay.channel_atoms()
    if not last or any(a.kind != "c" for a in last) or chans[len(chans) - len(last) :] != last:
        return None
    return prod(a.size for a in last)


def _with_channels(lay: Layout, channels: int) -> Layout:
    return replace(lay, axes=lay.axes[:-1] + ((Atom("c", channels),),))


def channel_input(node: fx.Node, lay: Layout) -> Layout:
    """The layout an op over the last axis sees: gathers low spatial digits first when that axis holds them."""
    if lay.channel_last():
        return lay
    if lay.spatial_factor_in_last_axis() is not None:
        new, factor, plan = space_to_depth_plan(lay)
        facts(node).space_to_depth = SpaceToDepth(lay, new, factor, plan)
        return new
    last = lay.axes[-1] if lay.axes else ()
    if last and set(last) == set(lay.channel_atoms()):
        signature = lay.channel_atoms()
        columns = torch.arange(lay.channels).view([a.size for a in signature])
        order = columns.permute([signature.index(a) for a in last]).reshape(-1).tolist()
        facts(node).channel_permute = tuple(order)  # heads moved behind head_dim: columns in the axis' order
        return replace(lay, axes=lay.axes[:-1] + ((Atom("c", lay.channels),),))
    raise LayoutError(f"op over the last axis of layout {lay.shape}, which does not hold exactly the channels")


def _constant_ok(arg, out: Layout) -> bool:
    """A constant that is a number, or varies along channel and position digits (not samples) of the output."""
    if not isinstance(arg, fx.Node):
        return True
    shape = shape_of(arg)
    if shape is None:
        return True
    if len(shape) > len(out.axes):
        return False
    padded = (1,) * (len(out.axes) - len(shape)) + tuple(shape)
    prefixed = out.prefixed_axes()
    for i, (size, ax) in enumerate(zip(padded, out.axes)):
        if size != 1 and (size != prod(a.size for a in ax) + prefixed.get(i, 0) or any(a.kind == "b" for a in ax)):
            return False
    return True


def _prefixed_axis(arg: fx.Node, out: Layout) -> Optional[int]:
    """The axis holding prefix tokens along which the constant ``arg`` varies (a position embedding with a
    position for the class token too), or None."""
    shape = shape_of(arg) or ()
    padded = (1,) * (len(out.axes) - len(shape)) + tuple(shape)
    return next((axis for axis in out.prefixed_axes() if padded[axis] != 1), None)


def elementwise_layout(node: fx.Node) -> Layout:
    """Broadcast layout of an elementwise op; constants must vary along channels only."""
    packed = [a for a in node.all_input_nodes if layout_of(a) is not None]
    out = layout_of(packed[0])
    for a in packed[1:]:
        out = out.broadcast(layout_of(a))
    if out.is_pair():
        return out
    for a in node.all_input_nodes:
        if layout_of(a) is None and not _constant_ok(a, out):
            raise LayoutError(f"elementwise op with a constant of shape {shape_of(a)} that varies between samples")
    out.check_packed()
    return out


def _reduced_axes(node: fx.Node, lay: Layout) -> Optional[List[int]]:
    dims = args_of(node).get("dim")
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted({d % len(lay.axes) for d in dims})


def channel_reduction_layout(node: fx.Node, lay: Layout) -> Optional[Layout]:
    """Reduction over axes holding channel digits only (a per-head norm): None when spatial axes are reduced."""
    axes = _reduced_axes(node, lay)
    if not axes or any(a.kind != "c" for i in axes for a in lay.axes[i]):
        return None
    keep = bool(args_of(node).get("keepdim"))
    out = tuple(() if i in axes else ax for i, ax in enumerate(lay.axes) if keep or i not in axes)
    return replace(lay, axes=out)


def _softmax_channel_layout(node: fx.Node, lay: Layout) -> Layout:
    dim = args_of(node)["dim"] % len(lay.axes)
    if not lay.axes[dim]:
        return lay  # over a size-one axis: per token
    if len(lay.axes[dim]) != 1 or lay.axes[dim][0].kind != "c":
        raise LayoutError("softmax over an axis that is not one channel digit")
    return lay


def _per_sample_factory(node: fx.Node, lay: Layout, batch: int) -> Layout:
    """``x.new_empty((B, 1, ..., 1))``: one value per sample of ``x``."""
    size = list(args_of(node)["size"])
    b = [a for ax in lay.axes for a in ax if a.kind == "b"]
    if not size or size[0] != batch or any(s != 1 for s in size[1:]) or len(b) != 1:
        raise LayoutError(
            f"tensor factory of size {tuple(size)} from image features (only (batch, 1, ...) per-sample tensors are "
            f"supported)"
        )
    return Layout(((b[0],),) + ((),) * (len(size) - 1), lay.grid, lay.stride)


def creates_per_sample(node: fx.Node, batch: int) -> bool:
    """``torch.empty((B, 1, ..., 1))`` and friends (``torch.rand`` of stochastic depth): one fresh value per sample."""
    if not is_op(node, *CREATION):
        return False
    size = list(node.args[0]) if node.args and isinstance(node.args[0], (list, tuple)) else []
    return bool(size) and size[0] == batch and all(s == 1 for s in size[1:])


def per_sample_creation(node: fx.Node, batch: int) -> Optional[Layout]:
    """The layout of a fresh tensor of one value per sample (``creates_per_sample``), or None."""
    if not creates_per_sample(node, batch):
        return None
    size = list(node.args[0])
    facts(node).per_sample_creation = True
    return Layout(((Atom("b", batch),),) + ((),) * (len(size) - 1), (1, 1), 1)


@rules.layout("token-wise", priority=120)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """Output layout of a token-wise op, or None when ``node`` is not one."""
    if node.op != "call_function" or not hasattr(node.target, "_schema"):
        return None
    src = node.args[0] if node.args else None
    if is_op(node, aten.linear):
        a = args_of(node)
        if layout_of(a["weight"]) is not None:
            raise LayoutError("linear whose weight is computed from the images")
        return _with_channels(channel_input(node, layout_of(src)), shape_of(a["weight"])[0])
    if is_op(node, aten.batch_norm):
        lay = layout_of(src)
        if lay.channel_axis() != 1:
            raise LayoutError(f"batch_norm over axis 1 of layout {lay.shape}, which does not hold exactly the channels")
        return lay
    if is_op(node, aten.layer_norm):
        lay = layout_of(src)
        minor = _minor_channel_axis(lay)
        if minor is not None and tuple(args_of(node)["normalized_shape"]) == (minor,) and minor != lay.channels:
            facts(node).minor_norm = minor  # per head: the norm of the minor channel digits of every head
            return lay
        lay = channel_input(node, lay)
        if tuple(args_of(node)["normalized_shape"]) != (lay.channels,):
            raise LayoutError(f"layer_norm over {tuple(args_of(node)['normalized_shape'])} is not over the channels")
        return lay
    if is_op(node, *FACTORIES) and layout_of(src) is not None:
        facts(node).per_sample_factory = True
        return _per_sample_factory(node, layout_of(src), context_of(gm).trace_batch)
    if is_op(node, *ELEMENTWISE) and any(layout_of(a) is not None for a in node.all_input_nodes):
        facts(node).elementwise = True
        return elementwise_layout(node)
    if is_op(node, *CHANNEL_REDUCTIONS) and layout_of(src) is not None:
        out = channel_reduction_layout(node, layout_of(src))
        if out is not None:
            facts(node).channel_reduction = True
        return out
    if (
        is_op(node, aten.softmax, aten._softmax, aten.log_softmax)
        and layout_of(src) is not None
        and not layout_of(src).is_pair()
    ):
        facts(node).channel_reduction = True
        return _softmax_channel_layout(node, layout_of(src))
    return None


def _sizes(lay: Layout, signature: Sequence[Atom]) -> List[int]:
    have = {a for ax in lay.axes for a in ax if a.kind == "c"}
    return [a.size if a in have else 1 for a in signature]


def _constant_atoms(arg: fx.Node, out: Layout) -> List[Atom]:
    """The output's digits along which a dense-shaped constant varies (all channel digits, see ``_constant_ok``)."""
    shape = shape_of(arg) or ()
    padded = (1,) * (len(out.axes) - len(shape)) + tuple(shape)
    return [a for size, ax in zip(padded, out.axes) if size != 1 for a in ax]


def _constant_strides(arg: fx.Node, out: Layout) -> List[tuple]:
    """``(atom, stride)`` of every digit of the output along which the constant varies."""
    shape = shape_of(arg) or ()
    padded = (1,) * (len(out.axes) - len(shape)) + tuple(shape)
    dim_strides, place = [], 1
    for size in reversed(padded):
        dim_strides.append(place)
        place *= size
    out_list = []
    for size, stride, ax in zip(padded, reversed(dim_strides), out.axes):
        if size == 1:
            continue
        within = 1
        for a in reversed(ax):
            out_list.append((a, stride * within))
            within *= a.size
    return out_list


def _gather_position_constant(
    gm: fx.GraphModule, node: fx.Node, arg: fx.Node, out: Layout, split_channels: bool
) -> fx.Node:
    """Nodes reading a position-dependent constant (a position embedding) at every visible token."""
    strides = _constant_strides(arg, out)
    spatial = tuple((a.kind, a.size, a.inner, st) for a, st in strides if a.kind in "hw")
    found = {a: st for a, st in strides if a.kind == "c"}
    signature = out.channel_atoms()
    columns = torch.zeros(1, dtype=torch.long)
    for a in signature:
        columns = (columns[:, None] + torch.arange(a.size) * found.get(a, 0)).reshape(-1)
    with gm.graph.inserting_before(node):
        offsets = constant(gm, columns, node, "position_columns")
        x = gm.graph.call_function(ops.gather_constant, (arg, sites_node(gm, out), spatial, out.offset, offsets))
        if split_channels:
            x = gm.graph.call_function(aten.reshape.default, (x, [-1] + [a.size for a in signature]))
    return x


def _pack_constant(gm: fx.GraphModule, node: fx.Node, arg: fx.Node, out: Layout, split_channels: bool) -> fx.Node:
    """Nodes turning a dense-shaped per-channel constant into packed column order: ``(1, C)`` or ``(1, *digits)``."""
    atoms = _constant_atoms(arg, out)
    if any(a.kind in "hw" for a in atoms):
        return _gather_position_constant(gm, node, arg, out, split_channels)
    signature = out.channel_atoms()
    perm = sorted(range(len(atoms)), key=lambda i: -atoms[i].inner)
    sizes = _sizes(Layout((tuple(atoms),), out.grid, out.stride), signature)
    final = [1] + (sizes if split_channels else [prod(sizes)])
    with gm.graph.inserting_before(node):
        x = gm.graph.call_function(aten.reshape.default, (arg, [a.size for a in atoms] or [1]))
        if perm != list(range(len(perm))):
            x = gm.graph.call_function(aten.permute.default, (x, perm))
        return gm.graph.call_function(aten.reshape.default, (x, final))


def _pack_prefixed_constant(gm: fx.GraphModule, node: fx.Node, arg: fx.Node, out: Layout, axis: int) -> fx.Node:
    """A constant over a token axis holding prefix tokens, as packed rows ``(rows, C)``: its grid part read at
    the visible tokens, then each sample's copy of its prefix part (always visible)."""
    count = out.prefixed_axes()[axis]
    grid = out.without_prefix(axis)
    if {a for a in _constant_atoms(arg, grid) if a.kind == "c"} != set(grid.channel_atoms()):
        raise LayoutError(
            f"constant of shape {shape_of(arg)} over prefix and grid tokens that does not vary along every channel"
        )
    shape = shape_of(arg)
    dim = axis - (len(out.axes) - len(shape))
    part = emit_call(gm, node, aten.slice.Tensor, (arg, dim, count, shape[dim]))
    rows = _pack_constant(gm, node, part, grid, split_channels=False)
    tokens = [
        _pack_constant(gm, node, emit_call(gm, node, aten.slice.Tensor, (arg, dim, j, j + 1)), grid, False)
        for j in range(count)
    ]
    visible = context_of(gm).visible
    with gm.graph.inserting_before(node):
        own = gm.graph.call_function(aten.cat.default, (tokens,))
        own = gm.graph.call_function(ops.constant_prefix_rows, (own, 0, 1, visible))
        return gm.graph.call_function(ops.join_prefix, (rows, [own], visible))


class TokenwisePass(GreenPass):
    name = "token-wise"
    description = "token-wise ops run unchanged on packed tokens; per-sample values broadcast to their tokens"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.TOKENWISE})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            found = peek(node)
            if found.layout is None or found.layout_op or found.layout.is_pair():
                continue
            if found.per_sample_factory:
                self._per_sample_factory(gm, node)
            elif found.per_sample_creation:
                ctx = context_of(gm)
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(
                        ops.per_sample_creation, (node.target, ctx.visible, tuple(node.args[1:]), dict(node.kwargs))
                    )
                copy_meta(node, new)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                self.report["per-sample random tensor"] += 1
            elif is_op(node, aten.dropout) and not (args_of(node)["p"] and args_of(node)["train"]):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                self.report["dropout that keeps everything removed"] += 1
            elif found.elementwise:
                self._elementwise(gm, node)
            elif found.channel_reduction:
                self._channel_op(gm, node)
            elif found.minor_norm is not None:
                self._minor_norm(gm, node)
            elif is_op(node, aten.linear, aten.layer_norm, aten.batch_norm):
                if found.channel_permute is not None:
                    with gm.graph.inserting_before(node):
                        reordered = gm.graph.call_function(ops.channel_gather, (node.args[0], found.channel_permute))
                    node.replace_input_with(node.args[0], reordered)
                    self.report["channels reordered"] += 1
                self.report[f"{node.target.__name__.split('.')[0]} unchanged"] += 1

    def _minor_norm(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """``layer_norm`` over the minor channel digits: packed rows viewed as ``(rows * groups, minor)``."""
        channels = layout_of(node).channels
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(aten.reshape.default, (node.args[0], [-1, peek(node).minor_norm]))
        node.replace_input_with(node.args[0], rows)
        with gm.graph.inserting_after(node):
            flat = gm.graph.call_function(aten.reshape.default, (node, [-1, channels]))
        node.replace_all_uses_with(flat, delete_user_cb=lambda u: u is not flat)
        facts(flat).layout = layout_of(node)
        self.report["layer_norm over the minor channel digits (per head)"] += 1

    def _per_sample_factory(self, gm: fx.GraphModule, node: fx.Node) -> None:
        sites = sites_node(gm, layout_of(node))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                ops.per_sample_factory, (node.target, node.args[0], sites, tuple(node.args[2:]), dict(node.kwargs))
            )
        copy_meta(node, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.report["per-sample random tensor"] += 1

    def _elementwise(self, gm: fx.GraphModule, node: fx.Node) -> None:
        out = layout_of(node)
        for arg in [a for a in node.all_input_nodes if layout_of(a) is None]:
            axis = _prefixed_axis(arg, out)
            if axis is not None:
                rows = _pack_prefixed_constant(gm, node, arg, out, axis)
                facts(rows).layout = out
                node.replace_input_with(arg, rows)
                self.report["position constant over prefix tokens -> prefix rows + visible grid rows"] += 1
        signature = out.channel_atoms()
        full = [a.size for a in signature]
        constants = [a for a in node.all_input_nodes if layout_of(a) is None and prod(shape_of(a) or (1,)) > 1]
        packed = [a for a in node.all_input_nodes if layout_of(a) is not None]
        const_sizes = [
            _sizes(Layout((tuple(_constant_atoms(c, out)),), out.grid, out.stride), signature) for c in constants
        ]
        split = any(_sizes(layout_of(a), signature) != full for a in packed) or any(
            s != full for s in const_sizes if prod(s) > 1 or len(full) > 1
        )
        for arg in constants:
            node.replace_input_with(arg, _pack_constant(gm, node, arg, out, split))
            positional = any(a.kind in "hw" for a in _constant_atoms(arg, out))
            self.report[
                "position constant gathered at visible tokens" if positional else "per-channel constant packed"
            ] += 1
        if self._mul_per_sample(gm, node, packed, constants, split):
            return
        for arg in packed:
            lay, new = layout_of(arg), arg
            if lay.is_per_sample() and not out.is_per_sample():
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(ops.sample_to_tokens, (new, sites_node(gm, out)))
                self.report["per-sample value -> its tokens"] += 1
            if split:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(aten.reshape.default, (new, [-1] + _sizes(lay, signature)))
            if new is not arg:
                node.replace_input_with(arg, new)
        if split:
            with gm.graph.inserting_after(node):
                flat = gm.graph.call_function(aten.reshape.default, (node, [-1, prod(full)]))
            node.replace_all_uses_with(flat, delete_user_cb=lambda u: u is not flat)
            facts(flat).layout = out
        self.report[f"{str(node.target).split('.')[1]} unchanged"] += 1

    def _mul_per_sample(self, gm: fx.GraphModule, node: fx.Node, packed: list, constants: list, split: bool) -> bool:
        """``aten.mul`` of tokens by a per-sample value -> ``ops.mul_per_sample`` (keeps the ``(B, C)`` factor for
        backward instead of its copy at every token); False when ``node`` is not such a product."""
        if not is_op(node, aten.mul) or split or constants or len(node.args) != 2 or node.kwargs or len(packed) != 2:
            return False
        per_sample = [a for a in node.args if layout_of(a).is_per_sample()]
        if layout_of(node).is_per_sample() or len(per_sample) != 1 or node.args[0] is node.args[1]:
            return False
        tokens = node.args[1] if per_sample[0] is node.args[0] else node.args[0]
        replace_with_call(gm, node, ops.mul_per_sample, (tokens, per_sample[0], sites_node(gm, layout_of(node))))
        self.report["token x per-sample value"] += 1
        return True

    def _channel_op(self, gm: fx.GraphModule, node: fx.Node) -> None:
        src = node.args[0]
        lay = layout_of(src)
        signature = lay.channel_atoms()
        dims = (
            _reduced_axes(node, lay)
            if not is_op(node, aten.softmax, aten._softmax, aten.log_softmax)
            else [args_of(node)["dim"] % len(lay.axes)]
        )
        positions = [1 + signature.index(a) for i in dims for a in lay.axes[i]]
        out_sizes = [a.size for a in layout_of(node).channel_atoms()]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                ops.channel_op,
                (
                    node.target,
                    src,
                    [a.size for a in signature],
                    positions,
                    {k: v for k, v in args_of(node).items() if k not in ("self", "input", "dim")},
                    prod(out_sizes),
                ),
            )
        copy_meta(node, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.report[f"{str(node.target).split('.')[1]} over channel digits"] += 1
