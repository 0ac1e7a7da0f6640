"""The pass pipeline: capture one train/eval mode of a model, add the ``visible`` input, run the passes in order, and
split the result into the program's plan and compute graphs (``compiler/split.py``)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_manager import PassManager

from greenmim_convert import passes as P
from greenmim_convert.compiler.capture import OutputFn, capture, example_images, input_channels
from greenmim_convert.compiler.split import split_program
from greenmim_convert.errors import GreenMIMError
from greenmim_convert.runtime.program import Program

TRACE_BATCH = 2


def build_pipeline() -> List[P.GreenPass]:
    """The passes in order. Passes that read layouts run before the one that removes layout ops."""
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
        P.CheckPass(),
    ]


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
    """A captured graph after the pipeline, with its context, the passes that ran and the program it splits into."""

    gm: fx.GraphModule
    ctx: P.ConvertContext
    pipeline: List[P.GreenPass]
    program: Program
    output_stages: int = 0  # stage maps read from the model's output (a BackboneOutput's feature_maps)


def compile_graph(model: nn.Module, training: bool, size: Tuple[int, int], stages: Optional[List[str]], mask_unit: int,
             grouping: str, attention_backend: str, output: Optional[OutputFn] = None) -> Compiled:
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
        ctx = P.ConvertContext(size, mask_unit, TRACE_BATCH, chans, grouping, attention_backend, captured.images, visible)
        ctx.default_stages = stages is None and not captured.output_stages
        gm.meta["greenmim"] = ctx
        pipeline = build_pipeline()
        with recompile_once(gm):
            PassManager(passes=pipeline)(gm)
        gm.recompile()
        program = split_program(gm)
    except GreenMIMError:
        raise
    except Exception as exc:
        inner = exc
        while not isinstance(inner, GreenMIMError) and inner.__cause__ is not None:
            inner = inner.__cause__
        if isinstance(inner, GreenMIMError):
            raise inner from None
        raise
    finally:
        model.train(was_training)
    gm.meta.pop("greenmim")
    return Compiled(gm, ctx, pipeline, program, captured.output_stages)
