"""Coverage matrix: which timm models of the hierarchical families convert (and verify), and why not."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import timm
import torch

from .convert import convert
from .errors import GreenMIMError, UnsupportedOperationError
from .masking import random_mask
from .verify import verify

FAMILIES = ("swin", "swinv2", "swinv2_cr", "twins_pcpvt", "twins_svt", "pvt_v2", "davit", "gcvit", "maxvit",
            "focalnet", "hiera", "mvitv2", "nest")


@dataclass
class CoverageRow:
    """One model: ``status`` is verified, converts, mismatch, unsupported or error; ``detail`` says why."""

    model: str
    family: str
    status: str
    detail: str = ""


def family_of(name: str) -> Optional[str]:
    """The longest family prefix of a timm model name."""
    best = None
    for fam in FAMILIES:
        if name.startswith(fam + "_") and (best is None or len(fam) > len(best)):
            best = fam
    return best


def family_models(families: Iterable[str] = FAMILIES) -> List[str]:
    """Every timm model name of the given families."""
    wanted = set(families)
    return [n for n in timm.list_models() if family_of(n) in wanted]


def _short(exc: Exception) -> str:
    if isinstance(exc, UnsupportedOperationError):
        where = exc.where.split(" at ")[0] if exc.where else ""
        return f"{exc.reason} [{where}]"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def check_model(name: str, verify_it: bool = False, seed: int = 0) -> CoverageRow:
    """Create ``name`` with random weights, convert it, and optionally verify it on one masked image."""
    fam = family_of(name) or ""
    try:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as exc:  # a model timm itself cannot build here
        return CoverageRow(name, fam, "error", f"timm.create_model failed: {_short(exc)}")
    try:
        green = convert(model)
    except GreenMIMError as exc:
        return CoverageRow(name, fam, "unsupported", _short(exc))
    if not verify_it:
        return CoverageRow(name, fam, "converts", f"mask unit {green.mask_unit}px")
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(1, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(1, 3, *green.img_size, generator=gen)
    report = verify(model, green, images, visible)
    worst = max(r.max_rel for r in report.rows)
    return CoverageRow(name, fam, "verified" if report.ok else "mismatch", f"max rel err {worst:.1e} (float32)")


def coverage(names: List[str], verify_it: bool = False, progress: Optional[Callable[[str], None]] = None) -> List[CoverageRow]:
    rows = []
    for name in names:
        rows.append(check_model(name, verify_it))
        if progress:
            progress(name)
    return rows


def markdown(rows: List[CoverageRow]) -> str:
    """The README's coverage table."""
    lines = ["| model | family | status | detail |", "| --- | --- | --- | --- |"]
    for r in rows:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| `{r.model}` | {r.family} | {r.status} | {detail} |")
    return "\n".join(lines)
