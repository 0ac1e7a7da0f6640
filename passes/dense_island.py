"""Dense islands: a per-sample map broadcast over the windows of a grid -> computed densely, read per token.

``repeat_interleave(m, R, dim=0)`` of a ``(B, mh, mw, C)`` map ``m`` (any order of its row, column
and channel axes) repeats each sample's map once per window: row ``b * R + r`` is sample ``b``'s map,
whatever the window ``r``, and its ``(i, j)`` position is read at in-window position ``(i, j)``
(GC ViT's global queries). Every window needs every position of ``m``, so the sub-graph that makes
``m`` from the token map of a grid (its *island*: the nodes whose every user lies inside it or is
such a broadcast) cannot run on visible positions. It runs densely: the token map is scattered
into a zero-filled dense map at the island's input (masked positions read as zeros, as a
convolution reads them), the island's own ATen ops run unchanged, and at the broadcast every
visible token of the grid reads the row of its sample and in-window position. The broadcast's
result then holds one value per grid position, a token layout, and attention treats it as any
other query.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import DenseIsland, Property, copy_meta, facts, forget, peek
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, context_of, graph_order, is_op, layout_of, sites_node

ORDER = {"b": 0, "h": 1, "w": 2, "c": 3}
SIZE_ARGS = ("size", "shape")


def is_broadcast(node: fx.Node) -> bool:
    """``repeat_interleave(x, R, dim=0)`` with an int ``R``: one copy of each sample per window."""
    if not is_op(node, aten.repeat_interleave) or "self_int" not in str(node.target):
        return False
    a = args_of(node)
    return isinstance(a["repeats"], int) and a["dim"] == 0


def whole_axes(lay: Layout) -> Optional[Tuple[int, ...]]:
    """For a layout whose axes are the sample, row, column and channel digits, one whole digit each (no roll):
    the order of those axes as indices into (b, h, w, c); None otherwise."""
    kinds = []
    for ax in lay.axes:
        if len(ax) != 1 or ax[0].inner != 1:
            return None
        kinds.append(ax[0].kind)
    if sorted(kinds) != ["b", "c", "h", "w"] or lay.offset != (0, 0):
        return None
    return tuple(ORDER[k] for k in kinds)


def island_of(consumer: fx.Node) -> Tuple[Set[fx.Node], List[fx.Node]]:
    """The nodes computing the broadcast map whose every user is inside (or a broadcast), and the
    image values outside that they read (the token maps the island starts from)."""
    seen, todo = set(), [consumer.args[0]]
    while todo:
        n = todo.pop()
        if n in seen or layout_of(n) is None:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    order = graph_order(consumer.graph)
    island: Set[fx.Node] = set()
    reached = {consumer.args[0]}
    for n in sorted(seen, key=order.__getitem__, reverse=True):
        if n in reached and n.op == "call_function" and all(u in island or is_broadcast(u) for u in n.users):
            island.add(n)
            reached.update(n.all_input_nodes)
    boundary = sorted(
        {a for n in island for a in n.all_input_nodes if a not in island and layout_of(a) is not None},
        key=order.__getitem__,
    )
    return island, boundary


@rules.layout("dense-island", priority=110)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    """The broadcast's layout: the grid of its island's token map, the repeat axis its window digits."""
    if not is_broadcast(node) or layout_of(node.args[0]) is None:
        return None
    src = layout_of(node.args[0])
    if whole_axes(src) is None or src.axes[0][0].kind != "b":
        raise LayoutError(
            f"repeat over samples of a value of layout {src.shape} that is no (sample, row, column, channel) map"
        )
    island, boundary = island_of(node)
    if node.args[0] not in island:
        raise LayoutError("a map broadcast over windows is also used per position: it cannot be computed densely")
    grids = {(layout_of(b).grid, layout_of(b).stride) for b in boundary}
    if len(grids) != 1 or any(whole_axes(layout_of(b)) is None for b in boundary):
        raise LayoutError("a map broadcast over windows is not computed from the token map of one grid")
    ((grid, stride),) = grids
    mh, mw = src.grid
    repeats = args_of(node)["repeats"]
    if grid[0] % mh or grid[1] % mw or repeats != (grid[0] // mh) * (grid[1] // mw):
        raise LayoutError(
            f"a {mh}x{mw} map repeated {repeats} times over samples does not tile in windows the "
            f"{grid[0]}x{grid[1]} grid of {', '.join(b.name for b in boundary)}, the values outside "
            "the ops that make only this map"
        )
    facts(node).dense_island = DenseIsland(island, boundary, whole_axes(src))
    windows = (Atom("b", src.axes[0][0].size), Atom("h", grid[0] // mh, mh), Atom("w", grid[1] // mw, mw))
    return Layout((windows,) + src.axes[1:], grid, stride)


def settle(gm: fx.GraphModule) -> Dict[fx.Node, Tuple[fx.Node, str]]:
    """After layout analysis: island nodes lose what analysis recorded on them (no pass rewrites them) and are
    marked dense. Returns failures: an island op whose size argument fixes the traced batch (islands run at any
    batch)."""
    batch = context_of(gm).trace_batch
    failures: Dict[fx.Node, Tuple[fx.Node, str]] = {}
    for node in gm.graph.nodes:
        found = peek(node).dense_island
        if found is None:
            continue
        for n in found.nodes:
            if peek(n).dense:
                continue
            forget(n, dense=True)
            if (
                n.op == "call_function"
                and hasattr(n.target, "_schema")
                and any(
                    k in SIZE_ARGS and isinstance(v, (list, tuple)) and v and v[0] == batch
                    for k, v in args_of(n).items()
                )
            ):
                failures[node] = (
                    n,
                    "an op computed densely (it makes a map broadcast over windows) has the traced "
                    "batch size in its size argument",
                )
    return failures


class DenseIslandPass(GreenPass):
    name = "dense-island"
    description = (
        "per-sample maps broadcast over windows -> computed densely from a scattered token map, read per token"
    )
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.DENSE_ISLANDS})

    def run(self, gm: fx.GraphModule) -> None:
        scattered: Dict[fx.Node, fx.Node] = {}
        for node in list(gm.graph.nodes):
            found = peek(node).dense_island
            if found is None:
                continue
            island, boundary, perm = found
            for b in boundary:
                if b not in scattered:
                    lay = layout_of(b)
                    with gm.graph.inserting_after(b):
                        scattered[b] = gm.graph.call_function(
                            ops.scatter_dense, (b, sites_node(gm, lay), whole_axes(lay))
                        )
                    self.report["token map -> dense map"] += 1
                for n in island:
                    n.replace_input_with(b, scattered[b])
            src = node.args[0]
            lay = layout_of(node)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(ops.gather_window_map, (src, sites_node(gm, lay), _dense_order(perm)))
            copy_meta(node, new, dense_island=None)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.report["map broadcast over windows -> per-token rows"] += 1


def _dense_order(perm: Sequence[int]) -> Tuple[int, ...]:
    """The permutation taking a dense tensor whose axes hold (b, h, w, c) in the order ``perm`` to (b, h, w, c)."""
    return tuple(perm.index(k) for k in range(4))
