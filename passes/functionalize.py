"""In-place ATen ops (``add_``, ``bernoulli_``, ``div_``, ``relu_``) -> their out-of-place forms.

Export's training IR keeps in-place ops; on packed tokens a view is the same tensor, so mutation
would leak through layout ops that no longer copy. Each in-place op on a value computed from the
images (or from a fresh per-sample tensor: a drop-path draw) becomes its functional form and later
readers of the mutated value read the new node instead; a ``copy_`` over a whole tensor of the same shape
and dtype becomes its source, and a ``copy_`` into ``slice`` views of a tensor (``attn[:, :, 1:, 1:] = ...``)
becomes nested ``slice_scatter`` ops whose result later readers of the tensor read. In-place ops on
constants (masks filled slice by slice) stay: they run as written.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property

from .base import GreenPass, args_of, aten, context_of, graph_order, is_op
from .layout_analysis import image_values
from .tokenwise import creates_per_sample


def _functional(target):
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_") or not target._schema.arguments[0].alias_info:
        return None
    base = getattr(torch.ops.aten, name[:-1], None)
    if base is None:
        return None
    overload = target._overloadname
    if overload == "float" and name == "bernoulli_":
        return torch.ops.aten.bernoulli.p
    return getattr(base, overload, None) or getattr(base, "default", None)


def _same_tensor_type(a, b) -> bool:
    """Both values are tensors of the same shape and dtype (copying one over the other changes nothing else)."""
    va, vb = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in (a, b))
    return (
        isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype
    )


def _scatter_into_slices(gm: fx.GraphModule, node: fx.Node, order: dict) -> bool:
    """``copy_(base[slices], value)`` -> ``slice_scatter`` of ``value`` into ``base`` through every slice;
    readers of ``base`` after the copy read the result. False (nothing changed) when ``base`` is no tensor."""
    views, base = [], node.args[0]
    while is_op(base, aten.slice):
        views.append(base)
        base = base.args[0]
    if not isinstance(base.meta.get("val"), torch.Tensor) or not _same_tensor_type(node.args[0], node.args[1]):
        return False
    value = node.args[1]
    with gm.graph.inserting_before(node):
        for view in views:
            a = args_of(view)
            value = gm.graph.call_function(
                aten.slice_scatter.default, (view.args[0], value, a["dim"], a["start"], a["end"], a["step"])
            )
            value.meta["val"] = view.args[0].meta["val"]
            value.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
    for user in list(base.users):
        if order.get(user, -1) > order[node]:
            user.replace_input_with(base, value)
    gm.graph.erase_node(node)
    return True


def _per_sample_values(gm: fx.GraphModule) -> set:
    """Names of the nodes computed from a fresh per-sample tensor (``torch.rand((B, 1, 1)).ge_(p)``, LeViT's drop
    path): random values per sample, not constants, so their in-place ops become functional too."""
    batch = context_of(gm).trace_batch
    found: set = set()
    for node in gm.graph.nodes:
        if creates_per_sample(node, batch) or any(a.name in found for a in node.all_input_nodes):
            found.add(node.name)
    return found


class FunctionalizePass(GreenPass):
    name = "functionalize"
    description = "in-place ops -> out-of-place ops"
    ensures = frozenset({Property.FUNCTIONAL})

    def run(self, gm: fx.GraphModule) -> None:
        order = graph_order(gm.graph)
        images = next(n for n in gm.graph.nodes if n.op == "placeholder")
        reach = image_values(gm, images) | _per_sample_values(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not hasattr(node.target, "_schema") or node.name not in reach:
                continue  # constants (a seam mask filled slice by slice) keep their in-place ops, run as written
            if is_op(node, aten.copy_) and is_op(node.args[0], aten.slice) and _scatter_into_slices(gm, node, order):
                self.report["copy_ into slices -> slice_scatter"] += 1
                continue
            functional = _functional(node.target)
            if functional is None:
                continue
            mutated = node.args[0]
            bound = args_of(node)
            schema = node.target._schema
            node.args = tuple(bound[a.name] for a in schema.arguments if not a.kwarg_only)
            node.kwargs = {
                a.name: bound[a.name] for a in schema.arguments if a.kwarg_only and bound[a.name] is not None
            }
            node.target = functional
            for user in list(mutated.users):
                if user is not node and order.get(user, -1) > order[node]:
                    user.replace_input_with(mutated, node)
            self.report[f"{functional.__name__}"] += 1
            if functional is torch.ops.aten.copy.default and _same_tensor_type(node.args[1], node):
                node.replace_all_uses_with(node.args[1])  # a whole-tensor copy_ is its source
                gm.graph.erase_node(node)
                self.report["whole-tensor copy -> its source"] += 1
