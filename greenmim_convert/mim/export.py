"""Export the pre-trained encoder of a run in its source model's own format.

timm: ``model.safetensors``, loadable with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), **the run's model arguments)``; transformers: ``save_pretrained`` (load with
``AutoModel.from_pretrained(DIR)``); torchvision and ``module:factory`` models: ``state_dict.pt``, a plain state
dict with the source model's keys. ``export.json`` beside it says how to load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .build import build_source
from .checkpoint import find_checkpoint, load_checkpoint

EXPORT_INFO = "export.json"


@dataclass
class ExportReport:
    """What :func:`export` wrote: files, tensor count, and the source model's keys it left to their builder."""

    out_dir: Path
    files: List[Path]
    source: str
    model_name: str
    model_kwargs: Dict[str, Any]
    step: int
    num_tensors: int
    missing_keys: List[str] = field(default_factory=list)
    load_with: str = ""


def encoder_state(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The encoder's tensors under the source model's own keys (the MIM model's encoder prefix removed)."""
    prefix = checkpoint["config"]["encoder_prefix"]
    return {k[len(prefix) :]: v.detach().contiguous() for k, v in checkpoint["model"].items() if k.startswith(prefix)}


def source_model(checkpoint: Dict[str, Any]) -> nn.Module:
    """The run's source model rebuilt (random weights) with the run's builder arguments."""
    meta = checkpoint["config"]
    size = meta["img_size"]
    kwargs = dict(meta["model_kwargs"])
    return build_source(meta["model_name"], kwargs, size[0] if size[0] == size[1] else tuple(size), 0).model


def _load_with(meta: Dict[str, Any], out_dir: Path) -> str:
    """The Python line that loads the export into the source model."""
    kwargs = "".join(f", {k}={v!r}" for k, v in meta["model_kwargs"].items() if k != "num_classes")
    if meta["source"] == "timm":
        return (
            f"timm.create_model({meta['model_name']!r}, pretrained=True, pretrained_cfg_overlay=dict("
            f"file={str(out_dir / 'model.safetensors')!r}), num_classes=NUM_CLASSES{kwargs})"
        )
    if meta["source"] == "hf":
        return f"transformers.AutoModel.from_pretrained({str(out_dir)!r})"
    return f"model.load_state_dict(torch.load({str(out_dir / 'state_dict.pt')!r}))"


def export(run: str, out_dir: str) -> ExportReport:
    """Write the encoder of ``run`` (a run folder or a checkpoint) to ``out_dir`` in its source model's format.

    The weights are loaded into the rebuilt source model first (strictly: every key of it must be there, except a
    classifier pre-training built without), so the export holds exactly what that model takes.
    """
    ckpt = load_checkpoint(find_checkpoint(run))
    meta = ckpt["config"]
    state = encoder_state(ckpt)
    model = source_model(ckpt)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise ValueError(
            f"the checkpoint's encoder does not fit {meta['model_name']}: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write(model, meta, out, int(ckpt["step"]))
    report = ExportReport(
        out,
        files,
        meta["source"],
        meta["model_name"],
        dict(meta["model_kwargs"]),
        int(ckpt["step"]),
        len(state),
        load_with=_load_with(meta, out),
    )
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(report).items() if k != "files"}
    (out / EXPORT_INFO).write_text(json.dumps({**info, "files": [f.name for f in files]}, indent=2, default=list))
    return report


def _write(model: nn.Module, meta: Dict[str, Any], out: Path, step: int) -> List[Path]:
    """The source format's files."""
    if meta["source"] == "hf":
        model.save_pretrained(str(out))
        return sorted(p for p in out.iterdir() if p.name != EXPORT_INFO)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if meta["source"] == "timm":
        from safetensors.torch import save_file

        path = out / "model.safetensors"
        save_file(
            state, str(path), metadata={"format": "pt", "model_name": meta["model_name"], "pretrain_step": str(step)}
        )
        return [path]
    path = out / "state_dict.pt"
    torch.save(state, path)
    return [path]


def load_mim(run: str) -> nn.Module:
    """The MIM model of a run (a run folder or a checkpoint), rebuilt from its settings with its trained weights."""
    from .build import build_mim
    from .config import PretrainConfig

    ckpt = load_checkpoint(find_checkpoint(run))
    model = build_mim(PretrainConfig(**ckpt["settings"])).model
    model.load_state_dict(ckpt["model"])
    return model
