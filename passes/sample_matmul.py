"""Per-sample matmuls -> the same matmul on per-sample padded dense tensors.

Channel attention sums over every token of a sample (``kᵀ @ v``: a ``(head_dim, head_dim)``
matrix per sample) and applies that matrix back to the tokens (``attn @ qᵀ``). Under masked-dense
semantics masked tokens are absent from the sum. Token operands are padded per sample with zero
rows (which add nothing to the sum) and laid out as the dense operand with its token axis replaced
by the padded one; the original ``matmul`` runs on them, and a token-valued result is unpadded.
"""

from __future__ import annotations

from typing import List, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, facts, peek
from greenmim_convert.compiler.layout import Layout, LayoutError
from greenmim_convert.runtime import ops

from .base import GreenPass, layout_of, sites_node


def dense_spec(lay: Layout, ndim: int) -> Tuple[Tuple, ...]:
    """Per dense axis: ``'b'``, ``'t'`` (the token axis) or the packed channel-digit indices it holds."""
    lay = lay.padded_to(ndim)
    chans = lay.channel_atoms()
    spec: List = []
    for ax in lay.axes:
        kinds = {a.kind for a in ax}
        if kinds & {"h", "w"}:
            spec.append(("t",))
        elif "b" in kinds:
            if len(ax) != 1:
                raise LayoutError("batch digit shares an axis with other digits")
            spec.append(("b",))
        else:
            spec.append(tuple(chans.index(a) for a in ax))
    return tuple(spec)


class SampleMatmulPass(GreenPass):
    name = "sample-matmul"
    description = "matmuls summing over a sample's tokens -> matmuls on per-sample padded tensors"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.SAMPLE_MATMULS})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if not peek(node).sample_matmul:
                continue
            out = layout_of(node)
            ndim = max(len(layout_of(a).axes) for a in node.args[:2])
            grid_lay = next(layout_of(a) for a in node.args[:2] if not layout_of(a).is_per_sample())
            sites = sites_node(gm, grid_lay)
            for arg in node.args[:2]:
                lay = layout_of(arg)
                sizes = tuple(a.size for a in lay.channel_atoms())
                with gm.graph.inserting_before(node):
                    dense = gm.graph.call_function(ops.to_padded_dense, (arg, sites, dense_spec(lay, ndim), sizes))
                node.replace_input_with(arg, dense)
            sizes = tuple(a.size for a in out.channel_atoms())
            with gm.graph.inserting_after(node):
                packed = gm.graph.call_function(
                    ops.from_padded_dense, (node, sites, dense_spec(out, len(out.axes)), sizes)
                )
            node.replace_all_uses_with(packed, delete_user_cb=lambda u: u is not packed)
            facts(packed).layout = out
            facts(node).layout = None
            self.report["per-sample padded matmul"] += 1
