"""The converted model's program: a *plan* graph (mask -> flat plan tensors) and a *compute* graph (images and
plan tensors -> stage features), one program run the same way eagerly and under ``torch.compile``.

``GreenModel.forward(images, visible)`` is ``assemble(plan, compute(images, visible, *plan))`` with
``plan = plan_gm(visible)``, in both modes:

- **Plan tensors** (the interface): per ``Sites`` its ``batch (T,)``, ``coords (T, 2)`` and per-sample
  ``counts (B,)``; per ``Grouping`` its token ``slot (T,)``, its buckets' ``index``, ``segment`` and ``position``
  concatenated (``(S,)`` each, ``S`` slots) and a ``(TABLE_ROWS + 1, 2)`` CPU table of bucket shapes (group size,
  group count; last row: logits, lower bound); a ``PrefixedSites`` has none of its own. The static fields
  (grid, stride, windows, prefix) are in the specs, fixed at conversion; compute rebuilds the objects from the
  tensors, once per forward per object, so every call on one grouping shares its index caches.
- **Runtime calls**: a compute node calling a runtime function that reads plan objects is
  ``runtime_call(call, tensors)``: ``call`` (an attribute of the compute graph module) holds the function and
  its argument template, ``tensors`` are the plan tensors it reads, then its tensor arguments. Eagerly it rebuilds
  the plan objects and calls the function, under plain autograd. While dynamo traces the compute graph, the same
  node becomes the custom op ``greenmim::call(call.site, tensors)``, opaque to the compiler: its fake
  implementation gives the output's sizes (a constant, one input's first size, or a new unbacked size, found by
  running two masks eagerly before
  the first trace) and its backward (``greenmim::call_backward``) runs the call again under autograd, so only
  the inputs are saved. Eager runs the function directly rather than the custom op because that backward
  recomputes every call (attention twice per training step) and the op must return copies, not views; graph,
  functions and arguments are the same. ``through_custom_ops()`` runs the custom ops eagerly (for checks).

Under ``torch.compile`` only the compute graph is compiled: plan and assembly are dynamo-disabled (a graph break
before and after), and the plan tensors' first dimensions are marked dynamic, so a new mask does not recompile.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from greenmim_convert.api.masking import random_mask
from greenmim_convert.errors import UnsupportedOperationError
from greenmim_convert.runtime.plan.grouping import Bucket, Grouping
from greenmim_convert.runtime.plan.sites import PrefixedSites, Sites
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens

NAMESPACE = "greenmim"
# Rows of a grouping's bucket table: one per bucket (``plan_buckets`` makes at most 6), then the totals.
TABLE_ROWS = 16
# An output size that changes with the mask but is no input's first size (a per-sample maximum): unbacked.
DATA_DEPENDENT = "data-dependent"


@dataclass(frozen=True)
class SitesSpec:
    """Where a ``Sites`` lies in the plan tensors (``batch``, ``coords``, ``counts``), and its static fields."""

    batch: int
    coords: int
    counts: int
    grid: Tuple[int, int]
    stride: int

    def tensors(self) -> Tuple[int, ...]:
        return self.batch, self.coords, self.counts


@dataclass(frozen=True)
class PrefixSpec:
    """A ``PrefixedSites``: the grid's sites and the prefix tokens per sample (no tensors of its own)."""

    sites: SitesSpec
    prefix: int

    def tensors(self) -> Tuple[int, ...]:
        return self.sites.tensors()


@dataclass(frozen=True)
class GroupingSpec:
    """Where a ``Grouping`` lies in the plan tensors: token slots, the buckets' slots concatenated (token, window
    id, in-window position) and the table of bucket shapes; then its sites' tensors."""

    slot: int
    index: int
    segment: int
    position: int
    table: int
    sites: Optional[SitesSpec]
    windows: Any

    def tensors(self) -> Tuple[int, ...]:
        own = (self.slot, self.index, self.segment, self.position, self.table)
        return own + (self.sites.tensors() if self.sites else ())


PlanSpec = Union[SitesSpec, PrefixSpec, GroupingSpec]


def sites_tensors(sites: Sites) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan tensors of a ``Sites`` (a node of the plan graph)."""
    return sites.batch, sites.coords, sites.counts()


def grouping_tensors(grouping: Grouping) -> Tuple[torch.Tensor, ...]:
    """The plan tensors of a ``Grouping`` (a node of the plan graph): slots, bucket slots, table of shapes."""
    buckets = grouping.buckets
    if len(buckets) > TABLE_ROWS:
        raise UnsupportedOperationError(f"a grouping of {len(buckets)} buckets exceeds {TABLE_ROWS}")
    rows = [[b.group_size, b.num_groups] for b in buckets] + [[0, 0]] * (TABLE_ROWS - len(buckets))
    table = torch.tensor(rows + [[grouping.logits, grouping.lower_bound]], dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long, device=grouping.slot.device)
    cat = [
        torch.cat([getattr(b, k).reshape(-1) for b in buckets]) if buckets else empty
        for k in ("index", "segment", "position")
    ]
    return (grouping.slot, *cat, table)


def rebuild(spec: PlanSpec, plan: Dict[int, torch.Tensor], cache: Dict[Any, Tuple[torch.Tensor, Any]]) -> Any:
    """The plan object of ``spec`` from its tensors (``plan``: index -> tensor); one object per forward, kept in
    ``cache`` under its first tensor's identity, so that the calls reading it share its caches."""
    first = plan[spec.tensors()[0]]
    key = (spec, id(first))
    hit = cache.get(key)
    if hit is not None and hit[0] is first:
        return hit[1]
    if isinstance(spec, SitesSpec):
        counts = plan[spec.counts]
        obj: Any = Sites(plan[spec.batch], plan[spec.coords], spec.grid, int(counts.shape[0]), spec.stride, counts)
    elif isinstance(spec, PrefixSpec):
        obj = PrefixedSites(rebuild(spec.sites, plan, cache), spec.prefix)
    else:
        obj = _rebuild_grouping(spec, plan, cache)
    cache[key] = (first, obj)
    return obj


def _rebuild_grouping(spec: GroupingSpec, plan: Dict[int, torch.Tensor], cache) -> Grouping:
    rows = plan[spec.table].tolist()
    buckets, start = [], 0
    for g, n in rows[:-1]:
        if g == 0:
            break
        end = start + g * n
        index, segment, position = (plan[i][start:end] for i in (spec.index, spec.segment, spec.position))
        buckets.append(Bucket(g, n, index, segment.view(n, g), position.view(n, g)))
        start = end
    slot = plan[spec.slot]
    sites = rebuild(spec.sites, plan, cache) if spec.sites is not None else None
    return Grouping(buckets, slot, int(slot.shape[0]), rows[-1][0], rows[-1][1], sites, spec.windows)


@dataclass(frozen=True)
class PlanRef:
    """A plan object in an argument template."""

    spec: PlanSpec


@dataclass(frozen=True)
class InputRef:
    """The ``index``-th tensor of a call in an argument template."""

    index: int


@dataclass(eq=False)
class Call:
    """One runtime call of the compute graph: the function, its argument template (``PlanRef``, ``InputRef``,
    constants) and the plan tensors it reads (their indices, the first of its tensors). ``refusal`` says why it
    cannot run under ``torch.compile``; ``shapes`` (per batch size, dtype, device) and ``differentiable`` are
    found before the first trace."""

    name: str
    fn: Callable
    args: Tuple
    kwargs: Dict[str, Any]
    plan_inputs: Tuple[int, ...]
    refusal: Optional[str] = None
    site: int = -1
    program: Optional["Program"] = None
    shapes: Dict[Tuple, Tuple[Tuple[Any, ...], int]] = field(default_factory=dict)
    differentiable: bool = True

    def __post_init__(self) -> None:
        self._fill = _filler((self.args, self.kwargs))

    def bind(self, tensors: Sequence[Any]) -> Tuple[Tuple, Dict[str, Any]]:
        """The function's arguments for these tensors, plan objects rebuilt."""
        return self._fill(tensors, dict(zip(self.plan_inputs, tensors)), self.program.objects)

    def run(self, tensors: Sequence[Any]) -> Any:
        """The function on these tensors."""
        args, kwargs = self.bind(tensors)
        return self.fn(*args, **kwargs)


Filler = Callable[[Sequence[Any], Dict[int, torch.Tensor], Dict], Any]


def _filler(template: Any) -> Filler:
    """A function of (tensors, plan tensors, plan objects) giving ``template`` with its references filled in,
    built once per call so that every forward only walks the references."""
    if isinstance(template, InputRef):
        index = template.index
        return lambda tensors, plan, cache: tensors[index]
    if isinstance(template, PlanRef):
        spec = template.spec
        return lambda tensors, plan, cache: rebuild(spec, plan, cache)
    if isinstance(template, (list, tuple)) and not hasattr(template, "_fields") and _has_refs(template):
        kind, parts = type(template), [_filler(t) for t in template]
        return lambda tensors, plan, cache: kind(f(tensors, plan, cache) for f in parts)
    if isinstance(template, dict) and _has_refs(template):
        items = [(k, _filler(v)) for k, v in template.items()]
        return lambda tensors, plan, cache: {k: f(tensors, plan, cache) for k, f in items}
    return lambda tensors, plan, cache: template


def _has_refs(template: Any) -> bool:
    if isinstance(template, (InputRef, PlanRef)):
        return True
    if isinstance(template, (list, tuple)) and not hasattr(template, "_fields"):
        return any(_has_refs(t) for t in template)
    if isinstance(template, dict):
        return any(_has_refs(t) for t in template.values())
    return False


# Site -> call, for the custom ops (which take the site, an int); weak: the compute graph module holds its calls.
_CALLS: "weakref.WeakValueDictionary[int, Call]" = weakref.WeakValueDictionary()
_SITES = itertools.count()
_THROUGH_OPS = False


def register(call: Call) -> int:
    """A new site for ``call``."""
    call.site = next(_SITES)
    _CALLS[call.site] = call
    return call.site


def runtime_call(call: Call, tensors: List[torch.Tensor]) -> Any:
    """``call`` on its tensors: the function itself eagerly, ``greenmim::call`` while dynamo traces (and under
    ``through_custom_ops``); a call whose output has no gradient (a factory) hands the op detached inputs."""
    if torch.compiler.is_compiling() or _THROUGH_OPS:
        if not call.differentiable:
            tensors = [t.detach() if t.is_floating_point() else t for t in tensors]
        return torch.ops.greenmim.call.default(call.site, tensors)
    return call.run(tensors)


@contextmanager
def through_custom_ops() -> Iterator[None]:
    """Run the runtime calls eagerly through ``greenmim::call`` and its recomputing backward (what a compiled
    graph runs), to check them against the direct calls."""
    global _THROUGH_OPS
    before, _THROUGH_OPS = _THROUGH_OPS, True
    try:
        yield
    finally:
        _THROUGH_OPS = before


def _one_tensor(call: Call, out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise UnsupportedOperationError(
            f"{call.name}: runtime call returns {type(out).__name__}, not one tensor; it cannot run under torch.compile"
        )
    return out


def _own(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` contiguous and in memory of its own: a custom op must not return a view of an input."""
    if out.numel() and any(
        out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs if t.numel()
    ):
        out = out.clone()
    return out.contiguous()


@torch.library.custom_op(f"{NAMESPACE}::call", mutates_args=())
def call_op(site: int, inputs: List[torch.Tensor]) -> torch.Tensor:
    """Run runtime call ``site`` on its tensors (plan objects rebuilt from theirs)."""
    call = _CALLS[site]
    return _own(_one_tensor(call, call.run(inputs)), inputs)


@call_op.register_fake
def _call_fake(site: int, inputs: List[torch.Tensor]) -> torch.Tensor:
    call = _CALLS[site]
    sizes, like = call.shapes[call.program.compile_key]
    out = [
        inputs[s.index].shape[0]
        if isinstance(s, InputRef)
        else torch.library.get_ctx().new_dynamic_size()
        if s == DATA_DEPENDENT
        else s
        for s in sizes
    ]
    return inputs[like].new_empty(out)


@contextmanager
def _autograd_recording() -> Iterator[None]:
    """Autograd on again inside a custom op's implementation (the dispatcher runs it below autograd)."""
    keys = torch._C._dispatch_tls_local_exclude_set()
    for key in (
        torch._C.DispatchKey.AutogradFunctionality,
        torch._C.DispatchKey.AutogradOther,
        torch._C.DispatchKey.AutogradNestedTensor,
    ):
        keys = keys.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), keys), torch.enable_grad():
        yield


@torch.library.custom_op(f"{NAMESPACE}::call_backward", mutates_args=())
def call_backward_op(
    site: int, inputs: List[torch.Tensor], grad: torch.Tensor, wanted: List[bool]
) -> List[torch.Tensor]:
    """Gradients of call ``site`` for the ``wanted`` inputs, by running it again under autograd."""
    call = _CALLS[site]
    with _autograd_recording():
        leaves = [t.detach().requires_grad_(w) if w else t for t, w in zip(inputs, wanted)]
        value = _one_tensor(call, call.run(leaves))
        chosen = [t for t, w in zip(leaves, wanted) if w]
        grads = (
            torch.autograd.grad(value, chosen, grad, allow_unused=True) if value.requires_grad else [None] * len(chosen)
        )
    result: List[torch.Tensor] = []
    for t, g in zip(chosen, grads):
        result.append(torch.zeros_like(t) if g is None else _own(g, [*inputs, grad, *result]))
    return result


@call_backward_op.register_fake
def _call_backward_fake(
    site: int, inputs: List[torch.Tensor], grad: torch.Tensor, wanted: List[bool]
) -> List[torch.Tensor]:
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


class Program:
    """A converted graph of one mode as plan and compute graphs (see the module docstring).

    ``outputs`` are the sites of the compute graph's outputs, ``last`` and ``stages`` index them.
    """

    def __init__(
        self,
        plan_gm: fx.GraphModule,
        compute_gm: fx.GraphModule,
        dynamic: Sequence[int],
        outputs: Sequence[PlanSpec],
        last: int,
        stages: Sequence[int],
        calls: Sequence[Call],
    ):
        self.plan_gm = plan_gm
        self.compute_gm = compute_gm
        self.dynamic = tuple(dynamic)  # plan tensors whose first size changes with the mask
        self.outputs = list(outputs)
        self.last = last
        self.stages = list(stages)
        self.calls = list(calls)
        self.objects: Dict[Any, Tuple[torch.Tensor, Any]] = {}  # plan objects of the running forward
        self.compile_key: Optional[Tuple] = None
        for call in self.calls:
            call.program = self

    def plan(self, visible: torch.Tensor) -> List[torch.Tensor]:
        """The plan tensors of ``visible``."""
        return list(self.plan_gm(visible))

    def __call__(self, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
        if torch.compiler.is_compiling() or _THROUGH_OPS:
            plan = _compile_plan(self, images, visible)
            return _assemble(self, plan, self.compute_gm(images, visible, *plan))
        self.objects.clear()
        plan = self.plan(visible)
        return self.assemble(plan, self.compute_gm(images, visible, *plan))

    def assemble(self, plan: Sequence[torch.Tensor], feats: Sequence[torch.Tensor]) -> GreenOutput:
        """The model's output from the compute graph's features and the plan's sites; ends the forward."""
        index = dict(enumerate(plan))
        tokens = [VisibleTokens(f, rebuild(spec, index, self.objects)) for f, spec in zip(feats, self.outputs)]
        self.objects.clear()
        return GreenOutput(tokens[self.last], [tokens[i] for i in self.stages])

    def call_of(self, node: fx.Node) -> Optional[Call]:
        """The call a compute node runs, or None when it is no runtime call."""
        if node.op == "call_function" and node.target is runtime_call:
            return getattr(self.compute_gm, node.args[0].target)
        return None

    @property
    def code(self) -> str:
        """The plan graph's code, then the compute graph's (its runtime calls are attributes named after their
        functions)."""
        return f"# plan\n{self.plan_gm.code}\n# compute\n{self.compute_gm.code}"

    def prepare_compile(self, images: torch.Tensor, visible: torch.Tensor) -> None:
        """Before dynamo traces the compute graph for these inputs: refuse what cannot run compiled, and find the
        output sizes of the runtime calls for this batch size, dtype and device."""
        for call in self.calls:
            if call.refusal:
                raise UnsupportedOperationError(call.refusal)
        key = (visible.shape[0], images.dtype, images.device)
        if not all(key in call.shapes for call in self.calls):
            self._infer_shapes(key, images, visible)
        self.compile_key = key

    def _infer_shapes(self, key: Tuple, images: torch.Tensor, visible: torch.Tensor) -> None:
        """Run the compute graph eagerly on two masks with different visible counts: an output size of a runtime
        call that changes between them is the first size of one of its inputs, or else data-dependent."""
        gen = torch.Generator().manual_seed(0)
        units = visible[0].numel()
        buffers = {name: b.clone() for name, b in self.compute_gm.named_buffers()}  # batch statistics: kept as were
        devices = [images.device] if images.device.type == "cuda" else []
        shapes: List[Dict[Call, Any]] = []
        with torch.random.fork_rng(devices=devices):
            for hidden in (units // 4, units // 2 + 1):
                mask = random_mask(visible.shape[0], tuple(visible.shape[1:]), hidden / units, generator=gen)
                shapes.append(self._probe(images, mask.to(visible.device), differentiable=not shapes))
        with torch.no_grad():
            for name, b in self.compute_gm.named_buffers():
                b.copy_(buffers[name])
        for call in self.calls:
            (out_a, in_a, dtypes), (out_b, in_b, _) = shapes[0][call], shapes[1][call]
            sizes: List[Union[int, InputRef, str]] = []
            for a, b in zip(out_a, out_b):
                if a == b:
                    sizes.append(a)
                    continue
                match = [i for i, (x, y) in enumerate(zip(in_a, in_b)) if x and y and x[0] == a and y[0] == b]
                sizes.append(InputRef(match[0]) if match else DATA_DEPENDENT)
            like = [i for i, d in enumerate(dtypes[1]) if d == dtypes[0]]
            if not like:
                raise UnsupportedOperationError(f"{call.name}: no input has the output's dtype {dtypes[0]}")
            call.shapes[key] = (tuple(sizes), like[0])

    def _probe(self, images: torch.Tensor, visible: torch.Tensor, differentiable: bool) -> Dict[Call, Any]:
        """Output and input shapes and dtypes of every runtime call (and whether its output has a gradient)."""
        record: Dict[Call, Any] = {}
        program = self

        class Probe(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                call = program.call_of(n)
                if call is None:
                    return super().run_node(n)
                tensors = [self.env[a] for a in n.args[1]]
                out = _one_tensor(call, call.run(tensors))
                if differentiable:
                    with torch.enable_grad():
                        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
                        call.differentiable = call.run(leaves).requires_grad
                record[call] = (
                    tuple(out.shape),
                    [tuple(t.shape) for t in tensors],
                    (out.dtype, [t.dtype for t in tensors]),
                )
                return out

        with torch.no_grad():
            Probe(self.compute_gm).run(images, visible, *self.plan(visible))
        self.objects.clear()
        return record


@torch._dynamo.disable
def _compile_plan(program: Program, images: torch.Tensor, visible: torch.Tensor) -> List[torch.Tensor]:
    """The plan tensors for a compiled forward, mask-dependent first dimensions marked dynamic for dynamo."""
    program.prepare_compile(images, visible)
    plan = program.plan(visible)
    for i in program.dynamic:
        torch._dynamo.maybe_mark_dynamic(plan[i], 0)
    return plan


@torch._dynamo.disable
def _assemble(program: Program, plan: Sequence[torch.Tensor], feats: Sequence[torch.Tensor]) -> GreenOutput:
    return program.assemble(plan, feats)
