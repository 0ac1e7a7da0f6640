"""Outputs: the graph returns VisibleTokens of the final features and of every stage."""
from __future__ import annotations

import torch.fx as fx

from greenmim_convert import ops
from greenmim_convert.layout import Layout

from .base import GreenPass, context_of, layout_of, sites_node


def token_like(lay: Layout) -> bool:
    """Spatial digits are whole rows and columns (any axis grouping), channels one digit, no roll."""
    atoms = [a for ax in lay.axes for a in ax]
    spatial = [a for a in atoms if a.kind in "hw"]
    chans = [a for a in atoms if a.kind == "c"]
    full = {a.kind: a for a in spatial if a.inner == 1 and a.size == lay.grid["hw".index(a.kind)]}
    grid_ok = all(g == 1 for g in lay.grid) or (len(spatial) == len(full) == sum(g > 1 for g in lay.grid))
    return grid_ok and len(chans) <= 1 and all(a.inner == 1 for a in chans) and lay.offset == (0, 0)


class OutputsPass(GreenPass):
    name = "outputs"
    description = "final and per-stage features -> VisibleTokens"

    def run(self, gm: fx.GraphModule) -> None:
        context_of(gm)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        last, stages = out.args[0]

        def wrap(node: fx.Node) -> fx.Node:
            lay = layout_of(node)
            if lay is None or not token_like(lay):
                self.fail(node, f"stage output is not a per-position feature map (layout {getattr(lay, 'shape', None)})")
            sites = sites_node(gm, lay)
            with gm.graph.inserting_before(out):
                self.report["VisibleTokens"] += 1
                return gm.graph.call_function(ops.tokens, (node, sites))

        with gm.graph.inserting_before(out):
            result = gm.graph.call_function(ops.green_output, (wrap(last), [wrap(s) for s in stages]))
        out.args = (result,)
        gm.recompile()
