"""Layout analysis: annotate every value computed from the images with its symbolic layout.

Values reachable from the image input (networkx reachability over the FX graph) are the ones that
become packed visible tokens; everything else (parameters, buffers, tables and masks computed from
them) stays as it is. Each reachable node must be matched by one layout rule, registered with
``@rules.layout`` by the pass modules and tried in priority order (``passes/rules.py``); the matching rule
records its layout and facts on ``facts(node)``. A node no rule understands is recorded; ``OutputsPass``
reports it unless it lies past the last value that still has visible tokens (the global pool and head of a
classifier).
"""

from __future__ import annotations

import operator
from typing import List

import networkx as nx
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, facts, peek
from greenmim_convert.compiler.layout import ImageWideError, LayoutError

from . import (
    attention,
    channel_split,
    conv,
    dense_island,
    grid_padding,
    layout_ops,
    patch_merging,
    pooling,
    position_einsum,
    prefix_tokens,
    tokenwise,
)
from .base import GreenPass, aten, context_of, is_op, layout_of, shape_of
from .rules import Rule, layout

# the modules whose layout rules analysis tries: importing them registers their rules
RULE_MODULES = (
    attention,
    channel_split,
    conv,
    dense_island,
    grid_padding,
    layout_ops,
    patch_merging,
    pooling,
    position_einsum,
    prefix_tokens,
    tokenwise,
)
# the registered rules in the order they are tried
LAYOUT_RULES: List[Rule] = layout.ordered()


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph of node names (edges: producer -> user)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, target=str(getattr(node.target, "__name__", node.target)))
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def image_passthrough(node: fx.Node) -> bool:
    """Ops that leave the image as it is: zero padding, copies and views of the same shape."""
    src = node.args[0] if node.args else None
    if not peek(src).image:
        return False
    if is_op(node, aten.pad, aten.constant_pad_nd):
        return not any(node.args[1]) or layout_ops.absorbed_pad(node) is not None
    if is_op(node, aten.contiguous, aten.clone, aten.alias, aten.detach):
        return True
    return is_op(node, aten.view, aten.reshape, aten._to_copy) and shape_of(node) == shape_of(src)


def image_values(gm: fx.GraphModule, images: fx.Node) -> set:
    """Names of the nodes whose value depends on the images' values (not only on their dtype or device)."""
    reach = {images.name}
    for node in gm.graph.nodes:
        if any(a.name in reach for a in node.all_input_nodes) and not constant_factory(gm, node):
            reach.add(node.name)
    reach.discard(images.name)
    return reach


def _descendants(node: fx.Node) -> set:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user not in out:
                out.add(user)
                todo.append(user)
    return out


def constant_factory(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``x.new_zeros(size)`` and friends whose size is not one value per sample: constants."""
    if not is_op(node, *tokenwise.FACTORIES):
        return False
    size = list(node.args[1]) if len(node.args) > 1 else []
    batch = gm.meta["greenmim"].trace_batch if "greenmim" in gm.meta else None
    return not (size and size[0] == batch and all(s == 1 for s in size[1:]))


def _describe_failure(node: fx.Node) -> str:
    target = str(getattr(node.target, "__name__", node.target))
    return f"no pass converts {target} on visible tokens"


class LayoutAnalysisPass(GreenPass):
    name = "layout-analysis"
    description = "annotate values computed from the images with their symbolic layout"
    requires = frozenset({Property.CANONICAL, Property.EINSUMS_SPLIT})
    ensures = frozenset({Property.LAYOUTS})

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        reach = image_values(gm, ctx.images)
        facts(ctx.images).image = True
        failed: dict = {}
        for node in gm.graph.nodes:
            created = tokenwise.per_sample_creation(node, ctx.trace_batch) if node.name not in reach else None
            if created is not None:
                facts(node).layout = created
                reach |= {n.name for n in _descendants(node)}
                self.report["per-sample creation"] += 1
                continue
            if node.name not in reach or node.op == "output":
                continue
            blocked = [a for a in node.all_input_nodes if a in failed]
            if blocked:
                failed[node] = failed[blocked[0]]
                continue
            if image_passthrough(node):
                found = facts(node)
                found.image = found.layout_op = True
                self.report["image-ops"] += 1
                continue
            if constant_factory(gm, node) or not any(
                layout_of(a) is not None or peek(a).image or a in failed for a in node.all_input_nodes
            ):
                continue  # reads only the dtype/device of image values: a constant
            picked = any(peek(a).pick is not None for a in node.all_input_nodes)
            if picked and not is_op(node, aten.slice, aten.select, aten.cat):
                failed[node] = (
                    node,
                    "a strided slice of the rows or the columns only is used by an op other than a "
                    "concatenation or a pick of the other axis",
                )
                continue
            try:
                lay, name = self._match(gm, node)
                if lay is not None and name not in ("grid-padding", "strided-pick"):
                    grid_padding.check_kept(node, lay)
            except LayoutError as exc:
                failed[node] = (node, str(exc))
                if isinstance(exc, ImageWideError):
                    ctx.image_wide.add(node)
                continue
            if lay is None:
                failed[node] = (node, _describe_failure(node))
                continue
            found = facts(node)
            found.layout = lay
            if name == "layout-ops":
                found.layout_op = True
            self.report["subsample" if found.subsample is not None else name] += 1
        failed.update(dense_island.settle(gm))
        ctx.failures = failed

    @staticmethod
    def _match(gm: fx.GraphModule, node: fx.Node):
        if node.op != "call_function":
            return None, None
        if node.target is operator.getitem:
            return channel_split.layout_rule(gm, node), "channel-split"  # the parts of a split: no other rule
        for rule in LAYOUT_RULES:
            lay = rule(gm, node)
            if lay is not None:
                return lay, rule.name
        return None, None
