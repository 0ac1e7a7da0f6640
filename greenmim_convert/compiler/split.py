"""The last step of a conversion: split the converted graph once into the program's plan and compute graphs.

Plan nodes are the calls of ``PLAN_FUNCTIONS`` (they read ``visible``, constants and each other only); the plan
graph computes them and returns their tensors, flat (``runtime.program``'s interface). The compute graph is the rest
of the converted graph with inputs ``(images, visible, *plan tensors)``: a call reading plan objects becomes
``runtime_call(call, tensors)`` (``call`` an attribute of the compute graph module), and it returns the features
of the converted model's outputs.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from greenmim_convert.errors import UnsupportedOperationError
from greenmim_convert.runtime import ops
from greenmim_convert.runtime import plan as planner
from greenmim_convert.runtime.attention import AttentionProgram
from greenmim_convert.runtime.program import (
    Call,
    GroupingSpec,
    InputRef,
    PlanRef,
    PlanSpec,
    PrefixSpec,
    Program,
    SitesSpec,
    grouping_tensors,
    register,
    runtime_call,
    sites_tensors,
)

GROUPING_FIELDS = ("slot", "index", "segment", "position", "table")
PLAN_FUNCTIONS = (
    planner.visible_sites,
    planner.padded_sites,
    planner.picked_sites,
    planner.prefixed_sites,
    planner.digit_grouping,
    planner.window_grouping,
)


def split_program(gm: fx.GraphModule) -> Program:
    """The program of a converted graph ``(images, visible) -> green_output(...)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 2:
        raise UnsupportedOperationError(
            f"a converted graph takes (images, visible), this one takes {len(placeholders)} inputs"
        )
    images, visible = placeholders
    plan_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PLAN_FUNCTIONS]
    for n in plan_nodes:
        bad = [a for a in n.all_input_nodes if a not in plan_nodes and a is not visible and a.op != "get_attr"]
        if bad:
            raise UnsupportedOperationError(f"plan node {n.name} reads {bad[0].name}, which depends on the images")
    plan_gm, specs, dynamic = _plan_graph(gm, visible, plan_nodes)
    names = [a.name for a in plan_gm.graph.output_node().args[0]]
    compute = _ComputeGraph(gm, images, visible, specs, names)
    return Program(plan_gm, compute.gm, dynamic, compute.outputs, compute.last, compute.stages, compute.calls)


def _plan_graph(
    gm: fx.GraphModule, visible: fx.Node, plan_nodes: List[fx.Node]
) -> Tuple[fx.GraphModule, Dict[fx.Node, PlanSpec], List[int]]:
    """The plan graph ``visible -> flat tensors``, each plan node's spec, and the tensors whose size is the mask's."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {visible: graph.placeholder("visible")}

    def copy(a: fx.Node) -> fx.Node:
        if a not in env:
            env[a] = graph.node_copy(a, copy)
        return env[a]

    for n in plan_nodes:
        copy(n)
    values = _example_values(gm, graph, [env[n] for n in plan_nodes])
    flat: List[fx.Node] = []
    dynamic: List[int] = []
    specs: Dict[fx.Node, PlanSpec] = {}
    by_object: Dict[int, PlanSpec] = {}
    for n, value in zip(plan_nodes, values):
        specs[n] = by_object[id(value)] = _spec(n, value, len(flat), by_object)
        if isinstance(value, planner.Sites):
            fields, flatten, mask_sized = ("batch", "coords", "counts"), sites_tensors, (0, 1)
        elif isinstance(value, planner.Grouping):
            fields, flatten, mask_sized = GROUPING_FIELDS, grouping_tensors, (0, 1, 2, 3)
        else:
            continue
        whole = graph.call_function(flatten, (env[n],))
        dynamic.extend(len(flat) + i for i in mask_sized)
        for i, name in enumerate(fields):
            flat.append(graph.create_node("call_function", operator.getitem, (whole, i), name=f"{n.name}_{name}"))
    graph.output(tuple(flat))
    out = fx.GraphModule(gm, graph, "PlanGraph")
    out.graph.lint()
    return out, specs, dynamic


def _example_values(gm: fx.GraphModule, graph: fx.Graph, nodes: List[fx.Node]) -> List[Any]:
    """The plan nodes' values on one all-visible sample (their kinds and static fields do not depend on the mask)."""
    probe = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        env[n] = probe.node_copy(n, lambda a: env[a])
    probe.output(tuple(env[n] for n in nodes))
    module = fx.GraphModule(gm, probe)
    return list(module(torch.ones(1, 1, 1, dtype=torch.bool)))


def _spec(node: fx.Node, value: Any, first: int, by_object: Dict[int, PlanSpec]) -> PlanSpec:
    """Where ``value`` (a plan node's example value) will lie in the plan tensors, from index ``first`` on."""
    if isinstance(value, planner.Sites):
        return SitesSpec(first, first + 1, first + 2, value.grid, value.stride)
    if isinstance(value, planner.PrefixedSites):
        return PrefixSpec(by_object[id(value.sites)], value.prefix)
    if isinstance(value, planner.Grouping):
        sites = by_object.get(id(value.sites)) if value.sites is not None else None
        if value.sites is not None and sites is None:
            raise UnsupportedOperationError(f"{node.name}: a grouping's sites are not a plan value of the graph")
        return GroupingSpec(first, first + 1, first + 2, first + 3, first + 4, sites, value.windows)
    raise UnsupportedOperationError(f"plan node {node.name} computes a {type(value).__name__}, not sites or a grouping")


class _ComputeGraph:
    """The graph after the plan: inputs ``(images, visible, *plan tensors)``, output the features of every output."""

    def __init__(
        self,
        gm: fx.GraphModule,
        images: fx.Node,
        visible: fx.Node,
        specs: Dict[fx.Node, PlanSpec],
        plan_names: List[str],
    ):
        self.source, self.specs = gm, specs
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, Any] = {
            images: self.graph.placeholder("images"),
            visible: self.graph.placeholder("visible"),
        }
        self.plan = [self.graph.placeholder(name) for name in plan_names]
        self.outputs: List[PlanSpec] = []
        self.calls: List[Call] = []
        feats: List[fx.Node] = []
        result = None
        for n in gm.graph.nodes:
            if n.op == "placeholder" or n in specs:
                continue
            if n.op == "output":
                result = n.args[0]
            elif n.op == "call_function" and n.target is ops.tokens:
                feats.append(self.env[n.args[0]])
                self.outputs.append(specs[n.args[1]])
                self.env[n] = len(self.outputs) - 1
            elif n.op == "call_function" and n.target is ops.green_output:
                self.env[n] = n
            elif any(a in specs for a in _nodes_in((n.args, n.kwargs))):
                self.env[n] = self._wrap(n)
            else:
                self.env[n] = self.graph.node_copy(n, lambda a: self.env[a])
        if not (isinstance(result, fx.Node) and result.target is ops.green_output):
            raise UnsupportedOperationError(f"the converted graph returns {result}, not green_output(...)")
        last, stages = result.args
        self.last, self.stages = self.env[last], [self.env[s] for s in stages]
        self.graph.output(tuple(feats))
        for n in reversed(list(self.graph.nodes)):
            if n.op == "get_attr" and not n.users:
                self.graph.erase_node(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the calls are plain attributes, not modules or tensors
            self.gm = fx.GraphModule(gm, self.graph, "ComputeGraph")

    def _wrap(self, n: fx.Node) -> fx.Node:
        """``runtime_call(call, tensors)`` for a call reading plan objects: its plan tensors, then its tensors."""
        if n.op != "call_function":
            raise UnsupportedOperationError(f"{n.name} ({n.op}) reads a plan object; only function calls may")
        plan_used: List[int] = []
        for a in _nodes_in((n.args, n.kwargs)):
            if a in self.specs:
                plan_used.extend(i for i in self.specs[a].tensors() if i not in plan_used)
        inputs: List[fx.Node] = [self.plan[i] for i in plan_used]

        def template(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            if a in self.specs:
                return PlanRef(self.specs[a])
            if a.op == "get_attr":
                value = _attr(self.source, a.target)
                if not isinstance(value, torch.Tensor):
                    return value
            inputs.append(self.env[a])
            return InputRef(len(inputs) - 1)

        args = _plain(fx.node.map_aggregate(n.args, template))
        kwargs = dict(_plain(fx.node.map_aggregate(n.kwargs, template)))
        name = f"{n.name} ({getattr(n.target, '__name__', n.target)})"
        call = Call(name, n.target, args, kwargs, tuple(plan_used), _dropout_refusal(name, (args, kwargs)))
        register(call)
        self.calls.append(call)
        attr = f"_call_{n.name}"
        setattr(self.source, attr, call)  # the compute graph module copies it from its root
        node = self.graph.create_node("call_function", runtime_call, (self.graph.get_attr(attr), inputs), name=n.name)
        node.meta.update(n.meta)
        return node


def _dropout_refusal(name: str, template: Any) -> Optional[str]:
    """Attention dropout inside a runtime call would draw other numbers when the custom op's backward runs it again."""
    for a in _leaves(template):
        if isinstance(a, AttentionProgram) and any(s.kind == "dropout" and s.value for s in a.post):
            return (
                f"{name}: attention dropout inside a runtime call is not supported under torch.compile "
                "(set attn_drop_rate=0 or run eagerly)"
            )
    return None


def _leaves(x: Any):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _leaves(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _leaves(y)
    else:
        yield x


def _nodes_in(x: Any) -> List[fx.Node]:
    return [a for a in _leaves(x) if isinstance(a, fx.Node)]


def _plain(x: Any) -> Any:
    """fx's immutable containers as plain tuples, lists and dicts."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_plain(v) for v in x)
    return x


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
