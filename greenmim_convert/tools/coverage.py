"""Coverage matrix: which models of the hierarchical families (timm's, torchvision's and transformers' vision
backbones) convert, verify, and why not."""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import timm
import torch

from greenmim_convert.api.convert import convert
from greenmim_convert.api.masking import random_mask
from greenmim_convert.errors import GreenMIMError, UnsupportedOperationError
from greenmim_convert.oracle.verify import verify
from greenmim_convert.tools import models

TIMM_FAMILIES = (
    "swin",
    "swinv2",
    "swinv2_cr",
    "twins_pcpvt",
    "twins_svt",
    "pvt_v2",
    "davit",
    "gcvit",
    "maxvit",
    "focalnet",
    "hiera",
    "mvitv2",
    "nest",
    "convnext",
    "convnextv2",
)
VERIFY_CHOICES = ("none", "smallest", "all")
FAMILIES = TIMM_FAMILIES + models.NAMESPACES  # a namespace's family is the models of its prefix


@dataclass
class CoverageRow:
    """One model: ``status`` is converts, unsupported or error and ``detail`` says why; ``verified`` is
    ✓, ✗ or "not run" (float32, one masked image against the dense masked oracle)."""

    model: str
    family: str
    status: str
    detail: str = ""
    params: int = 0
    verified: str = "not run"


def family_of(name: str) -> Optional[str]:
    """The namespace of a ``torchvision:`` or ``hf:`` name, else the longest family prefix of a timm model name
    (tagged or not)."""
    namespace = models.namespace_of(name)
    if namespace is not None:
        return namespace
    best = None
    for fam in TIMM_FAMILIES:
        if name.startswith(fam + "_") and (best is None or len(fam) > len(best)):
            best = fam
    return best


def family_models(families: Iterable[str] = FAMILIES) -> List[str]:
    """Every timm model name of the given families, then the models of each namespace asked for (torchvision's
    hierarchical models, transformers' vision backbones)."""
    wanted = set(families)
    names = [n for n in timm.list_models() if family_of(n) in wanted]
    return names + [n for ns in models.NAMESPACES if ns in wanted for n in models.namespace_models(ns)]


def _short(exc: Exception) -> str:
    if isinstance(exc, UnsupportedOperationError):
        where = exc.where.split(" at ")[0] if exc.where else ""
        return f"{exc.reason} [{where}]"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def check_model(
    name: str, verify_it: bool = False, seed: int = 0, model_kwargs: Optional[Dict[str, Any]] = None
) -> CoverageRow:
    """Build ``name`` (timm, torchvision or transformers; ``model_kwargs`` to its builder) with random weights,
    convert it, optionally verify it on one masked image."""
    fam = family_of(name) or ""
    try:
        torch.manual_seed(seed)
        built = models.build(name, model_kwargs)
        model = built.model.eval()
    except Exception as exc:  # a model its library cannot build here, or with these arguments
        return CoverageRow(name, fam, "error", f"{models.builder_of(name)} failed: {_short(exc)}")
    params = sum(p.numel() for p in model.parameters())
    try:
        green = convert(model, img_size=built.img_size)
    except GreenMIMError as exc:
        return CoverageRow(name, fam, "unsupported", _short(exc), params)
    except Exception as exc:  # a compiler failure that is not a diagnosed error: one row, not the whole list
        return CoverageRow(name, fam, "error", f"convert raised {_short(exc)}", params)
    row = CoverageRow(name, fam, "converts", f"mask unit {green.mask_unit}px", params)
    if verify_it:
        gen = torch.Generator().manual_seed(seed)
        visible = random_mask(1, green.mask_grid, 0.75, generator=gen)
        images = torch.randn(1, 3, *green.img_size, generator=gen)
        try:
            report = verify(model, green, images, visible)
        except Exception as exc:  # the oracle itself cannot run this model: say so in the row
            row.verified, row.detail = "✗", f"{row.detail}; verify failed: {_short(exc)}"
            return row
        worst = max(r.max_rel for r in report.rows)
        row.verified = "✓" if report.ok else "✗"
        row.detail = f"{row.detail}; max rel err {worst:.1e} (float32)"
    return row


def _release_memory() -> None:
    """Free what the last model left behind (reference cycles, and pages glibc keeps after large frees), so that a
    list of a hundred models, some of them 200M parameters, stays at the memory of its largest model."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def coverage(
    names: List[str],
    verify: str = "none",
    progress: Optional[Callable[[str], None]] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> List[CoverageRow]:
    """Convert every model (``model_kwargs`` go to each one's builder); verify all of them, none, or the smallest
    converting model (by parameters) of each family."""
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify must be one of {VERIFY_CHOICES}, not {verify!r}")
    rows = []
    for name in names:
        rows.append(check_model(name, verify == "all", model_kwargs=model_kwargs))
        _release_memory()
        if progress:
            progress(name)
    if verify == "smallest":
        smallest = {}
        for i, r in enumerate(rows):
            if r.status == "converts" and (r.family not in smallest or r.params < rows[smallest[r.family]].params):
                smallest[r.family] = i
        for i in smallest.values():
            rows[i] = check_model(rows[i].model, True, model_kwargs=model_kwargs)
            _release_memory()
            if progress:
                progress(f"verified {rows[i].model}")
    return rows


def markdown(rows: List[CoverageRow]) -> str:
    """The README's coverage table."""
    lines = ["| model | family | status | verified | detail |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| `{r.model}` | {r.family} | {r.status} | {r.verified} | {detail} |")
    return "\n".join(lines)
