"""Specialise the traced graph to the configured image size (constant folding of shape arithmetic).

timm's traced graphs compute sizes from ``x.shape`` (``%``, ``//``, slices by proxies, ``_assert``).
Running the graph once on fake example images (shapes only, no arithmetic) records every value; nodes whose result is not a tensor
and that depend only on tensor *shapes* are replaced by their value. Data-dependent scalars
(``.item()``, ``.tolist()``) are never folded.
"""
from __future__ import annotations

from typing import Any, Dict, Set

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .base import GreenPass

SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
SHAPE_METHODS = {"size", "dim"}


class ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each tensor's shape (``meta['shape']``) and each other value (``meta['value']``)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
            n.meta["dtype"] = result.dtype
        else:
            n.meta["value"] = result
        return result


def _is_shape_access(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] in SHAPE_ATTRS:
        return True
    return n.op == "call_method" and n.target in SHAPE_METHODS


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    return value


class SpecializePass(GreenPass):
    name = "specialize"
    description = "fold shape arithmetic and asserts for the configured image size"

    def __init__(self, example: torch.Tensor):
        super().__init__()
        self.example = example

    def run(self, gm: fx.GraphModule) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            example = mode.from_tensor(self.example)
            ShapeRecorder(gm).run(example, *([None] * (len(placeholders) - 1)))
        foldable: Set[fx.Node] = set()
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "output", "get_attr") or "value" not in n.meta:
                continue
            if isinstance(n.meta["value"], torch.nn.Module):
                continue
            inputs = n.all_input_nodes
            if _is_shape_access(n) or all(i in foldable for i in inputs):
                foldable.add(n)
        values: Dict[fx.Node, Any] = {n: _plain(n.meta["value"]) for n in foldable}
        for n in foldable:
            for user in list(n.users):
                if user in foldable:
                    continue
                user.args = fx.node.map_arg(user.args, lambda a: values[a] if a in values else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: values[a] if a in values else a)
        for n in reversed(list(gm.graph.nodes)):
            if n in foldable:
                gm.graph.erase_node(n)
                self.report["folded"] += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
