"""Inline timm's notrace helper functions once their integer arguments are constants.

timm marks helpers such as ``window_reverse`` as leaves only because their integer arguments are
proxies during tracing. After specialisation they are plain layout code: tracing them again with the
constants baked in exposes their views and permutes to the layout analysis.
"""
from __future__ import annotations

import inspect

import torch.fx as fx
from timm.layers import get_notrace_functions
from torch.utils._pytree import tree_leaves

from .base import GreenPass


def _inline(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Replace a call of a notrace function by its traced body; False when it does not trace."""
    fn = node.target
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    bound.apply_defaults()
    consts = {k: v for k, v in bound.arguments.items() if not isinstance(v, fx.Node)}
    if any(isinstance(x, fx.Node) for v in consts.values() for x in tree_leaves(v)):
        return False
    try:
        sub = fx.symbolic_trace(fn, concrete_args=consts)
    except Exception:
        return False
    leaves = tree_leaves(list(bound.arguments.values()))
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(leaves) != len(placeholders):
        return False
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, leaves)))
    if isinstance(out, (list, tuple)) and len(out) == 1:
        out = out[0]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return True


class InlineFunctionsPass(GreenPass):
    name = "inline-functions"
    description = "inline timm notrace layout helpers (window_reverse, ...) with constant arguments"

    def run(self, gm: fx.GraphModule) -> None:
        notrace = set(f for f in get_notrace_functions() if callable(f))
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in notrace:
                if _inline(gm, node):
                    self.report[f"inlined {node.target.__name__}"] += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
