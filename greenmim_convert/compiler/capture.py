"""Capture any image model as a graph of ATen operators with ``torch.export`` (non-strict).

Sizes are concrete at capture, so Python that computes on shapes (padding amounts, masks built in
``forward``, ``if H % w``) runs and disappears; what remains are operator nodes (linear, view,
roll, matmul, scaled_dot_product_attention, conv2d, ...) that keep the model's own Parameter
objects and name their module in ``meta["nn_module_stack"]``. The graph returns the features
followed by the output of every stage module (captured with forward hooks during export).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from greenmim_convert.errors import InvalidInputError, TraceError

ROOT = "m"  # the captured wrapper holds the model under this name


def is_timm_model(model: nn.Module) -> bool:
    """timm models expose ``forward_features`` and ``feature_info``: their features are captured from there."""
    return hasattr(model, "forward_features") and bool(getattr(model, "feature_info", None))


OutputFn = Callable[[Any], Any]


class _Features(nn.Module):
    """Calls the model's features function and returns its final value, the stashed stage outputs, then the
    stage maps the output itself holds (a ``BackboneOutput``'s ``feature_maps``, a tuple or list of maps)."""

    def __init__(self, model: nn.Module, stages: Sequence[str], output: Optional[OutputFn] = None):
        super().__init__()
        self.m = model
        self.stages = list(stages)
        self.output = output

    def forward(self, x: torch.Tensor):
        stash: List[Optional[torch.Tensor]] = [None] * len(self.stages)
        handles = [
            _called_module(self.m.get_submodule(name)).register_forward_hook(
                lambda mod, args, out, i=i: stash.__setitem__(i, module_tensor(out))
            )
            for i, name in enumerate(self.stages)
        ]
        try:
            out = self.m.forward_features(x) if is_timm_model(self.m) else self.m(x)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name, value in zip(self.stages, stash) if not isinstance(value, torch.Tensor)]
        if missing:
            raise TraceError(f"stage module(s) {missing} were not called with a tensor output during the forward")
        if self.output is not None:
            out = self.output(out)
        last, maps = output_values(out, type(self.m).__name__)
        if self.stages:
            maps = []  # stages named by the caller take the place of those the output holds
        return (last, *stash, *maps)


def output_values(out: Any, model: str = "the model") -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The final features and the stage maps held by a model's output.

    A tensor is the final features. A ``BackboneOutput`` (a mapping with ``feature_maps``) gives its maps as
    stages and the last one as the final features; a ``ModelOutput`` with ``last_hidden_state`` gives that.
    A tuple or list of tensors gives its entries as stages and the last one as the final features.
    """
    if isinstance(out, torch.Tensor):
        return out, []
    if isinstance(out, Mapping):
        maps = out.get("feature_maps")
        if maps is not None:
            return output_values(tuple(maps), model)
        if isinstance(out.get("last_hidden_state"), torch.Tensor):
            return out["last_hidden_state"], []
        raise TraceError(
            f"{model} returned {type(out).__name__} with keys {list(out.keys())}, none of them "
            "'last_hidden_state' or 'feature_maps': pass output= (a function of the output giving a tensor)"
        )
    if isinstance(out, (tuple, list)) and out and all(isinstance(v, torch.Tensor) for v in out):
        return out[-1], list(out)
    kinds = [type(v).__name__ for v in out] if isinstance(out, (tuple, list)) else type(out).__name__
    raise TraceError(
        f"{model} returned {type(out).__name__} ({kinds}); greenmim-convert reads a tensor, a tuple or "
        "list of tensors, or a ModelOutput: pass output= (a function of the output giving one of these)"
    )


def module_tensor(out):
    """A module's output tensor: the output itself, the first element of a ``(tensor, ...)`` tuple (MViTv2's
    stages return their features with their grid size; PVT v2's layers ``((tensor,), height, width)``), or the
    final features of a ``ModelOutput`` (a transformers encoder's ``last_hidden_state``, as ``output_values``
    reads it)."""
    if isinstance(out, (tuple, list)) and out:
        first = module_tensor(out[0])
        return first if isinstance(first, torch.Tensor) else out
    if isinstance(out, Mapping) and ("last_hidden_state" in out or "feature_maps" in out):
        return output_values(out)[0]
    return out


def _called_module(module: nn.Module) -> nn.Module:
    """The module whose output is a stage's output: a container's last child when it is never called."""
    while isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        module = list(module.children())[-1]
    return module


def timm_stages(model: nn.Module) -> Tuple[List[str], List[int]]:
    """Stage module paths and strides from timm's ``feature_info``.

    A few timm models name a module that does not exist. Twins says ``block.0`` for ``blocks.0``: such a
    path resolves to the one existing module path that differs from it by one character. MViTv2 says
    ``block.i`` for its i-th stage: a path ending in the entry's index resolves to child ``i`` of the one
    top-level container with exactly one child per ``feature_info`` entry (``stages``).
    """
    info = getattr(model, "feature_info", None) or []
    names = {n for n, _ in model.named_modules()}
    paths = []
    for i, f in enumerate(info):
        path = f["module"]
        if path not in names:
            close = [
                n for n in names if len(n) == len(path) + 1 and difflib.SequenceMatcher(None, n, path).ratio() > 0.9
            ]
            if len(close) != 1:
                close = _indexed_stage(model, path, i, len(info))
            if len(close) != 1:
                raise MissingStageError(
                    f"feature_info names module '{path}', which {type(model).__name__} does not have"
                )
            path = close[0]
        paths.append(path)
    return paths, [int(f["reduction"]) for f in info]


def _indexed_stage(model: nn.Module, path: str, index: int, count: int) -> List[str]:
    """``['NAME.index']`` for a path ending in ``.index`` when NAME is the one top-level container of ``count``
    children; else ``[]``."""
    if not path.endswith(f".{index}"):
        return []
    lists = [n for n, m in model.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == count]
    return [f"{lists[0]}.{index}"] if len(lists) == 1 else []


class MissingStageError(TraceError):
    """timm's ``feature_info`` names a module the model does not have (MViTv2 says ``block.0``)."""


def check_stage_names(model: nn.Module, stages: Sequence[str]) -> List[str]:
    """Validate ``stages=`` against ``named_modules()``, with close matches for a misspelt name."""
    names = [n for n, _ in model.named_modules() if n]
    for s in stages:
        if not isinstance(s, str) or s not in names:
            close = difflib.get_close_matches(str(s), names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidInputError(f"stages: {type(model).__name__} has no module named {s!r}{hint}")
    return list(stages)


@dataclass
class Captured:
    """A captured model: the GraphModule, the image placeholder, and the output nodes (features, stages)."""

    gm: fx.GraphModule
    images: fx.Node
    last: fx.Node
    stages: List[fx.Node]
    output_stages: int = 0  # the last ``output_stages`` of ``stages`` were read from the model's output


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


@contextlib.contextmanager
def _quiet_torch_logs():
    """Export prints and logs whole graphs when it fails; the TraceError says what matters."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _essentials(exc: BaseException) -> str:
    """The first line of an export error and the user code it names, without export's generic advice."""
    lines = str(exc).strip().splitlines()
    out = lines[:1]
    if "The following call raised this error:" in lines:
        i = lines.index("The following call raised this error:")
        out += [ln.strip() for ln in lines[i + 1 : i + 3] if ln.strip()]
    return " | ".join(out)


def capture(
    model: nn.Module, images: torch.Tensor, stages: Sequence[str], output: Optional[OutputFn] = None
) -> Captured:
    """Export the model's features function on ``images`` in its current train/eval mode; ``output`` maps the
    model's output to what ``output_values`` reads."""
    wrapper = _Features(model, stages, output)
    try:
        with _quiet_torch_logs():
            program = torch.export.export(wrapper, (images,), strict=False)
    except TraceError:
        raise
    except Exception as exc:  # export raises many types; report them as one, naming the module
        where = _failing_module(model, exc)
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}{where}: {type(exc).__name__}: {_essentials(exc)}"
        ) from exc
    exported = program.module()
    graph = fx.Graph()
    remap = graph.graph_copy(exported.graph, {})
    graph.output(remap)
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)  # export's input-shape guards: the converted model checks its inputs itself
    gm = fx.GraphModule(exported, graph, class_name="GreenGraph")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(out.args[0])
    output_stages = len(values) - 1 - len(stages)  # counted from the graph: export undoes attribute writes
    return Captured(gm, placeholders[0], values[0], values[1:], output_stages)


def example_images(model: nn.Module, img_size: Tuple[int, int], batch: int, chans: int) -> torch.Tensor:
    """Random images with the model's dtype and device, for capture."""
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, chans, *img_size, generator=gen).to(device=device, dtype=dtype)


def input_channels(model: nn.Module) -> int:
    """Image channels: timm's ``in_chans``, else the input channels of the first convolution."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int):
        return chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3
