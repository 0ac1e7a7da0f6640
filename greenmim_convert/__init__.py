"""greenmim-convert: compile timm hierarchical ViTs into visible-patches-only models for MIM."""
from .convert import ConversionReport, GreenConfig, GreenModel, convert
from .errors import (
    GreenMIMError, InvalidInputError, LoadError, MaskUnitError, TraceError, UnsupportedOperationError,
)
from .sites import Sites
from .tokens import GreenOutput, VisibleTokens

__all__ = [
    "convert", "GreenModel", "GreenConfig", "ConversionReport", "GreenOutput", "VisibleTokens", "Sites",
    "GreenMIMError", "InvalidInputError", "LoadError", "MaskUnitError", "TraceError", "UnsupportedOperationError",
]
__version__ = "0.1.0"
