"""``verify``: compare a converted model with the dense masked reference, stage by stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from greenmim_convert.api.convert import GreenModel
from greenmim_convert.compiler.capture import is_timm_model
from greenmim_convert.oracle.reference import dense_masked_reference
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens

DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class StageError:
    """Errors of one output: max |green - ref| and that divided by max |ref|."""

    name: str
    grid: tuple
    tokens: int
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class VerifyReport:
    """Per-stage errors and the verdict; ``rtol`` is the bound on max_rel."""

    rows: List[StageError] = field(default_factory=list)
    rtol: float = 0.0
    dtype: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'output':<8} {'grid':>9} {'tokens':>7} {'max abs':>10} {'max rel':>10}  ok"]
        for r in self.rows:
            lines.append(f"{r.name:<8} {str(r.grid):>9} {r.tokens:>7} {r.max_abs:>10.3e} {r.max_rel:>10.3e}  {r.ok}")
        lines.append(f"rtol {self.rtol:g} ({self.dtype}): {'OK' if self.ok else 'MISMATCH'}")
        return "\n".join(lines)


def compare_tokens(name: str, got: VisibleTokens, ref: VisibleTokens, rtol: float) -> StageError:
    """One row: same sites required, then the error of the features."""
    same_sites = got.grid == ref.grid and torch.equal(got.batch, ref.batch) and torch.equal(got.coords, ref.coords)
    if not same_sites or got.feats.shape != ref.feats.shape:
        return StageError(name, got.grid, got.feats.shape[0], float("inf"), float("inf"), False)
    diff = (got.feats.detach().double() - ref.feats.detach().double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.feats.detach().double().abs().max()) if diff.numel() else 1.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    finite = bool(torch.isfinite(got.feats).all())
    return StageError(name, got.grid, got.feats.shape[0], max_abs, max_rel, finite and max_rel <= rtol)


def reference_kwargs(model: nn.Module, green: GreenModel) -> Dict[str, Any]:
    """``dense_masked_reference`` arguments that read the stages and final features ``convert`` chose: timm's
    ``feature_info`` (none), the maps the model's output holds (a ``BackboneOutput``), or the modules ``convert``
    found them in; ``fmt`` says how a map whose shape reads both ways is laid out (SAM 2's are NHWC)."""
    if is_timm_model(model):
        return {}
    if green.stages_from_output:
        return {"stages_from_output": True, "fmt": green.output_fmt}
    return {"stages": green.stage_modules, "last": green.last_module, "fmt": green.output_fmt}


def reference_of(model: nn.Module, green: GreenModel, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    """The dense masked reference of ``model`` at the stages ``green`` computes (``reference_kwargs``)."""
    return dense_masked_reference(model, images, visible, **reference_kwargs(model, green))


def verify(
    model: nn.Module, green: GreenModel, images: torch.Tensor, visible: torch.Tensor, rtol: Optional[float] = None
) -> VerifyReport:
    """Run both models (no grad) and compare every stage and the final features at visible positions.

    The reference reads the stages ``convert`` read (``reference_of``).
    """
    rtol = DEFAULT_RTOL.get(images.dtype, 1e-5) if rtol is None else rtol
    with torch.no_grad():
        out = green(images, visible)
        ref = reference_of(model, green, images, visible)
    rows = [compare_tokens(f"stage{i}", g, r, rtol) for i, (g, r) in enumerate(zip(out.stages, ref.stages))]
    rows.append(compare_tokens("last", out.last, ref.last, rtol))
    return VerifyReport(rows, rtol, str(images.dtype).replace("torch.", ""))
