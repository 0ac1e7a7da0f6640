"""Model names of the command line: a timm name, or ``torchvision:NAME`` for a torchvision classifier.

Both are built with random weights (nothing is downloaded). torchvision models do not state their
input size, so they get ``TORCHVISION_IMG_SIZE`` unless an image size is given.
"""
from __future__ import annotations

import difflib
import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import timm
import torch.nn as nn

from .errors import InvalidInputError

TORCHVISION = "torchvision"
PREFIX = TORCHVISION + ":"
TORCHVISION_IMG_SIZE = 224
TORCHVISION_HIERARCHICAL = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t")


class UnknownModelError(InvalidInputError):
    """A model name that neither timm nor torchvision knows; ``suggestions`` are close matches."""

    def __init__(self, message: str, suggestions: List[str]):
        self.suggestions = suggestions
        super().__init__(message)


@dataclass
class BuiltModel:
    """A built model, the builder arguments that rebuild it, and the image size to convert it at (None: its own)."""

    name: str
    model: nn.Module
    kwargs: Dict[str, Any] = field(default_factory=dict)
    img_size: Optional[int] = None


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


def suggest(name: str, names: List[str], n: int = 5) -> List[str]:
    """Close matches for a misspelt model name: similar names of the same family first."""
    scored = sorted(names, key=lambda c: -difflib.SequenceMatcher(None, name, c).ratio())
    family = name.split("_")[0][:4]
    same = [c for c in scored if c.startswith(name)] + [c for c in scored if c.startswith(family) and not c.startswith(name)]
    return (same + [c for c in scored if c not in same])[:n]


def torchvision_names() -> List[str]:
    """torchvision's classification models, without the prefix."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def torchvision_hierarchical() -> List[str]:
    """The hierarchical ViT-like torchvision models, with the prefix (what ``list --family torchvision`` covers)."""
    return [PREFIX + n for n in TORCHVISION_HIERARCHICAL]


def check_name(name: str) -> None:
    """Raise UnknownModelError, with close matches, when ``name`` names no timm or torchvision model."""
    if is_torchvision(name):
        bare, names = name[len(PREFIX):], torchvision_names()
        if bare not in names:
            close = [PREFIX + c for c in suggest(bare, names)]
            raise UnknownModelError(f"unknown torchvision model {bare!r}.{_hint(close)}", close)
        return
    names = timm.list_models()
    if name not in names:
        close = suggest(name, names)
        if name in torchvision_names():
            close = [PREFIX + name] + close[:4]
        raise UnknownModelError(f"unknown timm model {name!r}.{_hint(close)}", close)


def _hint(close: List[str]) -> str:
    return f" Did you mean: {', '.join(close)}?" if close else ""


def build(name: str, model_kwargs: Optional[Dict[str, Any]] = None, img_size: Optional[int] = None) -> BuiltModel:
    """Build ``name`` with random weights; ``model_kwargs`` go to ``timm.create_model`` or torchvision's builder.

    timm gets ``img_size`` as today. For torchvision the image size defaults to 224 and is passed as
    ``input_size`` to models that take one (MaxViT).
    """
    check_name(name)
    kwargs = dict(model_kwargs or {})
    if not is_torchvision(name):
        if img_size is not None:
            kwargs.setdefault("img_size", img_size)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"timm.create_model({name!r}, **{kwargs}) failed: {exc}") from None
        return BuiltModel(name, model, kwargs, img_size)
    bare = name[len(PREFIX):]
    size = img_size or torchvision_img_size(bare)
    cls = _model_class(bare)
    if cls is not None and "input_size" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("input_size", (size, size))
    model = _build_torchvision(bare, cls, kwargs)
    return BuiltModel(name, model, kwargs, size)


def torchvision_img_size(bare: str) -> int:
    """The image size torchvision's default weights were evaluated at (their crop size: 256 for Swin V2),
    else ``TORCHVISION_IMG_SIZE``; read from the weights' metadata, nothing is downloaded."""
    import torchvision

    try:
        crop = torchvision.models.get_model_weights(bare).DEFAULT.transforms().crop_size
    except (ValueError, AttributeError, KeyError):  # a builder without registered weights
        return TORCHVISION_IMG_SIZE
    return int(crop[0])


def _model_class(bare: str) -> Optional[type]:
    """The class a torchvision builder returns (its return annotation), or None when it does not say."""
    import torchvision

    cls = inspect.signature(torchvision.models.get_model_builder(bare)).return_annotation
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _build_torchvision(bare: str, cls: Optional[type], kwargs: Dict[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(bare, weights=None, **kwargs)``.

    The builders fix the architecture (``swin_t`` passes its own ``depths``, ``embed_dim``, ...) and
    refuse those keywords; such keywords go to the model class instead, replacing the builder's values.
    """
    import torchvision

    rest, overrides = dict(kwargs), {}
    while True:
        try:
            with _overriding(cls, overrides):
                return torchvision.models.get_model(bare, weights=None, **rest)
        except TypeError as exc:
            match = re.search(r"multiple values for keyword argument '(\w+)'", str(exc))
            if match is None or match.group(1) not in rest or cls is None:
                raise InvalidInputError(f"torchvision.models.get_model({bare!r}, **{kwargs}) failed: {exc}") from None
            overrides[match.group(1)] = rest.pop(match.group(1))
        except ValueError as exc:
            raise InvalidInputError(f"torchvision.models.get_model({bare!r}, **{kwargs}) failed: {exc}") from None


@contextmanager
def _overriding(cls: Optional[type], overrides: Dict[str, Any]) -> Iterator[None]:
    """Within the block, the first construction of ``cls`` gets ``overrides`` in place of the same keywords."""
    if not overrides:
        yield
        return
    own = cls.__dict__.get("__init__")
    original = cls.__init__
    pending = [True]

    def init(self, *args, **kw):
        if pending[0]:
            pending[0] = False
            kw = {**kw, **overrides}
        original(self, *args, **kw)

    cls.__init__ = init
    try:
        yield
    finally:
        if own is None:
            del cls.__init__
        else:
            cls.__init__ = own
