"""Image-independent subgraphs whose intermediates outweigh their outputs -> recomputed in backward.

Some models compute a term of every attention from parameters alone: Swin V2's continuous position
bias runs a small MLP over every (query, key) offset pair of a window, MaxViT's relative MLP bias
the same. Such a subgraph (``linear``, ``relu``, ``dropout``, ... on parameters and buffers only) does
not shrink with the mask, so its saved intermediates (the MLP's hidden activations, ``pairs x
hidden``) can be a large share of a converted model's activation memory. Each connected subgraph of
ops that read no image-derived value is moved into its own ``torch.fx.GraphModule`` and called through
:func:`greenmim_convert.ops.recompute`, which keeps only its inputs (parameters, buffers) for backward
and runs it again when its gradient is needed. A training-mode ``dropout`` inside is split: its scaled keep mask is
drawn once in the forward, outside the subgraph, exactly as ``aten.dropout`` draws it, and enters as one more
input that the subgraph multiplies by, so the backward neither draws again nor pays the draw twice. Subgraphs whose
intermediates are
no larger than their outputs (a bias-table gather, a logit-scale ``exp``) stay.

A dense island (:mod:`.dense_island`: GC ViT's global-query generator) computes every position of its
maps from a scattered token map; outlined with its scatter, it keeps only the visible tokens it starts from,
and its dense intermediates are made again in backward.
"""

from __future__ import annotations

import math
import operator
from typing import Dict, List, Set

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, copy_meta, peek
from greenmim_convert.runtime import is_runtime_function, ops

from .base import GreenPass, graph_order, is_view, layout_of, set_fresh_attr


def _numel(node: fx.Node) -> int:
    """Elements of the tensor(s) a node produced at capture (0 when unknown or not a tensor)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return sum(math.prod(v.shape) for v in vals if isinstance(v, torch.Tensor))


def _constant_nodes(gm: fx.GraphModule) -> Set[fx.Node]:
    """call_function nodes computed from get_attr nodes only (parameters, buffers, stored constants)."""
    const: Set[fx.Node] = set()
    for node in gm.graph.nodes:
        runtime = is_runtime_function(node.target)
        if node.op != "call_function" or layout_of(node) is not None or runtime:
            continue
        inputs = node.all_input_nodes
        if inputs and all(n.op == "get_attr" or n in const for n in inputs):
            const.add(node)
    return const


def _island_nodes(gm: fx.GraphModule) -> Set[fx.Node]:
    """The ops of dense islands (``NodeFacts.dense``) and the scatters that make their dense inputs."""
    dense = {n for n in gm.graph.nodes if n.op == "call_function" and peek(n).dense}
    scatters = {n for n in gm.graph.nodes if n.target is ops.scatter_dense and n.users and set(n.users) <= dense}
    return dense | scatters


def _components(nodes: Set[fx.Node]) -> List[List[fx.Node]]:
    """Connected components of ``nodes`` (edges between members only), each in graph order."""
    parent: Dict[fx.Node, fx.Node] = {n: n for n in nodes}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for m in n.all_input_nodes:
            if m in nodes:
                parent[root(m)] = root(n)
    groups: Dict[fx.Node, List[fx.Node]] = {}
    for n in sorted(nodes, key=graph_order(next(iter(nodes)).graph).__getitem__ if nodes else None):
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def _is_training_dropout(node: fx.Node) -> bool:
    """``aten.dropout(x, p, train=True)`` with ``0 < p < 1``: the one random op whose draws move out of the subgraph."""
    return (
        node.target is torch.ops.aten.dropout.default
        and len(node.args) == 3
        and bool(node.args[2])
        and 0 < float(node.args[1]) < 1
        and isinstance(node.meta.get("val"), torch.Tensor)
    )


def _is_floating(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


class RecomputePass(GreenPass):
    name = "recompute"
    description = "image-independent subgraphs with large intermediates -> recomputed in backward"
    requires = frozenset({Property.NO_LAYOUT_OPS, Property.DENSE_ISLANDS})  # outlines the rewritten graph
    ensures = frozenset({Property.RECOMPUTED})

    def run(self, gm: fx.GraphModule) -> None:
        for comp in _components(_constant_nodes(gm)):
            members = set(comp)
            outputs = [n for n in comp if any(u not in members for u in n.users)]
            inner = sum(_numel(n) for n in comp if n not in outputs and not is_view(n))
            if not outputs or inner <= sum(_numel(n) for n in outputs):
                continue
            self._outline(gm, comp, outputs)
            self.report["subgraph recomputed in backward"] += 1
        for comp in _components(_island_nodes(gm)):
            members = set(comp)
            self._outline(gm, comp, [n for n in comp if any(u not in members for u in n.users)])
            self.report["dense island recomputed in backward"] += 1

    @staticmethod
    def _outline(gm: fx.GraphModule, comp: List[fx.Node], outputs: List[fx.Node]) -> None:
        """Move ``comp`` into a sub-GraphModule taking its inputs from outside it, called through ``ops.recompute``."""
        members = set(comp)
        inputs = [m for m in dict.fromkeys(i for n in comp for i in n.all_input_nodes) if m not in members]
        sub = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {m: sub.placeholder(m.name) for m in inputs}
        like = next((m for m in inputs if _is_floating(m)), None)  # the noise's dtype and device at run time
        drops = [n for n in comp if _is_training_dropout(n)] if like is not None else []
        noise_at: Dict[fx.Node, fx.Node] = {n: sub.placeholder(f"{n.name}_noise") for n in drops}
        for n in comp:
            if n in noise_at:
                env[n] = sub.call_function(torch.ops.aten.mul.Tensor, (env[n.args[0]], noise_at[n]))
            else:
                env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(tuple(env[n] for n in outputs))
        name = set_fresh_attr(gm, "recompute", fx.GraphModule(torch.nn.Module(), sub))
        pos = graph_order(gm.graph).__getitem__
        # where the first member ran (random draws keep their order) unless an input is defined later
        at = (
            comp[0]
            if all(pos(m) < pos(comp[0]) for m in inputs)
            else min((u for n in outputs for u in n.users if u not in members), key=pos)
        )
        with gm.graph.inserting_before(at):
            module = gm.graph.get_attr(name)
            noises = [
                gm.graph.call_function(ops.dropout_noise, (like, tuple(n.meta["val"].shape), n.args[1])) for n in drops
            ]
            call = gm.graph.call_function(ops.recompute, (module, *inputs, *noises))
            results = [gm.graph.call_function(operator.getitem, (call, k)) for k in range(len(outputs))]
        for out, res in zip(outputs, results):
            copy_meta(out, res)
            out.replace_all_uses_with(res)
        for n in reversed(comp):
            gm.graph.erase_node(n)
