"""The pass pipeline: capture one train/eval mode of a model, add the ``visible`` input, run the passes in order, and
split the result into the program's plan and compute graphs (``compiler/split.py``).

Each pass declares the graph properties it ``requires`` and ``ensures`` (``compiler.annotations.Property``); the
pass manager refuses an order in which a pass runs before one that ensures what it requires, then runs the passes
and the ``check`` postcondition after them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from greenmim_convert import passes as P
from greenmim_convert.compiler.capture import Captured, OutputFn, capture, example_images, input_channels
from greenmim_convert.compiler.split import split_program
from greenmim_convert.compiler.whole_sample import WholeSampleRecord, whole_sample_program, whole_sample_unit
from greenmim_convert.errors import GreenMIMError, ImageWideMixingError
from greenmim_convert.runtime.program import Program

TRACE_BATCH = 2


class PipelineOrderError(GreenMIMError):
    """A pass placed where a property it requires does not hold yet."""


def build_pipeline() -> List[P.GreenPass]:
    """The passes in order (the pass manager checks it against their ``requires`` and ``ensures``)."""
    return [
        P.FunctionalizePass(),
        P.CanonicalizePass(),
        P.RowGatherPass(),
        P.EinsumPass(),
        P.LayoutAnalysisPass(),
        P.OutputsPass(),
        P.DenseIslandPass(),
        P.ConvPass(),
        P.PoolingPass(),
        P.PositionEinsumPass(),
        P.AttentionPass(),
        P.SampleMatmulPass(),
        P.PatchMergingPass(),
        P.ChannelSplitPass(),
        P.PrefixTokensPass(),
        P.GridPaddingPass(),
        P.TokenwisePass(),
        P.LayoutOpsPass(),
        P.RecomputePass(),
    ]


def check_order(passes: Sequence[P.GreenPass], postcondition: Optional[P.GreenPass] = None) -> None:
    """Raise ``PipelineOrderError`` naming the first pass (or the postcondition) that requires a property no earlier
    pass ensures, and the pass that would ensure it."""
    held: set = set()
    for i, p in enumerate(list(passes) + ([postcondition] if postcondition is not None else [])):
        missing = sorted(p.requires - held, key=lambda prop: prop.value)
        if missing:
            prop = missing[0]
            by = [q.name for q in passes if prop in q.ensures]
            where = f"'{by[0]}' ensures it and must run before it" if by else "no pass of the pipeline ensures it"
            role = "the postcondition" if i == len(passes) else f"pass {i} ('{p.name}')"
            raise PipelineOrderError(f"{role} requires '{prop.value}', which does not hold there: {where}")
        held |= p.ensures


class GreenPassManager(PassManager):
    """torch's pass manager with an order checked against the passes' declarations before anything runs, and a
    postcondition run after the passes."""

    def __init__(self, passes: Sequence[P.GreenPass], postcondition: P.GreenPass):
        super().__init__(passes=list(passes))
        self.postcondition = postcondition
        self.solve_constraints()

    def solve_constraints(self) -> None:
        """The order is the one given: check it rather than solve for one."""
        check_order(self.passes, self.postcondition)
        self._validated = True

    def __call__(self, module: nn.Module) -> PassResult:
        result = super().__call__(module)
        self.postcondition(result.graph_module)
        return result

    @property
    def ran(self) -> List[P.GreenPass]:
        """The passes and the postcondition, in the order they run (their reports form the conversion report)."""
        return list(self.passes) + [self.postcondition]


@contextmanager
def recompile_once(gm: fx.GraphModule) -> Iterator[None]:
    """Skip the pass manager's code generation after every pass: passes edit and read the graph, never the
    generated code, and regenerating it ~20 times took a third of a conversion. The caller recompiles once."""
    gm.recompile = lambda: None
    try:
        yield
    finally:
        del gm.recompile


@dataclass
class Compiled:
    """A captured graph after the pipeline, with its context, the passes that ran (the postcondition last) and the
    program it splits into."""

    gm: fx.GraphModule
    ctx: P.ConvertContext
    pipeline: List[P.GreenPass]
    program: Program
    output_stages: int = 0  # stage maps read from the model's output (a BackboneOutput's feature_maps)


def compile_graph(
    model: nn.Module,
    training: bool,
    size: Tuple[int, int],
    stages: Optional[List[str]],
    mask_unit: int,
    grouping: str,
    attention_backend: str,
    output: Optional[OutputFn] = None,
) -> Compiled:
    """Capture in one train/eval mode, run the pipeline and split the result into plan and compute."""
    chans = input_channels(model)
    example = example_images(model, size, TRACE_BATCH, chans)
    was_training = model.training
    model.train(training)
    try:
        captured = capture(model, example, stages or [], output)
        gm = captured.gm
        with gm.graph.inserting_after(captured.images):
            visible = gm.graph.placeholder("visible")
        ctx = P.ConvertContext(
            size, mask_unit, TRACE_BATCH, chans, grouping, attention_backend, captured.images, visible
        )
        ctx.default_stages = stages is None and not captured.output_stages
        gm.meta["greenmim"] = ctx
        manager = GreenPassManager(build_pipeline(), P.CheckPass())
        try:
            with recompile_once(gm):
                manager(gm)
        except Exception as exc:
            wide = _cause(exc, ImageWideMixingError)
            if wide is None:
                raise
            return _whole_sample(model, captured, ctx, stages or [], output, wide)
        gm.recompile()
        program = split_program(gm)
    except GreenMIMError:
        raise
    except Exception as exc:
        inner = _cause(exc, GreenMIMError)
        if inner is not None:
            raise inner from None
        raise
    finally:
        model.train(was_training)
    gm.meta.pop("greenmim")
    return Compiled(gm, ctx, manager.ran, program, captured.output_stages)


def _cause(exc: BaseException, kind: type) -> Optional[BaseException]:
    """``exc`` or the first exception of ``kind`` on its chain of causes (torch's pass manager wraps what a pass
    raises), or None."""
    while not isinstance(exc, kind) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc if isinstance(exc, kind) else None


def _whole_sample(
    model: nn.Module,
    captured: Captured,
    ctx: P.ConvertContext,
    stages: List[str],
    output: Optional[OutputFn],
    error: ImageWideMixingError,
) -> Compiled:
    """The whole-sample program (``compiler/whole_sample.py``) of a model with an op no finer mask unit holds."""
    unit = whole_sample_unit(ctx.img_size, ctx.mask_unit, error)
    program, formats = whole_sample_program(captured, model, ctx.img_size, stages, output)
    fresh = P.ConvertContext(ctx.img_size, unit, ctx.trace_batch, ctx.channels, ctx.grouping, ctx.attention_backend)
    fresh.grid_strides = {stride for _, _, stride in formats} | {unit}
    fresh.stage_strides = [stride for _, _, stride in formats[1:]]
    fresh.stage_paths = list(stages) or [""] * captured.output_stages
    fresh.output_fmt = "NHWC" if any(fmt == "NHWC" for fmt, _, _ in formats) else "NCHW"
    record = WholeSampleRecord(error, len(formats))
    return Compiled(captured.gm, fresh, [record], program, captured.output_stages)
