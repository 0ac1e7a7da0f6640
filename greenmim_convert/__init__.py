"""greenmim-convert: compile hierarchical vision models into visible-patches-only models for MIM.

Subpackages by lifecycle: ``api`` (convert, GreenModel, masks, save/load), ``compiler`` (capture, layouts, the
pass pipeline; the passes themselves are ``greenmim_convert.passes``), ``runtime`` (plan, ops, attention, compile
support; kernels are ``greenmim_convert.kernels``), ``oracle`` (the masked dense reference and ``verify``) and
``tools`` (command line, benchmarks, FLOPs, coverage). The oracle is imported on first use only.
"""

from importlib import import_module
from typing import Any

from greenmim_convert.api.convert import ConversionReport, GreenConfig, GreenModel, convert
from greenmim_convert.api.io import load, save
from greenmim_convert.api.masking import random_mask
from greenmim_convert.errors import (
    GreenMIMError,
    InvalidInputError,
    LoadError,
    MaskUnitError,
    TraceError,
    UnsupportedOperationError,
)
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens

_LAZY = {
    "dense_masked_reference": "greenmim_convert.oracle.reference",
    "verify": "greenmim_convert.oracle.verify",
    "VerifyReport": "greenmim_convert.oracle.verify",
}

__all__ = [
    "convert",
    "random_mask",
    "dense_masked_reference",
    "verify",
    "VerifyReport",
    "save",
    "load",
    "GreenModel",
    "GreenConfig",
    "ConversionReport",
    "GreenOutput",
    "VisibleTokens",
    "Sites",
    "GreenMIMError",
    "InvalidInputError",
    "LoadError",
    "MaskUnitError",
    "TraceError",
    "UnsupportedOperationError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The oracle's entry points, imported on first use (the oracle imports a dozen timm model modules)."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'greenmim_convert' has no attribute {name!r}")
