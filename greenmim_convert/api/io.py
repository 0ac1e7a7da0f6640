"""Save and load converted models: model name (timm's, or ``torchvision:NAME``) + config as JSON metadata,
weights as safetensors.

Loading re-creates the source model, loads the weights and converts it again, so no Python object is
ever unpickled from the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from greenmim_convert.api.convert import GreenModel, convert
from greenmim_convert.errors import GreenMIMError, LoadError
from greenmim_convert.tools import models

FORMAT = "greenmim-convert/1"


def save(green: GreenModel, path: str, model_kwargs: Optional[Dict[str, Any]] = None) -> None:
    """Write ``green``'s config and weights to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    config = green.config.to_dict()
    if model_kwargs is not None:
        config["model_kwargs"] = dict(model_kwargs)
    state = {k: v.detach().contiguous().cpu() for k, v in green.state_dict().items()}
    save_file(state, path, metadata={"format": FORMAT, "config": json.dumps(config)})


def load(path: str, map_location: str = "cpu") -> GreenModel:
    """Rebuild a GreenModel from a file written by ``save``; raises LoadError for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not os.path.isfile(path):
        raise LoadError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path, device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{path} is not a safetensors file written by greenmim-convert: {exc}") from None
    if meta.get("format") != FORMAT:
        raise LoadError(f"{path} has no greenmim-convert metadata (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        config = json.loads(meta["config"])
        name = config["model_name"]
        kwargs = dict(config.get("model_kwargs") or {})
        model = models.build(name, kwargs).model
    except (KeyError, json.JSONDecodeError, RuntimeError, TypeError, GreenMIMError) as exc:
        raise LoadError(f"{path}: damaged greenmim-convert config: {exc}") from None
    first = next((v for v in state.values() if v.is_floating_point()), None)  # index buffers are integers
    if first is not None:
        model = model.to(first.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LoadError(
            f"{path}: weights do not match {name} (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    green = convert(
        model,
        img_size=tuple(config["img_size"]),
        mask_unit=int(config["mask_unit"]),
        grouping=config.get("grouping", "dp"),
        attention_backend=config.get("attention_backend", "auto"),
    )
    green.config.model_name, green.config.model_kwargs = name, kwargs
    return green.to(map_location)
