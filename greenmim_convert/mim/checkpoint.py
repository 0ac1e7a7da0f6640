"""Pre-training checkpoints: atomic writes, ``last.pt``, pruning, resuming, and the random states of every rank."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from greenmim_convert.errors import InvalidInputError

CHECKPOINT_FORMAT = "greenmim-pretrain/1"
LAST = "last.pt"
CKPT_NAME = re.compile(r"ckpt-(\d{7})\.pt")


def rng_state(mask_gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """This process's random states: torch CPU (drop-path), CUDA when present, the mask generator."""
    state = {"torch": torch.get_rng_state(), "masks": mask_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, torch.Tensor], mask_gen: torch.Generator) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    mask_gen.set_state(state["masks"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename), and copy it to ``last.pt``."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    last = path.parent / LAST
    if path.name != LAST:
        tmp_last = last.with_suffix(".tmp")
        torch.save(payload, tmp_last)
        os.replace(tmp_last, last)


def prune_checkpoints(out_dir: Path, keep: int, current: Path) -> List[Path]:
    """Delete all but the ``keep`` newest (by step) ``ckpt-NNNNNNN.pt`` of ``out_dir``; ``current`` (the one
    ``last.pt`` copies) is always kept. ``keep`` 0 keeps everything. Returns the deleted paths."""
    if keep <= 0:
        return []
    found = sorted((int(m.group(1)), f) for f in out_dir.iterdir() if (m := CKPT_NAME.fullmatch(f.name)))
    doomed = [f for _, f in found[:-keep] if f.name != current.name]
    for f in doomed:
        f.unlink(missing_ok=True)
    return doomed


def resolve_resume(resume: Optional[str], out_dir: Path, main: bool = True) -> Optional[str]:
    """The checkpoint to continue from: an explicit path must exist; ``auto`` (OUT/last.pt) starts afresh when
    absent."""
    if not resume:
        return None
    if resume == "auto":
        path = out_dir / LAST
        if not path.exists():
            if main:
                print(f"no checkpoint at {path}: starting from step 0", file=sys.stderr)
            return None
        return str(path)
    if not Path(resume).is_file():
        raise InvalidInputError(f"--resume {resume}: no such checkpoint")
    return resume


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a pre-training checkpoint (tensors and plain Python values only, nothing unpickled)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInputError(f"{path} is not a greenmim pre-training checkpoint")
    return payload


def find_checkpoint(run: str) -> str:
    """A checkpoint path from a run folder (its ``last.pt``) or a checkpoint file."""
    p = Path(run)
    if p.is_dir():
        p = p / LAST
    if not p.is_file():
        raise InvalidInputError(f"{run}: no checkpoint (a run folder with {LAST}, or a checkpoint file)")
    return str(p)
