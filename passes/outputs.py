"""Outputs: choose the final value and the stage values, prune what follows, return VisibleTokens.

The final value is the captured features when they still hold visible tokens (a timm
``forward_features``, a backbone's ``forward``); for a classifier it is the last value before its
global reduction (the input of its global pool). Stage values are the captured stage modules'
outputs; for a model without ``stages=`` or timm's ``feature_info`` they are, at each feature grid, the last
output of the least deeply nested module computing on it.

Prefix tokens (a class token) are left out of every output, as timm's ``forward_intermediates`` leaves
them out of its feature maps. Every op the model's output depends on must be understood, the head past the final value
included: a classifier whose head has an op no rule knows fails rather than being cut short.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import networkx as nx
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, peek
from greenmim_convert.compiler.layout import Layout
from greenmim_convert.errors import ImageWideMixingError, UnsupportedOperationError
from greenmim_convert.runtime import ops

from .base import GreenPass, context_of, layout_of, sites_node
from .layout_analysis import to_networkx


def _covers(digits, size: int) -> bool:
    """The digits of one spatial kind number every position of a grid side once (a complete mixed radix)."""
    place = 1
    for a in sorted(digits, key=lambda a: a.inner):
        if a.inner != place:
            return False
        place *= a.size
    return place == size


def token_like(lay: Layout) -> bool:
    """One value per grid position: the spatial digits cover the grid in any order and grouping (rows and
    columns, or Hiera's unrolled order), channels one digit, no roll, no padded positions (a grid padded for
    windows is no feature map of the image)."""
    atoms = [a for ax in lay.axes for a in ax]
    spatial = [a for a in atoms if a.kind in "hw"]
    chans = [a for a in atoms if a.kind == "c"]
    grid_ok = bool(spatial) and all(_covers([a for a in spatial if a.kind == k], n) for k, n in zip("hw", lay.grid))
    return (
        grid_ok
        and len(chans) <= 1
        and all(a.inner == 1 for a in chans)
        and lay.offset == (0, 0)
        and not lay.is_pair()
        and not any(lay.border)
    )


def _channels_last(lay: Layout) -> bool:
    """A 4-D map holding its channels on the last axis (NHWC, as SAM 2's Hiera returns its maps)."""
    return len(lay.axes) == 4 and any(a.kind == "c" for a in lay.axes[3])


def _module_paths(node: fx.Node) -> List[str]:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def module_ends(gm: fx.GraphModule) -> Dict[str, int]:
    """Graph position of the last op of every source module."""
    ends: Dict[str, int] = {}
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_function":
            for path in _module_paths(n):
                ends[path] = i
    return ends


def _owner_at(node: fx.Node, at: int, ends: Dict[str, int]) -> str:
    """The outermost source module whose output is ``node``, the node at graph position ``at``; '' if none."""
    return next((p[2:] for p in _module_paths(node) if p.startswith("m.") and ends.get(p, -1) <= at), "")


def owning_module(gm: fx.GraphModule, node: fx.Node, ends: Optional[Dict[str, int]] = None) -> str:
    """The outermost source module whose output is ``node`` (no later node belongs to it); '' if none."""
    ends = module_ends(gm) if ends is None else ends
    return _owner_at(node, next(i for i, n in enumerate(gm.graph.nodes) if n is node), ends)


class OutputsPass(GreenPass):
    name = "outputs"
    description = "final and per-stage features -> VisibleTokens; the classifier head past them is dropped"
    requires = frozenset({Property.LAYOUTS})
    ensures = frozenset({Property.OUTPUTS})

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        values = list(out.args[0])
        graph = to_networkx(gm.graph)
        last = values[0]
        if layout_of(last) is None or not token_like(layout_of(last)):
            last = self._last_token_value(gm, graph, last)
        stages = values[1:] if not ctx.default_stages else self._default_stages(gm, graph, last)
        needed = set()
        for v in values + [last] + list(stages):
            needed |= set(nx.ancestors(graph, v.name)) | {v.name}
        for node, (where, reason) in ctx.failures.items():
            if node.name in needed:
                error = ImageWideMixingError if node in ctx.image_wide else UnsupportedOperationError
                raise error(reason, where)
        for s in stages:
            if layout_of(s) is None or not token_like(layout_of(s)):
                self.fail(
                    s, f"stage output is not a per-position feature map (layout {getattr(layout_of(s), 'shape', None)})"
                )
        ends = module_ends(gm)
        ctx.stage_paths = [owning_module(gm, s, ends) for s in stages]
        ctx.stage_strides = [layout_of(s).stride for s in stages]
        ctx.last_path = owning_module(gm, last, ends) if last is not values[0] else None
        ctx.output_fmt = "NHWC" if any(_channels_last(layout_of(v)) for v in list(stages) + [last]) else "NCHW"

        def wrap(node: fx.Node) -> fx.Node:
            lay = layout_of(node)
            with gm.graph.inserting_before(out):
                self.report["VisibleTokens"] += 1
                if lay.prefix:  # features of the grid positions: prefix tokens (a class token) are left out
                    node = gm.graph.call_function(ops.grid_rows, (node, ctx.visible, lay.prefix))
                    lay = replace(lay, prefix=0)
                    self.report["prefix tokens left out of the features"] += 1
                return gm.graph.call_function(ops.tokens, (node, sites_node(gm, lay)))

        with gm.graph.inserting_before(out):
            result = gm.graph.call_function(ops.green_output, (wrap(last), [wrap(s) for s in stages]))
        out.args = (result,)
        gm.graph.eliminate_dead_code()

    def _last_token_value(self, gm: fx.GraphModule, graph: nx.DiGraph, value: fx.Node) -> fx.Node:
        """The last value (graph order) holding visible tokens on which the model's output depends."""
        ctx = context_of(gm)
        ancestors = nx.ancestors(graph, value.name)
        found = None
        for node in gm.graph.nodes:
            if (
                node.name in ancestors
                and layout_of(node) is not None
                and token_like(layout_of(node))
                and not peek(node).pick
            ):
                found = node
        if found is None:
            first = next(iter(ctx.failures.values()), None)
            if first is not None:
                raise UnsupportedOperationError(first[1], first[0])
            self.fail(value, "the model's output does not depend on any value with visible tokens")
        return found

    def _default_stages(self, gm: fx.GraphModule, graph: nx.DiGraph, last: fx.Node) -> List[fx.Node]:
        """At each feature grid, finest first: the last value that is the output of a module nested least deep
        (a stage, not the first layer of the next stage's block that still runs on this grid); the last value
        computed at the grid when no module outputs one. Grids coarser than the final features' are no stages:
        what the final features read there is an intermediate (CvT's keys and values, projected at stride 2)."""
        ancestors = nx.ancestors(graph, last.name) | {last.name}
        ends = module_ends(gm)
        by_grid: Dict[tuple, Tuple[tuple, fx.Node]] = {}
        for i, node in enumerate(gm.graph.nodes):
            lay = layout_of(node)
            if node.name in ancestors and lay is not None and token_like(lay):
                owner = _owner_at(node, i, ends)
                if not owner and peek(node).layout_op:
                    continue
                rank = (0, -owner.count(".")) if owner else (-1, 0)  # module outputs first, shallowest first
                key = (lay.stride, lay.grid)
                if key not in by_grid or rank >= by_grid[key][0]:
                    by_grid[key] = (rank, node)
        final = layout_of(last).stride
        return [by_grid[k][1] for k in sorted(by_grid) if 1 < k[0] <= final]
