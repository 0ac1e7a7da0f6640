"""Shared pieces of the passes: the pass base class, the conversion context and graph helpers."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from greenmim_convert import ops
from greenmim_convert.errors import UnsupportedOperationError
from greenmim_convert.layout import Layout


@dataclass
class ConvertContext:
    """What every pass needs: sizes, options, the input nodes, and the per-grid site nodes it created."""

    img_size: Tuple[int, int]
    mask_unit: int
    trace_batch: int
    grouping: str = "dp"
    attention_backend: str = "auto"
    images: Optional[fx.Node] = None
    visible: Optional[fx.Node] = None
    site_nodes: Dict[Tuple, fx.Node] = field(default_factory=dict)
    grouping_nodes: Dict[Tuple, fx.Node] = field(default_factory=dict)
    grid_strides: set = field(default_factory=set)


def context_of(gm: fx.GraphModule) -> ConvertContext:
    return gm.meta["greenmim"]


def layout_of(node: Any) -> Optional[Layout]:
    """The symbolic layout of a node reachable from the images, or None for constants."""
    return node.meta.get("layout") if isinstance(node, fx.Node) else None


def sites_node(gm: fx.GraphModule, layout: Layout) -> fx.Node:
    """The (shared) node computing the visible sites of ``layout``'s grid."""
    ctx = context_of(gm)
    key = (layout.grid, layout.stride)
    if key not in ctx.site_nodes:
        with gm.graph.inserting_after(ctx.visible):
            ctx.site_nodes[key] = gm.graph.call_function(ops.visible_sites, (ctx.visible, layout.grid, layout.stride))
        ctx.grid_strides.add(layout.stride)
    return ctx.site_nodes[key]


def replace_with_call(gm: fx.GraphModule, node: fx.Node, fn: Any, args: Tuple) -> fx.Node:
    """Replace ``node`` by ``fn(*args)`` in place: same position, same meta (layout), same users."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def module_ref(gm: fx.GraphModule, target: str, before: fx.Node) -> fx.Node:
    """A get_attr node handing a submodule to a runtime op."""
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(target)


class GreenPass(PassBase):
    """A pass that counts what it rewrote; the counts form the conversion report."""

    name = "pass"
    description = ""

    def __init__(self):
        super().__init__()
        self.report: Counter = Counter()

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.report = Counter()
        self.run(gm)
        gm.graph.lint()
        return PassResult(gm, bool(self.report))

    def run(self, gm: fx.GraphModule) -> None:
        raise NotImplementedError

    @staticmethod
    def fail(node: fx.Node, reason: str) -> None:
        raise UnsupportedOperationError(reason, node)

