"""Token-wise ops pass through unchanged: one generic rule for every model.

Linear, norms over the channel axis, activations, dropout, residual adds and per-channel scales act
on each token independently, so they run as they are on the packed ``(T, C)`` features. Stochastic
depth is per *sample*, so timm's DropPath is the one sample-wise op rewritten here.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import activations as timm_activations

from greenmim_convert import ops
from greenmim_convert.layout import Atom, Layout, LayoutError, space_to_depth_plan

from .base import GreenPass, layout_of, module_ref, replace_with_call, sites_node

_NOT_ELEMENTWISE = {nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.PReLU}
ELEMENTWISE_MODULES = tuple(
    {
        cls
        for mod in (nn.modules.activation, timm_activations)
        for cls in vars(mod).values()
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in _NOT_ELEMENTWISE and cls is not nn.Module
    }
    | {nn.Dropout, nn.Identity, nn.AlphaDropout}
)
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.tanh, torch.sigmoid, torch.neg,
    F.gelu, F.relu, F.silu, F.dropout, F.hardswish, F.mish, F.leaky_relu,
}
ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "tanh", "sigmoid", "relu", "float", "to", "type_as"}


def _with_channels(lay: Layout, channels: int) -> Layout:
    return Layout(lay.axes[:-1] + ((Atom("c", channels),),), lay.grid, lay.stride, lay.offset)


def _channel_input(node: fx.Node, lay: Layout) -> Layout:
    """The layout a channel op sees: gathers low spatial digits first when the last axis holds them."""
    if lay.channel_last():
        return lay
    if lay.spatial_factor_in_last_axis() is not None:
        new, factor, plan = space_to_depth_plan(lay)
        node.meta["space_to_depth"] = (lay, new, factor, plan)
        return new
    raise LayoutError(f"op over the last axis of layout {lay.shape} whose last axis is not the channels")


def _broadcasts_per_channel(arg, lay: Layout) -> bool:
    """A constant that is one value, or one value per channel along the layout's channel axis."""
    if not isinstance(arg, fx.Node):
        return isinstance(arg, (int, float, bool)) or (isinstance(arg, torch.Tensor) and arg.numel() == 1)
    shape = arg.meta.get("shape")
    if shape is None:
        return False
    if not shape or all(s == 1 for s in shape):
        return True
    axis = lay.channel_axis()
    if axis is None or len(shape) > len(lay.axes):
        return False
    padded = (1,) * (len(lay.axes) - len(shape)) + tuple(shape)
    return all(s == 1 for i, s in enumerate(padded) if i != axis) and padded[axis] == lay.channels


def elementwise_layout(node: fx.Node) -> Optional[Layout]:
    """Layout of an elementwise op: packed operands must broadcast; constants must be per-channel.

    A per-sample operand (after a global reduction) broadcast against tokens is marked for
    expansion to the tokens of its sample.
    """
    packed = [a for a in node.all_input_nodes if layout_of(a) is not None]
    lays = [layout_of(a) for a in packed]
    out = lays[0]
    for lay in lays[1:]:
        out = out.broadcast(lay)
    if not out.is_per_sample() and any(lay.is_per_sample() for lay in lays):
        node.meta["sample_broadcast"] = True
    others = [a for a in list(node.args) + list(node.kwargs.values()) if not (isinstance(a, fx.Node) and layout_of(a) is not None)]
    if not all(_broadcasts_per_channel(a, out) or isinstance(a, (str, torch.dtype, type(None))) for a in others):
        raise LayoutError("elementwise op with a constant that varies over positions")
    return out


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """Output layout of a token-wise op, or None when ``node`` is not one."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        lay = layout_of(node.args[0])
        if isinstance(mod, (DropPath,) + ELEMENTWISE_MODULES):
            return lay
        if isinstance(mod, nn.Linear):
            return _with_channels(_channel_input(node, lay), mod.out_features)
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            return _channel_input(node, lay)
        return None
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        lay = _channel_input(node, layout_of(node.args[0]))
        if tuple(shape) != (lay.channels,):
            raise LayoutError(f"layer_norm over {tuple(shape)} is not over the channels")
        return lay
    if node.op == "call_function" and node.target is F.linear:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        if layout_of(weight) is not None or "shape" not in getattr(weight, "meta", {}):
            raise LayoutError("linear whose weight is computed from the images")
        return _with_channels(_channel_input(node, layout_of(node.args[0])), weight.meta["shape"][0])
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
        return elementwise_layout(node)
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        return elementwise_layout(node)
    return None


class TokenwisePass(GreenPass):
    name = "token-wise"
    description = "token-wise ops run unchanged on packed tokens; DropPath becomes per-sample"

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if "layout" not in node.meta or node.meta.get("layout_op"):
                continue
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                if isinstance(mod, DropPath):
                    sites = sites_node(gm, node.meta["layout"])
                    ref = module_ref(gm, node.target, node)
                    replace_with_call(gm, node, ops.drop_path, (node.args[0], sites, ref))
                    self.report["DropPath -> per-sample"] += 1
                elif isinstance(mod, (nn.Linear, nn.LayerNorm) + ELEMENTWISE_MODULES):
                    self.report[f"{type(mod).__name__} unchanged"] += 1
            elif node.meta.get("tokenwise"):
                if node.meta.get("sample_broadcast"):
                    self._expand_samples(gm, node)
                self._flatten_constants(gm, node)
                self.report[f"{getattr(node.target, '__name__', node.target)} unchanged"] += 1
        gm.recompile()

    def _expand_samples(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """Per-sample operands of ``node`` become one row per token of their sample."""
        sites = sites_node(gm, node.meta["layout"])
        for arg in node.all_input_nodes:
            lay = layout_of(arg)
            if lay is not None and lay.is_per_sample():
                with gm.graph.inserting_before(node):
                    expanded = gm.graph.call_function(ops.sample_to_tokens, (arg, sites))
                expanded.meta["layout"] = node.meta["layout"]
                node.replace_input_with(arg, expanded)
                self.report["per-sample value -> its tokens"] += 1

    def _flatten_constants(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """Per-channel constants shaped for the dense layout (``(1, C, 1, 1)``) become ``(C,)`` or scalars."""
        elementwise = node.target in ELEMENTWISE_FUNCTIONS if node.op == "call_function" else node.target in ELEMENTWISE_METHODS
        for arg in node.all_input_nodes if elementwise else ():
            shape = arg.meta.get("shape")
            if layout_of(arg) is not None or shape is None or len(shape) <= 1:
                continue
            with gm.graph.inserting_before(node):
                flat = gm.graph.call_method("reshape", (arg, (-1,) if max(shape) > 1 else ()))
            node.replace_input_with(arg, flat)
            self.report["per-channel constant flattened"] += 1
