"""greenmim-convert: compile timm hierarchical ViTs into visible-patches-only models for MIM."""
from .convert import ConversionReport, GreenConfig, GreenModel, convert
from .io import load, save
from .masking import random_mask
from .reference import dense_masked_reference
from .verify import VerifyReport, verify
from .errors import (
    GreenMIMError, InvalidInputError, LoadError, MaskUnitError, TraceError, UnsupportedOperationError,
)
from .sites import Sites
from .tokens import GreenOutput, VisibleTokens

__all__ = [
    "convert", "random_mask", "dense_masked_reference", "verify", "VerifyReport", "save", "load", "GreenModel", "GreenConfig", "ConversionReport", "GreenOutput", "VisibleTokens", "Sites",
    "GreenMIMError", "InvalidInputError", "LoadError", "MaskUnitError", "TraceError", "UnsupportedOperationError",
]
__version__ = "0.1.0"
