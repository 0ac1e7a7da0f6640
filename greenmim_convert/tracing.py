"""Trace a timm model's ``forward_features`` with torch.fx, using timm's own leaf registries.

The tracer treats as leaves: torch.nn's modules, timm's notrace modules and functions (the same
sets timm's FX feature extraction uses), and the module types the passes rewrite as a whole
(window attention, drop-path). The graph returns ``(last, [stage outputs])``.
"""
from __future__ import annotations

import difflib
import traceback
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers import get_notrace_functions, get_notrace_modules

from .errors import TraceError

ROOT = "m"  # the traced wrapper holds the timm model under this name


class _FeaturesWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m.forward_features(x)


class GreenTracer(fx.Tracer):
    """fx.Tracer with timm's notrace modules/functions plus the given semantic leaf types."""

    def __init__(self, extra_leaves: Iterable[Type[nn.Module]] = ()):
        fns = tuple(f for f in get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=fns)
        self.record_stack_traces = True
        self.leaf_types = tuple(set(get_notrace_modules()) | set(extra_leaves))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


@dataclass
class Traced:
    """A traced model: the GraphModule and the dotted module paths of its stage outputs."""

    gm: fx.GraphModule
    stage_modules: List[str]
    stage_reductions: List[int]


def feature_stages(model: nn.Module) -> Tuple[List[str], List[int]]:
    """Stage module paths and strides from timm's ``feature_info``.

    A few timm models name a module that does not exist (Twins says ``block.0`` for ``blocks.0``);
    such a path resolves to the one existing module path that differs from it by one character.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise TraceError(f"{type(model).__name__} has no feature_info: greenmim-convert needs a timm hierarchical model")
    names = {n for n, _ in model.named_modules()}
    paths = []
    for f in info:
        path = f["module"]
        if path not in names:
            close = [n for n in names if len(n) == len(path) + 1 and difflib.SequenceMatcher(None, n, path).ratio() > 0.9]
            if len(close) != 1:
                raise TraceError(f"feature_info names module '{path}', which {type(model).__name__} does not have")
            path = close[0]
        paths.append(path)
    return paths, [int(f["reduction"]) for f in info]


def _stack_paths(node: fx.Node) -> List[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]


def _last_node_of(graph: fx.Graph, path: str) -> fx.Node:
    qual = f"{ROOT}.{path}"
    found = None
    for node in graph.nodes:
        if node.op == "call_module" and (node.target == qual or str(node.target).startswith(qual + ".")):
            found = node
        elif any(p == qual or p.startswith(qual + ".") for p in _stack_paths(node)):
            found = node
    if found is None:
        raise TraceError(f"stage module '{path}' does not appear in the traced graph")
    return found


def _trace_once(model: nn.Module, leaves: Sequence[Type[nn.Module]]) -> fx.GraphModule:
    wrapper = _FeaturesWrapper(model)
    tracer = GreenTracer(leaves)
    try:
        graph = tracer.trace(wrapper)
    except Exception as exc:  # torch.fx raises many types; report them as one
        where = _failing_module(model, exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}.forward_features{where}: {type(exc).__name__}: {exc}"
        ) from exc
    return fx.GraphModule(wrapper, graph, class_name="GreenGraph")


def _failing_module(model: nn.Module, exc: BaseException) -> str:
    """' in module PATH (Type) at FILE:LINE' for the innermost model module on the traceback, or ''."""
    paths = {id(m): n for n, m in model.named_modules()}
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in paths:
            name = paths[id(obj)] or "<top level>"
            found = f" in module '{name}' ({type(obj).__name__}) at {frame.f_code.co_filename}:{lineno}"
    return found


def trace_features(model: nn.Module, leaves: Sequence[Type[nn.Module]]) -> Traced:
    """Trace ``forward_features`` and mark the stage outputs; refuse graphs that depend on train/eval."""
    was_training = model.training
    try:
        model.train(True)
        gm_train = _trace_once(model, leaves)
        model.train(False)
        gm = _trace_once(model, leaves)
    finally:
        model.train(was_training)
    if gm_train.code != gm.code:
        raise TraceError(
            f"{type(model).__name__} traces differently in train and eval mode outside its leaf modules; "
            "a module reads self.training while being traced through"
        )
    stages, reductions = feature_stages(model)
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    stage_nodes = [_last_node_of(graph, p) for p in stages]
    out_node.args = ((out_node.args[0], list(stage_nodes)),)
    gm.recompile()
    return Traced(gm, stages, reductions)


def example_images(model: nn.Module, img_size: Tuple[int, int], batch: int = 2) -> torch.Tensor:
    """Random images with the model's channels, dtype and device, for shape propagation."""
    p = next(model.parameters())
    chans = getattr(model, "in_chans", 3)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, chans, *img_size, generator=gen).to(device=p.device, dtype=p.dtype)
