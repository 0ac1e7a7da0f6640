"""Layout analysis: annotate every value computed from the images with its symbolic layout.

Values reachable from the image input (networkx reachability over the FX graph) are the ones that
become packed visible tokens; everything else (parameters, constant tables) stays as it is. Each
reachable node must be matched by one rule of ``LAYOUT_RULES``; the first node no rule understands
stops the conversion with an error naming it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import networkx as nx
import torch.fx as fx
import torch.nn.functional as F

from greenmim_convert.layout import Layout, LayoutError

from . import channel_attention, channel_split, conv, global_attention, patch_embed, pooling, tokenwise, window_attention, window_ops
from .base import GreenPass, context_of

LayoutRule = Callable[[fx.GraphModule, fx.Node], Optional[Layout]]

# (name, rule): the first rule returning a layout wins
LAYOUT_RULES: List[Tuple[str, LayoutRule]] = [
    ("patch-embed", patch_embed.layout_rule),
    ("conv", conv.layout_rule),
    ("pooling", pooling.layout_rule),
    ("spatial-mean", pooling.spatial_mean_rule),
    ("channel-split", channel_split.layout_rule),
    ("window-ops", window_ops.layout_rule),
    ("window-attention", window_attention.layout_rule),
    ("global-attention", global_attention.layout_rule),
    ("channel-attention", channel_attention.layout_rule),
    ("token-wise", tokenwise.layout_rule),
]


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph of node names (edges: producer -> user)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, target=str(getattr(node.target, "__name__", node.target)))
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def image_passthrough(node: fx.Node) -> bool:
    """Ops that leave the image as it is: zero padding (specialised to nothing) and copies."""
    src = node.args[0] if node.args else None
    if not (isinstance(src, fx.Node) and src.meta.get("image")):
        return False
    if node.op == "call_function" and node.target is F.pad:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        return not any(pads)
    return node.op == "call_method" and node.target in ("contiguous", "clone")


def _describe_failure(node: fx.Node) -> str:
    target = str(getattr(node.target, "__name__", node.target))
    target = target[2:] if target.startswith("m.") else target
    return f"no pass converts {node.op} '{target}' on visible tokens"


class LayoutAnalysisPass(GreenPass):
    name = "layout-analysis"
    description = "annotate values computed from the images with their symbolic layout"

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        reach = nx.descendants(to_networkx(gm.graph), ctx.images.name)
        ctx.images.meta["image"] = True
        for node in gm.graph.nodes:
            if node.name not in reach or node.op == "output":
                continue
            if image_passthrough(node):
                node.meta["image"] = node.meta["layout_op"] = True
                self.report["image-ops"] += 1
                continue
            for name, rule in LAYOUT_RULES:
                try:
                    lay = rule(gm, node)
                except LayoutError as exc:
                    self.fail(node, str(exc))
                if lay is not None:
                    node.meta["layout"] = lay
                    if name == "window-ops":
                        node.meta["layout_op"] = True
                    elif name == "token-wise" and node.op != "call_module":
                        node.meta["tokenwise"] = True
                    self.report[name] += 1
                    break
            else:
                module = ""
                if node.op == "call_module":
                    module = f" ({type(gm.get_submodule(node.target)).__name__})"
                self.fail(node, _describe_failure(node) + module)
