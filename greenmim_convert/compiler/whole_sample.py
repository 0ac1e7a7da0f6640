"""Whole-sample conversion: the program of a model whose mask unit can only be the image itself.

Some models group positions that no mask unit finer than the image holds whole: transformers' ``HieraBackbone``
runs Hiera's encoder on raster tokens it never unrolled, so its query pooling maxes rows a quarter of the grid
apart and its mask-unit attention attends over tokens 49 apart in raster order (``ImageWideMixingError``). Under
masked-dense semantics (DESIGN-NOTES §2) such a group would mix visible and masked positions, and where the model
then places the pooled token on its feature map bears no relation to the image positions it pooled: a visible
position of a later stage could hold a token pooled from masked positions only. The mask unit that keeps every
group whole is the image, so every sample is all visible or all hidden. The masked-dense model of such a mask is the
source model on the images with the hidden samples' pixels zeroed (as a convolution reads masked inputs), its
stage maps read at the visible samples' positions: this module builds that program, every sample of the batch
running so that per-sample random draws (drop path) are the source model's own.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from greenmim_convert.compiler.capture import Captured, OutputFn, _Features
from greenmim_convert.compiler.split import split_program
from greenmim_convert.errors import ImageWideMixingError, MaskUnitError, UnsupportedOperationError
from greenmim_convert.runtime import ops
from greenmim_convert.runtime import plan as planner
from greenmim_convert.runtime.program import Program

BATCH_STATISTICS = ("_native_batch_norm_legit_functional", "_native_batch_norm_legit", "native_batch_norm")


class WholeSampleRecord:
    """The conversion report's entry of a whole-sample conversion: why, and what it reads."""

    name = "whole-sample"
    description = "an op no mask unit finer than the image holds -> the source model on every sample, read per token"

    def __init__(self, error: ImageWideMixingError, outputs: int):
        self.report = Counter({"source model run on every sample": 1, "feature maps read at visible samples": outputs})
        self.reason = str(error)


class SourceRun:
    """The source model's features function on images whose hidden samples are zeroed: ``(last, *stages)``.

    A plain object, not a module: the compute graph holds it as a constant, and the converted model's state dict
    keeps the source model's keys."""

    def __init__(self, model: nn.Module, stages: Sequence[str], output: Optional[OutputFn]):
        self.features = _Features(model, stages, output)

    def __call__(self, images: torch.Tensor, visible: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        shown = visible.flatten(1).any(1).to(images.dtype)
        return tuple(self.features(images * shown.view(-1, *([1] * (images.dim() - 1)))))


def whole_sample_unit(size: Tuple[int, int], mask_unit: int, error: ImageWideMixingError) -> int:
    """The image as the mask unit when ``mask_unit`` asks for it; otherwise the refusal naming the op that rules out a
    finer unit (never a silent dense program)."""
    if size[0] != size[1]:
        raise MaskUnitError(f"{error}; a {size[0]}x{size[1]} image is no square mask unit, so it does not convert")
    if not mask_unit:
        raise error.extended(
            "no mask unit finer than the image holds these positions whole, so masking inside a sample has no "
            f"masked-dense meaning here: pass mask_unit={size[0]} to convert it with the image as its unit (every "
            "sample all visible or all hidden, computed densely: no speed-up)"
        )
    if mask_unit != size[0]:
        raise MaskUnitError(
            f"mask_unit {mask_unit}px: {error}; the model converts only with the image as its mask unit "
            f"(mask_unit={size[0]}: every sample all visible or all hidden)"
        )
    return size[0]


def _map_format(value: Any, size: Tuple[int, int]) -> Tuple[str, Tuple[int, int], int]:
    """``(format, grid, stride)`` of a captured 4-D feature map: NCHW, or NHWC where only that reading gives a
    grid tiling the image at one stride."""
    shape = tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else ()
    for fmt, (h, w) in (("NCHW", shape[2:4]), ("NHWC", shape[1:3])):
        if len(shape) == 4 and size[0] % h == 0 and size[1] % w == 0 and size[0] // h == size[1] // w:
            return fmt, (h, w), size[0] // h
    raise UnsupportedOperationError(
        f"a whole-sample conversion reads 4-D feature maps tiling the {size[0]}x{size[1]} image, the model gives "
        f"a value of shape {shape}"
    )


def whole_sample_graph(
    captured: Captured, model: nn.Module, size: Tuple[int, int], stages: Sequence[str], output: Optional[OutputFn]
) -> Tuple[fx.GraphModule, List[Tuple[str, Tuple[int, int], int]]]:
    """The converted graph ``(images, visible) -> green_output(...)`` running the source model on every sample,
    and the format, grid and stride of each of its outputs (final features first)."""
    for node in captured.gm.graph.nodes:
        if any(name in str(node.target) for name in BATCH_STATISTICS) and _training_norm(node):
            raise UnsupportedOperationError(
                "BatchNorm in training mode takes statistics over every sample's positions; a whole-sample "
                "conversion runs the hidden samples too"
            )
    values = [captured.last, *captured.stages]
    formats = [_map_format(v.meta.get("val"), size) for v in values]
    root = nn.Module()
    root.run = SourceRun(model, stages, output)
    graph = fx.Graph()
    images, visible = graph.placeholder("images"), graph.placeholder("visible")
    maps = graph.call_function(_call, (graph.get_attr("run"), images, visible))
    sites = {}
    tokens = []
    for i, (fmt, grid, stride) in enumerate(formats):
        if (grid, stride) not in sites:
            sites[grid, stride] = graph.call_function(planner.visible_sites, (visible, grid, stride))
        dense = graph.call_function(_item, (maps, i))
        feats = graph.call_function(ops.map_rows, (dense, sites[grid, stride], fmt))
        tokens.append(graph.call_function(ops.tokens, (feats, sites[grid, stride])))
    graph.output(graph.call_function(ops.green_output, (tokens[0], tokens[1:])))
    return fx.GraphModule(root, graph, "WholeSampleGraph"), formats


def whole_sample_program(
    captured: Captured, model: nn.Module, size: Tuple[int, int], stages: Sequence[str], output: Optional[OutputFn]
) -> Tuple[Program, List[Tuple[str, Tuple[int, int], int]]]:
    """The program of ``whole_sample_graph``, and its outputs' formats, grids and strides."""
    gm, formats = whole_sample_graph(captured, model, size, stages, output)
    return split_program(gm), formats


def _training_norm(node: fx.Node) -> bool:
    """A batch norm node computing batch statistics (its ``training`` argument true)."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "training" not in names:
        return False
    i = names.index("training")
    return bool(node.args[i] if i < len(node.args) else node.kwargs.get("training"))


def _call(run: SourceRun, images: torch.Tensor, visible: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return run(images, visible)


def _item(values: Tuple[torch.Tensor, ...], i: int) -> torch.Tensor:
    return values[i]
