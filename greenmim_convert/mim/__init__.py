"""Masked-image-modeling pre-training on converted encoders: the MIM model, decoders, targets, mask generators,
the dense SimMIM baseline, and the training engine behind ``greenmim-convert pretrain``."""

from .build import BuiltMIM, build_mim, build_source
from .config import PretrainConfig, resolve
from .decoders import LinearDecoder, TransformerDecoder
from .dense import DenseEncoder, SimMIMDense, dense_encoder
from .engine import TrainResult, run, train
from .export import ExportReport, export
from .masks import BlockMask, RandomMask, UniformMask, mask_generator
from .model import MIMModel, MIMOutput, unit_tokens
from .targets import PixelTarget, patchify, unpatchify

__all__ = [
    "MIMModel",
    "MIMOutput",
    "unit_tokens",
    "TransformerDecoder",
    "LinearDecoder",
    "PixelTarget",
    "patchify",
    "unpatchify",
    "RandomMask",
    "BlockMask",
    "UniformMask",
    "mask_generator",
    "SimMIMDense",
    "DenseEncoder",
    "dense_encoder",
    "PretrainConfig",
    "resolve",
    "build_mim",
    "build_source",
    "BuiltMIM",
    "train",
    "run",
    "TrainResult",
    "export",
    "ExportReport",
]
