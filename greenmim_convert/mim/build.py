"""Building the MIM model of a configuration: the source model (any name ``convert`` accepts on the command line),
its converted encoder (or the dense SimMIM baseline), the decoder and the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from greenmim_convert.api.convert import convert, default_img_size
from greenmim_convert.errors import GreenMIMError, InvalidInputError
from greenmim_convert.tools import models

from .config import PretrainConfig
from .decoders import LinearDecoder, TransformerDecoder
from .dense import dense_encoder
from .model import MIMModel
from .targets import PixelTarget


@dataclass
class BuiltMIM:
    """The MIM model and what rebuilds its source model (name, builder arguments, image size, mask unit, ...)."""

    model: MIMModel
    source: models.BuiltModel
    meta: Dict[str, Any]


def source_kind(name: str) -> str:
    """``timm``, ``torchvision``, ``hf`` or ``factory``: which builder a model name goes to."""
    if models.is_torchvision(name):
        return "torchvision"
    if models.is_hf(name):
        return "hf"
    if models.is_factory(name):
        return "factory"
    return "timm"


def build_source(name: str, model_args: Dict[str, Any], img_size: Any, seed: int) -> models.BuiltModel:
    """The source model, seeded; timm models without a classifier (``num_classes=0``: pre-training has none).

    A timm model that takes no ``img_size`` (a ConvNeXt takes any size) is built without it; the size then only
    goes to ``convert``.
    """
    kwargs = dict(model_args)
    timm_model = source_kind(name) == "timm"
    if timm_model:
        kwargs.setdefault("num_classes", 0)
    torch.manual_seed(seed)
    try:
        return models.build(name, kwargs, img_size)
    except InvalidInputError as exc:
        if not (timm_model and img_size is not None and "img_size" in str(exc)):
            raise
    torch.manual_seed(seed)
    built = models.build(name, kwargs, None)
    built.img_size = img_size
    return built


def encoder_dim(encoder: nn.Module) -> int:
    """Channels of the encoder's final tokens, from one all-visible forward of a one-image batch."""
    p = next(encoder.parameters())
    was = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            images = torch.zeros(1, 3, *encoder.img_size, device=p.device, dtype=p.dtype)
            visible = torch.ones(1, *encoder.mask_grid, dtype=torch.bool, device=p.device)
            return encoder(images, visible).last.num_channels
    finally:
        encoder.train(was)


def build_encoder(source: models.BuiltModel, dense: bool, mask_unit: Any, grouping: str) -> nn.Module:
    """The converted encoder (a GreenModel), or with ``dense`` the SimMIM baseline (a DenseEncoder)."""
    net = source.model
    if dense:
        size = source.img_size if source.img_size is not None else default_img_size(net)
        if size is None:
            raise InvalidInputError(f"{type(net).__name__} does not state its image size: pass --img-size")
        return dense_encoder(net, size, mask_unit)
    try:
        green = convert(net, img_size=source.img_size, mask_unit=mask_unit, grouping=grouping)
    except GreenMIMError as exc:
        raise InvalidInputError(f"{source.name} cannot be converted: {type(exc).__name__}: {exc}") from None
    green.config.model_name = green.report.model = source.name
    green.config.model_kwargs = dict(source.kwargs)
    return green


def build_decoder(cfg: PretrainConfig, enc_dim: int, grid: Tuple[int, int], unit: int) -> nn.Module:
    """The decoder ``cfg.decoder`` names: the light transformer, or SimMIM's linear head."""
    if cfg.decoder == "linear":
        return LinearDecoder(enc_dim, grid, unit)
    return TransformerDecoder(enc_dim, grid, unit, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)


def build_mim(cfg: PretrainConfig, dense: bool = None) -> BuiltMIM:
    """Seeded source model -> encoder -> decoder and target -> MIMModel; ``dense`` overrides ``cfg.dense``."""
    dense = cfg.dense if dense is None else dense
    source = build_source(cfg.model, cfg.model_args, cfg.img_size, cfg.seed)
    encoder = build_encoder(source, dense, cfg.mask_unit, cfg.grouping)
    decoder = build_decoder(cfg, encoder_dim(encoder), tuple(encoder.mask_grid), int(encoder.mask_unit))
    model = MIMModel(encoder, decoder, PixelTarget(cfg.norm_pix))
    meta = {
        "model_name": cfg.model,
        "source": source_kind(cfg.model),
        "model_kwargs": dict(source.kwargs),
        "img_size": list(encoder.img_size),
        "mask_unit": int(encoder.mask_unit),
        "dense": bool(dense),
        "encoder_prefix": "encoder.model." if dense else "encoder.",
    }
    return BuiltMIM(model, source, meta)
