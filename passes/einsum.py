"""``einsum`` of two image values -> the permutes, views and ``bmm`` it stands for, so the layout rules see plain
matmuls.

An einsum between values computed from the images (``"bghid,bghjd->bghij"`` for the logits of an attention,
``"bghij,bghjd->bghid"`` for its output) is replaced by ATen's own decomposition of that equation, traced
at the node's concrete operand shapes. The attention and token-wise rules then recognise the result as
they recognise a hand-written ``q @ k.transpose(-2, -1)``. Ops rewritten: ``einsum``.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from greenmim_convert.compiler.annotations import Property, copy_meta

from .base import GreenPass, aten, is_op
from .layout_analysis import image_values


def _decomposition(equation: str, operands) -> fx.GraphModule:
    """The ATen graph of ``einsum(equation, operands)`` at the operands' shapes and dtypes (traced on meta tensors)."""
    metas = [torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for v in operands]
    return make_fx(lambda *xs: torch.ops.aten.einsum.default(equation, list(xs)))(*metas)


class EinsumPass(GreenPass):
    name = "einsum"
    description = "einsum on image values -> its permutes, views and bmm"
    requires = frozenset({Property.CANONICAL})
    ensures = frozenset({Property.EINSUMS_SPLIT})

    def run(self, gm: fx.GraphModule) -> None:
        images = next(n for n in gm.graph.nodes if n.op == "placeholder")
        reach = image_values(gm, images)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.einsum) or node.name not in reach:
                continue
            equation, operands = node.args[0], list(node.args[1])
            if sum(o.name in reach for o in operands) < 2:
                continue  # a product with a constant (a relative-position table) is left to the term rules
            sub = _decomposition(equation, [o.meta["val"] for o in operands])
            env: Dict[fx.Node, fx.Node] = {}
            inputs = iter(operands)
            with gm.graph.inserting_before(node):
                for inner in sub.graph.nodes:
                    if inner.op == "placeholder":
                        env[inner] = next(inputs)
                    elif inner.op == "output":
                        result = env[inner.args[0]]
                    else:
                        copy = gm.graph.node_copy(inner, lambda n: env[n])
                        copy.meta = {}
                        copy_meta(node, copy)
                        copy.meta["val"] = inner.meta["val"]
                        env[inner] = copy
            node.replace_all_uses_with(result)
            gm.graph.erase_node(node)
            self.report[f"einsum {equation.replace(' ', '')} -> bmm"] += 1
        gm.graph.lint()
        gm.recompile()
