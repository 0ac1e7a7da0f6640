"""``torch.compile`` support: the converted graph's runtime calls as ``torch.library`` custom ops.

The converted graph starts with a *plan*: the visible sites of every grid and the window groupings
(``visible_sites``, ``digit_grouping``), Python objects whose sizes depend on the mask. Under
``torch.compile`` the plan runs eagerly outside the compiled region and crosses into it as flat
tensors only (token rows, coordinates, bucket slots, and a fixed-size table of bucket shapes), whose
first dimensions are marked dynamic, so a new mask does not recompile. Every runtime call that reads
a plan object becomes ``greenmim::call(site, tensors)``: the op rebuilds the objects from the tensors
and runs the eager runtime function (which picks the Triton kernels for CUDA tensors); its fake
implementation reads the output's token count off one of its input tensors, and its backward
(``greenmim::call_backward``) recomputes the call under autograd, so only the inputs are saved.
Everything else (Linear, norms, activations, residuals) is left to the compiler.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from greenmim_convert.runtime import ops, plan as planner
from greenmim_convert.errors import UnsupportedOperationError
from greenmim_convert.api.masking import random_mask
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens

NAMESPACE = "greenmim"
PLAN_FUNCTIONS = (planner.visible_sites, planner.padded_sites, planner.digit_grouping, planner.window_grouping)
# Rows of a grouping's bucket table: one per bucket (``plan_buckets`` makes at most 6), then the totals.
TABLE_ROWS = 16


@dataclass(frozen=True)
class SitesSpec:
    """Where a ``Sites`` lies in the plan tensors: its ``batch`` and ``coords``, and its static fields."""

    batch: int
    coords: int
    grid: Tuple[int, int]
    batch_size: int
    stride: int

    def tensors(self) -> Tuple[int, ...]:
        return self.batch, self.coords


@dataclass(frozen=True)
class GroupingSpec:
    """Where a ``Grouping`` lies in the plan tensors: token slots, the buckets' slots concatenated
    (token, window id, in-window position) and the ``(TABLE_ROWS + 1, 2)`` table of bucket shapes."""

    slot: int
    index: int
    segment: int
    position: int
    table: int
    sites: Optional[SitesSpec]
    windows: Any

    def tensors(self) -> Tuple[int, ...]:
        return (self.slot, self.index, self.segment, self.position, self.table) + (self.sites.tensors() if self.sites else ())


PlanSpec = Union[SitesSpec, GroupingSpec]


@dataclass(frozen=True)
class PlanRef:
    """A plan object in an argument template."""

    spec: PlanSpec


@dataclass(frozen=True)
class InputRef:
    """The ``index``-th tensor input of a call in an argument template."""

    index: int


@dataclass
class Call:
    """One runtime call of a converted graph: the function, its argument template, where its output's
    sizes come from (an int, or the input whose first size it is) and the input giving dtype and device."""

    name: str
    fn: Callable
    args: Tuple
    kwargs: Dict[str, Any]
    program: "CompileProgram"
    plan_inputs: Tuple[int, ...] = ()
    out_sizes: Optional[Tuple[Union[int, InputRef, str], ...]] = None
    like: int = -1


_CALLS: List[Call] = []
# An output size that changes with the mask but is no input's first size (a per-sample maximum): unbacked.
DATA_DEPENDENT = "data-dependent"


def _fill(template: Any, inputs: Sequence[torch.Tensor], call: Call) -> Any:
    """The template with its references replaced by tensors and rebuilt plan objects."""
    if isinstance(template, InputRef):
        return inputs[template.index]
    if isinstance(template, PlanRef):
        plan = dict(zip(call.plan_inputs, inputs))
        return _rebuild(template.spec, plan, call.program)
    if isinstance(template, (list, tuple)) and not hasattr(template, "_fields"):
        return type(template)(_fill(t, inputs, call) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, inputs, call) for k, v in template.items()}
    return template


def _rebuild(spec: PlanSpec, plan: Dict[int, torch.Tensor], program: "CompileProgram") -> Any:
    """The plan object of ``spec``: the one the plan built (with its caches) when these are its tensors."""
    key = plan[spec.tensors()[0]]
    live = program.live.get(id(key))
    if live is not None and live[0] is key:
        return live[1]
    if isinstance(spec, SitesSpec):
        return Sites(plan[spec.batch], plan[spec.coords], spec.grid, spec.batch_size, spec.stride)
    rows = plan[spec.table].tolist()
    buckets, start = [], 0
    for g, n in rows[:-1]:
        if g == 0:
            break
        end = start + g * n
        index, segment, position = (plan[i][start:end] for i in (spec.index, spec.segment, spec.position))
        buckets.append(planner.Bucket(g, n, index, segment.view(n, g), position.view(n, g)))
        start = end
    slot = plan[spec.slot]
    sites = _rebuild(spec.sites, plan, program) if spec.sites is not None else None
    return planner.Grouping(buckets, slot, int(slot.shape[0]), rows[-1][0], rows[-1][1], sites, spec.windows)


def _invoke(call: Call, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    out = call.fn(*_fill(call.args, inputs, call), **_fill(call.kwargs, inputs, call))
    if not isinstance(out, torch.Tensor):
        raise UnsupportedOperationError(f"{call.name}: runtime call returns {type(out).__name__}, not one tensor; "
                                        "it cannot run under torch.compile")
    return out


@torch.library.custom_op(f"{NAMESPACE}::call", mutates_args=())
def call_op(site: int, inputs: List[torch.Tensor]) -> torch.Tensor:
    """Run runtime call ``site`` of a converted graph on its tensors (plan objects rebuilt from theirs)."""
    return _own(_invoke(_CALLS[site], inputs), inputs)


def _own(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` contiguous and in memory of its own: a custom op must not return a view of an input."""
    if out.numel() and any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs if t.numel()):
        out = out.clone()
    return out.contiguous()


@call_op.register_fake
def _call_fake(site: int, inputs: List[torch.Tensor]) -> torch.Tensor:
    call = _CALLS[site]
    like = inputs[call.like]
    sizes = [inputs[s.index].shape[0] if isinstance(s, InputRef) else
             torch.library.get_ctx().new_dynamic_size() if s is DATA_DEPENDENT else s for s in call.out_sizes]
    return like.new_empty(sizes)


@contextmanager
def _autograd_recording():
    """Autograd on again inside a custom op's implementation (the dispatcher runs it below autograd)."""
    keys = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        keys = keys.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), keys), torch.enable_grad():
        yield


@torch.library.custom_op(f"{NAMESPACE}::call_backward", mutates_args=())
def call_backward_op(site: int, inputs: List[torch.Tensor], grad: torch.Tensor, wanted: List[bool]) -> List[torch.Tensor]:
    """Gradients of call ``site`` for the ``wanted`` inputs, by running it again under autograd."""
    with _autograd_recording():
        leaves = [t.detach().requires_grad_(w) if w else t for t, w in zip(inputs, wanted)]
        value = _invoke(_CALLS[site], leaves)
        chosen = [t for t, w in zip(leaves, wanted) if w]
        grads = torch.autograd.grad(value, chosen, grad, allow_unused=True) if value.requires_grad else [None] * len(chosen)
    result: List[torch.Tensor] = []
    for t, g in zip(chosen, grads):
        result.append(torch.zeros_like(t) if g is None else _own(g, [*inputs, grad, *result]))
    return result


@call_backward_op.register_fake
def _call_backward_fake(site: int, inputs: List[torch.Tensor], grad: torch.Tensor, wanted: List[bool]) -> List[torch.Tensor]:
    return [t.new_empty(t.shape) for t, w in zip(inputs, wanted) if w]


def _setup_context(ctx, inputs, output) -> None:
    site, tensors = inputs
    ctx.site = site
    ctx.wanted = [t.is_floating_point() and t.requires_grad for t in tensors]
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad: torch.Tensor):
    tensors = ctx.saved_tensors
    grads = iter(torch.ops.greenmim.call_backward(ctx.site, list(tensors), grad.contiguous(), ctx.wanted))
    return None, [next(grads) if w else None for w in ctx.wanted]


call_op.register_autograd(_backward, setup_context=_setup_context)


def _flatten(obj: Any, out: List[torch.Tensor], seen: Dict[int, PlanSpec]) -> PlanSpec:
    """Append the tensors of a plan object to ``out`` and return where they lie."""
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, Sites):
        spec = SitesSpec(len(out), len(out) + 1, obj.grid, obj.batch_size, obj.stride)
        out.extend((obj.batch, obj.coords))
    elif isinstance(obj, planner.Grouping):
        if len(obj.buckets) > TABLE_ROWS:
            raise UnsupportedOperationError(f"a grouping of {len(obj.buckets)} buckets exceeds {TABLE_ROWS}")
        table = torch.zeros(TABLE_ROWS + 1, 2, dtype=torch.long)
        for i, b in enumerate(obj.buckets):
            table[i, 0], table[i, 1] = b.group_size, b.num_groups
        table[-1, 0], table[-1, 1] = obj.logits, obj.lower_bound
        dev = obj.slot.device
        cat = [torch.cat([getattr(b, k).reshape(-1) for b in obj.buckets]) if obj.buckets else torch.zeros(0, dtype=torch.long, device=dev)
               for k in ("index", "segment", "position")]
        first = len(out)
        out.extend([obj.slot, *cat, table])
        sites = seen.get(id(obj.sites)) if obj.sites is not None else None
        if obj.sites is not None and sites is None:
            raise UnsupportedOperationError("a grouping's sites are not a plan value of the graph")
        spec = GroupingSpec(first, first + 1, first + 2, first + 3, first + 4, sites, obj.windows)
    else:
        raise UnsupportedOperationError(f"plan value of type {type(obj).__name__} cannot cross into a compiled graph")
    seen[id(obj)] = spec
    return spec


class CompileProgram:
    """One converted graph (one mode, one batch size) split into an eager plan and a compute graph
    whose runtime calls are ``greenmim::call`` ops on plan tensors."""

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor, visible: torch.Tensor):
        self.gm = gm
        self.live: Dict[int, Tuple[torch.Tensor, Any]] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 2:
            raise UnsupportedOperationError(f"a converted graph takes (images, visible), this one {len(placeholders)} inputs")
        self._visible = placeholders[1]
        self.plan_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PLAN_FUNCTIONS]
        plan_set = set(self.plan_nodes)
        for n in self.plan_nodes:
            bad = [a for a in n.all_input_nodes if a not in plan_set and a is not self._visible and a.op != "get_attr"]
            if bad:
                raise UnsupportedOperationError(f"plan node {n.name} reads {bad[0].name}, which depends on the images")
        _, flat, self.specs = self._plan_objects(visible)
        self.num_plan = len(flat)
        self._tables = {s.table for s in self.specs.values() if isinstance(s, GroupingSpec)}
        self.module = self._compute_graph()
        self._infer_sizes(images, visible)

    def _plan_objects(self, visible: torch.Tensor) -> Tuple[Dict[fx.Node, Any], List[torch.Tensor], Dict[fx.Node, PlanSpec]]:
        """Evaluate the plan nodes on ``visible``; their objects, flat tensors and specs."""
        env: Dict[fx.Node, Any] = {self._visible: visible}

        def value(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a.op == "get_attr":
                    return _attr(self.gm, a.target)
                return env[a]
            return a

        flat: List[torch.Tensor] = []
        seen: Dict[int, PlanSpec] = {}
        specs: Dict[fx.Node, PlanSpec] = {}
        for n in self.plan_nodes:
            env[n] = n.target(*fx.node.map_aggregate(n.args, value), **fx.node.map_aggregate(n.kwargs, value))
            specs[n] = _flatten(env[n], flat, seen)
        return env, flat, specs

    def plan(self, visible: torch.Tensor) -> List[torch.Tensor]:
        """The plan tensors for ``visible``; mask-dependent first dimensions marked dynamic for dynamo."""
        env, flat, specs = self._plan_objects(visible)
        self.live = {id(flat[s.tensors()[0]]): (flat[s.tensors()[0]], env[n]) for n, s in specs.items()}
        for i, t in enumerate(flat):
            if i not in self._tables:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return flat

    def _compute_graph(self) -> fx.GraphModule:
        """The graph after the plan: inputs ``(images, visible, *plan tensors)``, output the stage features."""
        gm, graph = self.gm, fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        nodes = list(gm.graph.nodes)
        env[next(n for n in nodes if n.op == "placeholder")] = graph.placeholder("images")
        env[self._visible] = graph.placeholder("visible")
        plan_ph = [graph.placeholder(f"plan_{i}") for i in range(self.num_plan)]
        self.outputs: List[Tuple[fx.Node, PlanSpec]] = []
        self._call_nodes: Dict[fx.Node, Call] = {}
        result = None
        for n in nodes:
            if n.op == "placeholder" or n in self.specs:
                continue
            if n.op == "output":
                result = n.args[0]
                continue
            if n.op == "call_function" and n.target is ops.tokens:
                feats, sites = n.args
                self.outputs.append((env[feats], self.specs[sites]))
                env[n] = len(self.outputs) - 1
                continue
            if n.op == "call_function" and n.target is ops.green_output:
                env[n] = n
                continue
            if n.op == "call_function" and any(a in self.specs for a in _nodes_in((n.args, n.kwargs))):
                env[n] = self._wrap(n, env, plan_ph, graph)
                continue
            env[n] = graph.node_copy(n, lambda a: env[a])
        if not (isinstance(result, fx.Node) and result.target is ops.green_output):
            raise UnsupportedOperationError(f"the converted graph returns {result}, not green_output(...)")
        last, stages = result.args
        self.last, self.stages = env[last], [env[s] for s in stages]
        graph.output(tuple(feats for feats, _ in self.outputs))
        out = fx.GraphModule(gm, graph)
        out.recompile()
        return out

    def _wrap(self, n: fx.Node, env: Dict[fx.Node, fx.Node], plan_ph: List[fx.Node], graph: fx.Graph) -> fx.Node:
        """Replace a runtime call reading plan objects by ``greenmim::call`` on its tensors."""
        inputs: List[fx.Node] = []
        plan_used: List[int] = []
        for a in _nodes_in((n.args, n.kwargs)):
            if a in self.specs:
                for i in self.specs[a].tensors():
                    if i not in plan_used:
                        plan_used.append(i)
        inputs.extend(plan_ph[i] for i in plan_used)

        def template(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            if a in self.specs:
                return PlanRef(self.specs[a])
            if a.op == "get_attr":
                value = _attr(self.gm, a.target)
                if not isinstance(value, torch.Tensor):
                    return value
            inputs.append(env[a] if a in env else graph.node_copy(a, lambda b: env[b]))
            return InputRef(len(inputs) - 1)

        args = fx.node.map_aggregate(n.args, template)
        kwargs = fx.node.map_aggregate(n.kwargs, template)
        _check_no_dropout(n, args, kwargs)
        call = Call(f"{n.name} ({getattr(n.target, '__name__', n.target)})", n.target, _plain(args), dict(_plain(kwargs)),
                    self, tuple(plan_used))
        _CALLS.append(call)
        node = graph.call_function(torch.ops.greenmim.call.default, (len(_CALLS) - 1, inputs))
        self._call_nodes[node] = call
        return node

    def _infer_sizes(self, images: torch.Tensor, visible: torch.Tensor) -> None:
        """Run the compute graph eagerly on two masks with different visible counts: an output size of a runtime
        call that changes between them is the first size of one of its inputs, or else data-dependent."""
        gen = torch.Generator().manual_seed(0)
        shapes: List[Dict[fx.Node, Any]] = []
        units = visible[0].numel()
        buffers = {name: b.clone() for name, b in self.gm.named_buffers()}  # batch statistics: leave them as they were
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for hidden in (units // 4, units // 2 + 1):
                mask = random_mask(visible.shape[0], tuple(visible.shape[1:]), hidden / units, generator=gen).to(visible.device)
                shapes.append(self._probe(images, mask, differentiable=not shapes))
        with torch.no_grad():
            for name, b in self.gm.named_buffers():
                b.copy_(buffers[name])
        for node, call in self._call_nodes.items():
            (out_a, in_a, dtype, differentiable), (out_b, in_b, _, _) = shapes[0][node], shapes[1][node]
            if not differentiable:  # a factory (``new_empty`` of per-sample rows): no gradient may flow through it
                with self.module.graph.inserting_before(node):
                    node.args = (node.args[0], [self.module.graph.call_function(torch.ops.aten.detach.default, (a,))
                                                if d.is_floating_point else a for a, d in zip(node.args[1], dtype[1])])
            sizes: List[Union[int, InputRef, str]] = []
            for a, b in zip(out_a, out_b):
                if a == b:
                    sizes.append(a)
                    continue
                match = [i for i, (x, y) in enumerate(zip(in_a, in_b)) if x and y and x[0] == a and y[0] == b]
                sizes.append(InputRef(match[0]) if match else DATA_DEPENDENT)
            call.out_sizes = tuple(sizes)
            like = [i for i, d in enumerate(dtype[1]) if d == dtype[0]]
            if not like:
                raise UnsupportedOperationError(f"{call.name}: no input has the output's dtype {dtype[0]}")
            call.like = like[0]
        self.module.recompile()

    def _probe(self, images: torch.Tensor, visible: torch.Tensor, differentiable: bool) -> Dict[fx.Node, Any]:
        """Output and input shapes and dtypes of every runtime call, and whether its output has a gradient."""
        record: Dict[fx.Node, Any] = {}
        calls = self._call_nodes

        class Probe(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n in calls:
                    tensors = [self.env[a] for a in n.args[1]]
                    grad = False
                    if differentiable:
                        with torch.enable_grad():
                            leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
                            grad = _invoke(calls[n], leaves).requires_grad
                    record[n] = (tuple(out.shape), [tuple(t.shape) for t in tensors],
                                 (out.dtype, [t.dtype for t in tensors]), grad)
                return out

        with torch.no_grad():
            Probe(self.module).run(images, visible, *self.plan(visible))
        return record

    def assemble(self, plan: List[torch.Tensor], feats: Sequence[torch.Tensor]) -> GreenOutput:
        """The model's output from the compute graph's features and the plan's sites."""
        tokens = []
        for f, (_, spec) in zip(feats, self.outputs):
            sites = _rebuild(spec, dict(enumerate(plan)), self)
            tokens.append(VisibleTokens(f, sites))
        return GreenOutput(tokens[self.last], [tokens[i] for i in self.stages])


def _check_no_dropout(n: fx.Node, args: Any, kwargs: Any) -> None:
    """Attention dropout inside a runtime call would draw other numbers when the backward runs it again."""
    from greenmim_convert.runtime.attention import AttentionProgram

    for a in _leaves((args, kwargs)):
        if isinstance(a, AttentionProgram) and any(s.kind == "dropout" and s.value for s in a.post):
            raise UnsupportedOperationError(f"{n.name}: attention dropout inside a runtime call is not supported under "
                                            "torch.compile (set attn_drop_rate=0 or run eagerly)")


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


@torch._dynamo.disable
def prepare(green: "Any", visible: torch.Tensor, images: torch.Tensor) -> Tuple[CompileProgram, List[torch.Tensor]]:
    """The compile program of ``green``'s mode and batch size (built on first use) and the plan tensors of ``visible``."""
    key = (green.training, visible.shape[0], images.dtype, images.device)
    programs = green.__dict__.setdefault("compile_programs", {})
    if key not in programs:
        programs[key] = CompileProgram(green.graph_module, images, visible)
    program = programs[key]
    return program, program.plan(visible)


@torch._dynamo.disable
def assemble(program: CompileProgram, plan: List[torch.Tensor], feats: Sequence[torch.Tensor]) -> GreenOutput:
    return program.assemble(plan, feats)


def compiled_forward(green: Any, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    """``GreenModel.forward`` while dynamo traces it: plan eagerly, the compute graph traced, output assembled eagerly."""
    program, plan = prepare(green, visible, images)
    feats = program.module(images, visible, *plan)
    return assemble(program, plan, feats)
