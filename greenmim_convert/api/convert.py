"""``convert``: capture any hierarchical vision model and run the pass pipeline; ``GreenModel``: the result."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from greenmim_convert.compiler.capture import (
    ROOT,
    MissingStageError,
    OutputFn,
    check_stage_names,
    input_channels,
    is_timm_model,
    timm_stages,
)
from greenmim_convert.compiler.pipeline import Compiled, compile_graph
from greenmim_convert.errors import GreenMIMError, InvalidInputError, MaskUnitError, TraceError
from greenmim_convert.passes.base import set_fresh_attr
from greenmim_convert.runtime.program import Program
from greenmim_convert.runtime.tokens import GreenOutput

GROUPINGS = ("window", "dp", "max")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass
class PassRecord:
    """What one pass did: its name, a sentence, and a count per kind of rewrite."""

    name: str
    description: str
    counts: Dict[str, int]


@dataclass
class ConversionReport:
    """The pass manager's record of a conversion, printed by the CLI."""

    model: str
    passes: List[PassRecord]
    min_mask_unit: int
    grid_strides: List[int]

    def __str__(self) -> str:
        lines = [f"greenmim-convert: {self.model}"]
        for p in self.passes:
            what = ", ".join(f"{k}: {v}" for k, v in sorted(p.counts.items())) or "nothing to do"
            lines.append(f"  {p.name:<18} {what}")
        lines.append(f"  grids at strides {self.grid_strides}; minimal mask unit {self.min_mask_unit}px")
        return "\n".join(lines)


@dataclass
class GreenConfig:
    """Everything needed to rebuild a converted model from its timm model."""

    model_name: str
    img_size: Tuple[int, int]
    mask_unit: int
    grouping: str = "dp"
    attention_backend: str = "auto"
    model_kwargs: Dict = field(default_factory=dict)

    def to_dict(self) -> Dict:
        return asdict(self)


def model_name_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def default_img_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The input size the model states (timm's patch embedding or pretrained config), or None."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (None, None, None))[-2:]
        if size[0] is None:
            return None
    if isinstance(size, int):
        size = (size, size)
    return int(size[0]), int(size[1])


def _as_pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise InvalidInputError(f"img_size must be an int or (H, W), got {size}")
    return size


def _check_options(grouping: str, attention_backend: str) -> None:
    if grouping not in GROUPINGS:
        raise InvalidInputError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise InvalidInputError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")


def convert(
    model: nn.Module,
    *,
    img_size: Optional[Union[int, Sequence[int]]] = None,
    stages: Optional[Sequence[str]] = None,
    mask_unit: Optional[int] = None,
    grouping: str = "dp",
    attention_backend: str = "auto",
    output: Optional[OutputFn] = None,
) -> "GreenModel":
    """Compile a hierarchical vision model into one that computes only on visible patches.

    ``model`` is any ``nn.Module`` mapping ``(B, C, H, W)`` images to features: a timm model's
    ``forward_features`` is captured, any other module's ``forward`` (a classifier is followed up
    to the input of its global pool). ``stages`` names modules whose outputs become
    ``out.stages`` (default: timm's ``feature_info``; else the last value at each feature grid).
    The result shares every Parameter with ``model``. ``mask_unit`` (pixels) defaults to the
    model's total stride; it must be a multiple of the minimal unit the compiler derives.
    The model's output may be a tensor, a tuple or list of stage maps (the last is ``out.last``) or a
    ``ModelOutput`` (``last_hidden_state``; a ``BackboneOutput``'s ``feature_maps`` as stages); ``output``, a
    function of the model's output, picks from anything else.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"convert() needs a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise InvalidInputError(f"{type(model).__name__} has no parameters")
    _check_options(grouping, attention_backend)
    size = _as_pair(img_size) if img_size is not None else default_img_size(model)
    if size is None:
        raise InvalidInputError(
            f"{type(model).__name__} does not state its input size: pass img_size=(H, W) to convert()"
        )
    if stages is not None:
        stages = check_stage_names(model, list(stages))
    elif is_timm_model(model):
        try:
            stages = timm_stages(model)[0]
        except MissingStageError:
            stages = None  # the last value at each feature grid; checked against feature_info's strides below
    if output is not None and not callable(output):
        raise InvalidInputError(f"output must be a function of the model's output, got {type(output).__name__}")
    compiled = {
        mode: compile_graph(model, mode, size, stages, mask_unit or 0, grouping, attention_backend, output)
        for mode in (False, True)
    }
    ev = compiled[False]
    if stages is None and is_timm_model(model):
        _check_feature_strides(model, ev)
    strides = sorted(ev.ctx.grid_strides | compiled[True].ctx.grid_strides)
    min_unit = math.lcm(*strides) if strides else 1
    unit = mask_unit if mask_unit is not None else max(strides[-1] if strides else 1, min_unit)
    _check_unit(unit, min_unit, size)
    report = ConversionReport(
        model_name_of(model),
        [PassRecord(p.name, p.description, dict(p.report)) for p in ev.pipeline],
        min_unit,
        strides,
    )
    config = GreenConfig(model_name_of(model), size, unit, grouping, attention_backend)
    names = list(stages) if stages is not None else ev.ctx.stage_paths
    programs = {False: ev.program, True: compiled[True].program}
    for program in programs.values():
        share_source_modules(program, model)
    green = GreenModel(model, programs, config, report, names)
    green.last_module = ev.ctx.last_path
    green.stages_from_output = bool(ev.output_stages)
    green.output_fmt = ev.ctx.output_fmt
    return green


def share_source_modules(program: Program, model: nn.Module) -> None:
    """Point a program's graphs at ``model``'s own modules instead of the copies torch.export made of them.

    The copies hold the same Parameters, but ``model.to(...)``, ``.double()``, ``load_state_dict(assign=True)``
    and FSDP2 replace tensors inside ``model``'s modules, which a copy would not see. Every tensor a graph reads
    is checked to be the very object ``model`` holds at that path before the copy is dropped.
    """
    for gm in (program.plan_gm, program.compute_gm):
        copy = getattr(gm, ROOT, None)
        if copy is None or copy is model:
            continue
        for node in gm.graph.nodes:
            if node.op == "get_attr" and str(node.target).startswith(ROOT + "."):
                mod, _, attr = node.target[len(ROOT) + 1 :].rpartition(".")
                held = getattr(copy.get_submodule(mod), attr)
                if not hasattr(model.get_submodule(mod), attr):  # a constant torch.export lifted into the copy
                    node.target = set_fresh_attr(gm, "constant", held)
                elif getattr(model.get_submodule(mod), attr) is not held:
                    raise GreenMIMError(f"the converted graph's {node.target} is not {type(model).__name__}'s")
        setattr(gm, ROOT, model)
        gm.recompile()


def _check_feature_strides(model: nn.Module, compiled: Compiled) -> None:
    """Stages found from the graph must have the strides timm's ``feature_info`` states."""
    want = [int(f["reduction"]) for f in model.feature_info]
    got = compiled.ctx.stage_strides
    if list(got) != list(want):
        raise TraceError(
            f"feature_info names modules {type(model).__name__} does not have, and the feature grids "
            f"found have strides {list(got)} instead of its reductions {list(want)}: pass stages="
        )


def _check_unit(unit: int, min_unit: int, size: Tuple[int, int]) -> None:
    if not isinstance(unit, int) or unit <= 0 or unit % min_unit:
        raise MaskUnitError(
            f"mask_unit {unit} is not a positive multiple of the model's minimal mask unit {min_unit}px"
        )
    if size[0] % unit or size[1] % unit:
        raise MaskUnitError(f"image size {size} is not divisible by the mask unit {unit}px")


class GreenModel(nn.Module):
    """A converted model: ``forward(images, visible) -> GreenOutput`` computing on visible patches only.

    Its children are the source model's own children, so ``state_dict()`` has exactly the source
    keys and tensors; ``program`` is the converted program of the current mode (plan and compute graphs,
    ``runtime/program.py``), which ``forward`` runs eagerly and under ``torch.compile`` alike.
    """

    def __init__(
        self,
        model: nn.Module,
        programs: Dict[bool, Program],
        config: GreenConfig,
        report: ConversionReport,
        stage_modules: List[str],
    ):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.__dict__["programs"] = programs  # not submodules: the state dict keeps the source's keys
        self.__dict__["source_model"] = model  # not a child: its modules are ours already
        self.config = config
        self.report = report
        self.stage_modules = list(stage_modules)
        self.last_module: Optional[str] = None  # the module whose output is the final features, None: the output
        self.stages_from_output = False  # the stages are the maps the model's output holds, not module outputs
        self.output_fmt = "NCHW"  # the layout of the source model's 4-D stage maps: NCHW or NHWC
        self.train(model.training)

    @property
    def mask_grid(self) -> Tuple[int, int]:
        """(H/u, W/u): the shape of one sample's visibility mask."""
        (h, w), u = self.config.img_size, self.config.mask_unit
        return h // u, w // u

    @property
    def mask_unit(self) -> int:
        return self.config.mask_unit

    @property
    def img_size(self) -> Tuple[int, int]:
        return self.config.img_size

    def train(self, mode: bool = True) -> "GreenModel":
        super().train(mode)
        self.source_model.training = mode
        return self

    def check_inputs(self, images: torch.Tensor, visible: torch.Tensor) -> None:
        """Raise InvalidInputError naming the first thing about the inputs that does not fit."""
        p = next(self.parameters())
        chans = input_channels(self.source_model)
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise InvalidInputError(f"images must be a (B, {chans}, H, W) tensor, got {_describe(images)}")
        if images.shape[1] != chans or tuple(images.shape[2:]) != tuple(self.img_size):
            raise InvalidInputError(
                f"images of shape {tuple(images.shape)} do not fit the converted model: expected (B, {chans}, "
                f"{self.img_size[0]}, {self.img_size[1]})"
            )
        if not images.is_floating_point():
            raise InvalidInputError(f"images must be floating point, got dtype {images.dtype}")
        if images.dtype != p.dtype and not torch.is_autocast_enabled(images.device.type):
            raise InvalidInputError(f"images have dtype {images.dtype} but the model's parameters are {p.dtype}")
        if images.device != p.device:
            raise InvalidInputError(f"images are on {images.device} but the model is on {p.device}")
        if not isinstance(visible, torch.Tensor) or visible.dtype != torch.bool:
            raise InvalidInputError(
                f"visible must be a bool tensor (B, {self.mask_grid[0]}, {self.mask_grid[1]}), got {_describe(visible)}"
            )
        if tuple(visible.shape) != (images.shape[0], *self.mask_grid):
            raise InvalidInputError(
                f"visible has shape {tuple(visible.shape)}; expected {(images.shape[0], *self.mask_grid)} (batch, "
                f"H/{self.mask_unit}, W/{self.mask_unit})"
            )
        if visible.device != images.device:
            raise InvalidInputError(f"visible is on {visible.device} but the images are on {images.device}")

    @property
    def program(self) -> Program:
        """The converted program of the current mode (train and eval are captured separately)."""
        return self.programs[self.training]

    @property
    def graph_module(self) -> fx.GraphModule:
        """Deprecated: the converted graph is now a program of two graphs; this is its compute graph."""
        warnings.warn(
            "GreenModel.graph_module is deprecated: use GreenModel.program (plan_gm and compute_gm)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.program.compute_gm

    @property
    def timm_model(self) -> nn.Module:
        """Deprecated name of ``source_model`` (the source may come from any library)."""
        warnings.warn(
            "GreenModel.timm_model is deprecated: use GreenModel.source_model", DeprecationWarning, stacklevel=2
        )
        return self.source_model

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
        self.check_inputs(images, visible)
        return self.program(images, visible)

    def forward_head(self, out: GreenOutput) -> torch.Tensor:
        """Classifier logits from the mean of the visible final tokens (timm's avg-pool head)."""
        head = getattr(self.source_model, "head", None)
        pool = getattr(self.source_model, "global_pool", "avg")
        if head is None or getattr(head, "fc", None) is None or (isinstance(pool, str) and pool not in ("avg", "")):
            raise InvalidInputError(
                f"forward_head supports timm heads with average pooling and an fc, got {type(head).__name__}"
            )
        x = out.last.mean()
        drop = getattr(head, "drop", None)
        return head.fc(drop(x) if drop is not None else x)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
