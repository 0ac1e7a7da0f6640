"""Export the encoder of a pre-training checkpoint as plain timm weights, ready for fine-tuning.

The pre-trained encoder is the timm model itself (the converted model shares its Parameters), so
its weights are the ``encoder.`` entries of the checkpoint with the prefix removed. Pre-training
builds the model without a classifier (``num_classes=0``); the file therefore holds every backbone
tensor and no head. Load it into ``timm.create_model(name, num_classes=N, **same kwargs)`` with
``strict=False``: the only missing keys are the classifier's, which keep timm's fresh
initialisation for fine-tuning.

    python examples/load_into_timm.py runs/demo/last.pt -o swin_pretrained.safetensors

The script checks that the keys match and that the dense timm model with these weights computes
the same features as the converted model on an image with every unit visible.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch

import greenmim_convert as gmc

CHECKPOINT_FORMAT = "greenmim-pretrain/1"
EXPORT_FORMAT = "greenmim-pretrained-encoder/1"


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by ``examples/pretrain.py`` (tensors and plain values only, nothing unpickled)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a greenmim pre-training checkpoint")
    return payload


def encoder_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The encoder's tensors under timm's own key names (the ``encoder.`` prefix removed)."""
    prefix = checkpoint["config"].get("encoder_prefix", "encoder.")
    return {k[len(prefix):]: v.detach().contiguous() for k, v in checkpoint["model"].items() if k.startswith(prefix)}


def create_timm_model(config: Dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """``timm.create_model`` with the pre-training run's name and arguments (random init, nothing downloaded)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config["model_kwargs"]).items()}
    return timm.create_model(config["model_name"], pretrained=False, **{**kwargs, **overrides})


def head_keys(model: torch.nn.Module) -> set:
    """State-dict keys of the model's classifier (what fine-tuning re-initialises)."""
    keys = set()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, torch.nn.Module):
        ids = {id(t) for t in classifier.state_dict(keep_vars=True).values()}
        keys = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}
    return keys


def check_keys(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Tuple[list, list, list]:
    """Load ``state`` non-strictly; returns (missing backbone keys, missing head keys, unexpected keys)."""
    result = model.load_state_dict(state, strict=False)
    head = head_keys(model)
    missing_backbone = sorted(k for k in result.missing_keys if k not in head)
    missing_head = sorted(k for k in result.missing_keys if k in head)
    return missing_backbone, missing_head, sorted(result.unexpected_keys)


def dense_vs_converted(model: torch.nn.Module, img_size: Sequence[int], mask_unit: int, seed: int = 0) -> float:
    """Max relative error between timm ``forward_features`` and the converted model with every unit visible (float32)."""
    model = model.float().eval()
    green = gmc.convert(model, img_size=tuple(img_size), mask_unit=mask_unit)
    images = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(seed))
    visible = torch.ones(2, *green.mask_grid, dtype=torch.bool)
    with torch.no_grad():
        dense = model.forward_features(images)
        sparse = green(images, visible).last.to_dense()
    if dense.dim() == 4 and dense.shape[-1] == sparse.shape[1]:
        dense = dense.permute(0, 3, 1, 2)
    elif dense.dim() == 3:
        dense = dense.transpose(1, 2).reshape(sparse.shape)
    return float((sparse - dense).abs().max() / dense.abs().max().clamp_min(1e-30))


def write_weights(state: Dict[str, torch.Tensor], out_path: str, metadata: Dict[str, str]) -> None:
    """safetensors for ``.safetensors`` paths, else ``torch.save`` of the tensor dict."""
    if str(out_path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(out_path), metadata=metadata)
    else:
        torch.save(state, out_path)


def export_encoder(checkpoint_path: str, out_path: str, verify: bool = True) -> Dict[str, Any]:
    """Write the checkpoint's encoder as timm weights to ``out_path`` and check they load into the dense model.

    Returns a report: model name and arguments, tensor count, missing backbone keys (must be empty),
    missing head keys (re-initialised at fine-tuning), unexpected keys (must be empty) and, when
    ``verify``, the relative error of dense timm vs converted features on an all-visible image.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    state = encoder_state_dict(checkpoint)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_weights(state, out_path, {
        "format": EXPORT_FORMAT,
        "model_name": config["model_name"],
        "model_kwargs": json.dumps(config["model_kwargs"]),
        "pretrain_step": str(checkpoint["step"]),
    })
    model = create_timm_model(config)
    missing_backbone, missing_head, unexpected = check_keys(model, state)
    report: Dict[str, Any] = {
        "out_path": str(out_path),
        "model_name": config["model_name"],
        "model_kwargs": config["model_kwargs"],
        "step": int(checkpoint["step"]),
        "num_tensors": len(state),
        "missing_backbone_keys": missing_backbone,
        "missing_head_keys": missing_head,
        "unexpected_keys": unexpected,
        "keys_ok": not missing_backbone and not unexpected,
    }
    if verify:
        report["max_rel_err"] = dense_vs_converted(model, config["img_size"], int(config["mask_unit"]))
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command line of the export script."""
    p = argparse.ArgumentParser(
        description="Write the encoder of a greenmim pre-training checkpoint as timm weights for fine-tuning.",
        epilog="example: python examples/load_into_timm.py runs/demo/last.pt -o swin_pretrained.safetensors",
    )
    p.add_argument("checkpoint", help="checkpoint written by examples/pretrain.py (e.g. OUT/last.pt)")
    p.add_argument("-o", "--output", default="encoder.safetensors", help=".safetensors, or anything else for torch.save")
    p.add_argument("--no-verify", action="store_true", help="skip the dense-vs-converted check")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error accepted (float32)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Export, print the key and equivalence checks; exit status 1 when a check fails."""
    args = build_parser().parse_args(argv)
    report = export_encoder(args.checkpoint, args.output, verify=not args.no_verify)
    print(f"wrote {report['num_tensors']} tensors of {report['model_name']} (pre-training step {report['step']}) to {report['out_path']}")
    print(f"missing backbone keys: {report['missing_backbone_keys'] or 'none'}")
    print(f"unexpected keys: {report['unexpected_keys'] or 'none'}")
    print(f"classifier keys left to timm's initialisation: {report['missing_head_keys'] or 'none'}")
    ok = report["keys_ok"]
    if "max_rel_err" in report:
        close = report["max_rel_err"] <= args.tolerance
        print(f"dense timm vs converted, all units visible: max relative error {report['max_rel_err']:.2e} "
              f"({'ok' if close else 'MISMATCH'}, tolerance {args.tolerance:g})")
        ok = ok and close
    kwargs = ", ".join(f"{k}={v!r}" for k, v in report["model_kwargs"].items())
    reader = "safetensors.torch.load_file" if str(args.output).endswith(".safetensors") else "torch.load"
    print("fine-tune with:\n"
          f"  model = timm.create_model({report['model_name']!r}, num_classes=NUM_CLASSES{', ' + kwargs if kwargs else ''})\n"
          f"  model.load_state_dict({reader}({str(args.output)!r}), strict=False)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
