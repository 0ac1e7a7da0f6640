"""Block masks among attention terms: a constant term that only separates regions of a window.

Shifted-window attention adds a mask that is 0 between tokens of one region of a window (tokens
that were neighbours before the cyclic roll) and very negative across regions. Such a term is
image- and parameter-independent, so it is evaluated once at conversion. When its entries are 0
or at most ``MASKED`` and the zeros form an equivalence relation in every window, the grouping
splits each window into those regions and the term is dropped: across regions the dense model's
softmax weight is below ``exp(MASKED)`` of the largest (about 2e-22), beneath float64 rounding.
Any other term stays a gathered term, exact.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.fx as fx

from greenmim_convert.runtime.plan.grouping import DigitWindows
from greenmim_convert.runtime.plan.terms import TermPlan, term_offsets

from .base import fetch_attr, graph_order, is_view

MASKED = -50.0


def _factory(node: fx.Node) -> bool:
    """``x.new_zeros(size)``-style ops read only the dtype and device of ``x``."""
    return node.op == "call_function" and str(getattr(node.target, "__name__", "")).startswith("new_")


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def evaluate_constant(gm: fx.GraphModule, node: fx.Node, random_parameters: bool = False) -> Optional[torch.Tensor]:
    """The value of a node computed from buffers and constants only (no Parameter, no input), or None.

    Its ancestors, and every view or in-place op that writes into them before ``node`` (a mask
    filled slice by slice), are copied into a small graph and run once. With ``random_parameters``
    a node that reads Parameters is evaluated too, each Parameter replaced by seeded random values:
    what is then equal along an axis is equal for any weights (a structural fact, not the weights' luck).
    """
    order = graph_order(gm.graph)
    keep = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in keep:
            continue
        keep.add(n)
        if n.op == "placeholder" or (
            n.op == "get_attr" and isinstance(fetch_attr(gm, n.target), torch.nn.Parameter) and not random_parameters
        ):
            return None
        todo.extend(n.all_input_nodes[1:] if _factory(n) else n.all_input_nodes)
        for user in n.users:
            if order[user] < order[node] and (_mutates(user) or is_view(user)):
                todo.append(user)
    graph = fx.Graph()
    env = {}
    for n in gm.graph.nodes:
        if n in keep and _factory(n) and n.args[0] not in keep:
            like = n.args[0].meta["val"]
            env[n.args[0]] = graph.call_function(torch.empty, (0,), {"dtype": like.dtype, "device": like.device})
        if n in keep:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[node])
    with torch.no_grad():
        if not random_parameters:
            return fx.GraphModule(gm, graph)().detach()
        gen = torch.Generator().manual_seed(0)
        root = torch.nn.Module()
        for n in graph.nodes:
            if n.op == "get_attr":
                value = fetch_attr(gm, n.target)
                if isinstance(value, torch.nn.Parameter):
                    value = torch.randn(value.shape, generator=gen, dtype=value.dtype).to(value.device)
                name = n.target.replace(".", "_")
                setattr(root, name, value)
                n.target = name
        return fx.GraphModule(root, graph)().detach()


_LABELS: dict = {}


def region_labels(value: torch.Tensor, plan: TermPlan, head_sizes, windows: DigitWindows) -> Optional[torch.Tensor]:
    """``(H, W)`` region label of every grid cell when ``value`` is a block mask on ``windows``; else None.

    Blocks of a stage carry equal masks: results are cached by the mask's content.
    """
    digest = hashlib.sha256(value.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()
    key = (plan, tuple(head_sizes), windows, tuple(value.shape), digest)
    if key not in _LABELS:
        if len(_LABELS) > 256:
            _LABELS.clear()
        _LABELS[key] = _region_labels(value, plan, head_sizes, windows)
    return _LABELS[key]


def _region_labels(value: torch.Tensor, plan: TermPlan, head_sizes, windows: DigitWindows) -> Optional[torch.Tensor]:
    if plan.head:
        return None
    h, w = windows.grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1)
    window = windows.digits(coords, windows.shared)
    position = windows.digits(coords, windows.token)
    order = torch.argsort(window * windows.area + position)
    count = windows.windows_per_sample
    members = order.view(count, windows.area)  # cells of every window, by position
    _, q, k = term_offsets(plan, head_sizes, coords, windows.grid, windows.offset)
    flat = value.double().reshape(-1)
    pairs = flat[q[members][:, :, None] + k[members][:, None, :]]  # (windows, area, area)
    zero = pairs == 0
    if not bool((zero | (pairs <= MASKED)).all()):
        return None
    first = zero.float().argmax(-1)  # smallest position each cell sees unmasked: its region's label
    if not bool((zero == (first[:, :, None] == first[:, None, :])).all()):
        return None
    labels = torch.empty(h * w, dtype=torch.long)
    labels[members.reshape(-1)] = first.reshape(-1)
    return labels.view(h, w)
