"""Shared pieces of the passes: the pass base class, the conversion context and ATen-graph helpers."""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from greenmim_convert.compiler.annotations import Property, copy_meta, peek
from greenmim_convert.compiler.layout import Layout, LayoutError
from greenmim_convert.errors import UnsupportedOperationError
from greenmim_convert.runtime import plan as planner

aten = torch.ops.aten


@dataclass(frozen=True)
class PickedGrid:
    """A grid whose cell ``j`` is the cell ``j * factor + offset`` of the ``fine`` grid (its layout's grid and stride)
    where the step does not tile that grid: its sites are the fine sites it picks (``planner.picked_sites``), not
    cells of mask units."""

    fine: Layout
    factor: Tuple[int, int]
    offset: Tuple[int, int]


@dataclass
class ConvertContext:
    """What every pass needs: sizes, options, the input nodes, and the per-grid site nodes it created."""

    img_size: Tuple[int, int]
    mask_unit: int
    trace_batch: int
    channels: int
    grouping: str = "dp"
    attention_backend: str = "auto"
    images: Optional[fx.Node] = None
    visible: Optional[fx.Node] = None
    site_nodes: Dict[Tuple, fx.Node] = field(default_factory=dict)
    grouping_nodes: Dict[Tuple, fx.Node] = field(default_factory=dict)
    grid_strides: set = field(default_factory=set)
    picked_grids: Dict[Tuple, PickedGrid] = field(default_factory=dict)  # (grid, stride) -> how its cells are picked
    default_stages: bool = False
    failures: Dict[fx.Node, Tuple[fx.Node, str]] = field(default_factory=dict)
    image_wide: set = field(default_factory=set)  # failed nodes grouping positions no unit finer than the image holds
    stage_paths: list = field(default_factory=list)
    last_path: Optional[str] = None
    stage_strides: list = field(default_factory=list)
    output_fmt: str = "NCHW"  # NHWC when a 4-D stage or final map holds its channels last


def graph_order(graph: fx.Graph) -> Dict[fx.Node, int]:
    """Every node's index in ``graph``'s order (for sorting nodes and asking which runs first)."""
    return {n: i for i, n in enumerate(graph.nodes)}


def context_of(gm: fx.GraphModule) -> ConvertContext:
    return gm.meta["greenmim"]


def layout_of(node: Any) -> Optional[Layout]:
    """The symbolic layout of a node reachable from the images, or None for constants."""
    return peek(node).layout


def is_op(node: Any, *targets) -> bool:
    """True when ``node`` calls one of the ATen overloads or overload packets in ``targets``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return any(node.target is t or packet is t for t in targets)


def is_view(node: fx.Node) -> bool:
    """Ops whose result shares its input's storage (``view``, ``reshape``, ``permute``, ...): same values, no memory
    of their own."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def args_of(node: fx.Node) -> Dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out: Dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def shape_of(node: Any) -> Optional[Tuple[int, ...]]:
    """The concrete shape recorded at capture, or None for non-tensors."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def sites_node(gm: fx.GraphModule, layout: Layout) -> fx.Node:
    """The (shared) node computing the visible sites of ``layout``'s grid (and its prefix tokens, or the padded
    positions of its border, when it has some): the cells of visible mask units, or the fine sites a pick keeps."""
    ctx = context_of(gm)
    if any(layout.border):
        key = (layout.grid, layout.stride, "border", layout.border)
        if key not in ctx.site_nodes:
            image = sites_node(gm, replace(layout, grid=layout.image_grid, border=(0, 0, 0, 0)))
            with gm.graph.inserting_after(image):
                ctx.site_nodes[key] = gm.graph.call_function(planner.padded_sites, (image, layout.border))
        return ctx.site_nodes[key]
    if layout.prefix:
        key = (layout.grid, layout.stride, "prefix", layout.prefix)
        if key not in ctx.site_nodes:
            grid = sites_node(gm, replace(layout, prefix=0, key_prefix=0))
            with gm.graph.inserting_after(grid):
                ctx.site_nodes[key] = gm.graph.call_function(planner.prefixed_sites, (grid, layout.prefix))
        return ctx.site_nodes[key]
    key = (layout.grid, layout.stride)
    picked = ctx.picked_grids.get(key)
    if picked is not None and key not in ctx.site_nodes:
        fine = sites_node(gm, picked.fine)
        with gm.graph.inserting_after(fine):
            ctx.site_nodes[key] = gm.graph.call_function(
                planner.picked_sites, (fine, picked.factor, picked.offset, layout.grid, layout.stride)
            )
    if key not in ctx.site_nodes:
        with gm.graph.inserting_after(ctx.visible):
            ctx.site_nodes[key] = gm.graph.call_function(
                planner.visible_sites, (ctx.visible, layout.grid, layout.stride)
            )
        ctx.grid_strides.add(layout.stride)
    return ctx.site_nodes[key]


def replace_with_call(
    gm: fx.GraphModule, node: fx.Node, fn: Any, args: Tuple, kwargs: Optional[Dict] = None
) -> fx.Node:
    """Replace ``node`` by ``fn(*args)`` in place: same position, same meta (layout), same users."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args, kwargs or {})
    copy_meta(node, new)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def fetch_attr(gm: fx.GraphModule, target: str):
    """The object a ``get_attr`` node reads: ``target``'s dotted path walked from ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def emit_call(gm: fx.GraphModule, before: fx.Node, target, args: tuple, like: Optional[fx.Node] = None) -> fx.Node:
    """A new call before ``before`` carrying ``like``'s module stack and source line (for error messages) and
    its value's metadata, computed from its inputs' recorded values as export records them."""
    with gm.graph.inserting_before(before):
        new = gm.graph.call_function(target, args)
    source = like if like is not None else before
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in source.meta:
            new.meta[key] = source.meta[key]
    new.meta["val"] = infer_value(gm, target, args)
    return new


def infer_value(gm: fx.GraphModule, target, args: tuple):
    """``target(*args)`` on the recorded (fake) values of the argument nodes."""
    vals = [n.meta.get("val") for n in fx.node.map_arg(args, lambda n: [n]) if isinstance(n, fx.Node)]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def value(n: fx.Node):
        v = n.meta.get("val")
        if v is None and n.op == "get_attr":
            v = fetch_attr(gm, n.target)
            v = mode.from_tensor(v) if mode is not None else v
        return v

    with mode if mode is not None else contextlib.nullcontext():
        return target(*fx.node.map_arg(args, value))


def set_fresh_attr(gm: fx.GraphModule, prefix: str, value: Any) -> str:
    """Set ``value`` on ``gm`` under the first free name ``_{prefix}_{i}``, and return that name."""
    i = 0
    while hasattr(gm, f"_{prefix}_{i}"):
        i += 1
    name = f"_{prefix}_{i}"
    setattr(gm, name, value)
    return name


def constant(gm: fx.GraphModule, value: Any, before: fx.Node, prefix: str = "green_const") -> fx.Node:
    """A get_attr node handing a static Python object (a program, a window description) to a runtime op."""
    name = set_fresh_attr(gm, prefix, value)
    with gm.graph.inserting_before(before), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a plain attribute, not a Parameter, buffer or submodule
        return gm.graph.get_attr(name)


def _node_in_traceback(exc: BaseException, gm: fx.GraphModule) -> Optional[fx.Node]:
    """The node a pass was working on when it raised: the innermost frame's local ``node`` of ``gm``'s graph."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        node = frame.f_locals.get("node")
        if isinstance(node, fx.Node) and node.graph is gm.graph:
            found = node
    return found


class GreenPass(PassBase):
    """A pass that counts what it rewrote; the counts form the conversion report.

    ``requires`` names the graph properties earlier passes must have ensured, ``ensures`` those that hold after it.
    They replace torch's ``requires``/``ensures`` hook methods with declarations, which the pipeline's pass manager
    checks for the whole order before any pass runs (``compiler.pipeline.check_order``).
    """

    name = "pass"
    description = ""
    requires: FrozenSet[Property] = frozenset()
    ensures: FrozenSet[Property] = frozenset()

    def __init__(self):
        super().__init__()
        self.report: Counter = Counter()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.call(gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.report = Counter()
        try:
            self.run(gm)
        except LayoutError as exc:
            raise UnsupportedOperationError(str(exc), _node_in_traceback(exc, gm)) from exc
        gm.graph.lint()
        return PassResult(gm, bool(self.report))

    def run(self, gm: fx.GraphModule) -> None:
        raise NotImplementedError

    @staticmethod
    def fail(node: fx.Node, reason: str) -> None:
        raise UnsupportedOperationError(reason, node)
