"""Model names of the command line: a timm name (a pretrained tag allowed: ``swin_tiny_patch4_window7_224.ms_in1k``),
``torchvision:NAME`` for a torchvision classifier, ``hf:TYPE`` / ``hf:TYPE/backbone`` for a transformers model type,
or ``package.module:factory`` for a Python callable returning an ``nn.Module``.

All are built with random weights (nothing is downloaded). torchvision models do not state their
input size, so they get ``TORCHVISION_IMG_SIZE`` unless an image size is given. transformers is an
optional dependency, imported only for ``hf:`` names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.machinery
import importlib.util
import inspect
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import timm
import torch.nn as nn

from greenmim_convert.errors import InvalidInputError

TORCHVISION = "torchvision"
PREFIX = TORCHVISION + ":"
TORCHVISION_IMG_SIZE = 224
TORCHVISION_HIERARCHICAL = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t")
HF = "hf"
HF_PREFIX = HF + ":"
HF_BACKBONE = "/backbone"  # hf:TYPE/backbone builds AutoBackbone instead of AutoModel
HF_IMG_SIZE = 224  # for configs without an image_size
HF_VISION_BACKBONES = (
    "swin",
    "swinv2",
    "donut-swin",
    "maskformer-swin",
    "focalnet",
    "convnext",
    "convnextv2",
    "pvt",
    "pvt_v2",
    "segformer",
    "hiera",
    "cvt",
    "poolformer",
    "resnet",
    "mobilevit",
    "levit",
    "swiftformer",
    "vitdet",
    "sam2_hiera_det_model",
)
NAMESPACES = (TORCHVISION, HF)  # name prefixes NAMESPACE:..., each also a family of ``list``
TIMM_SOURCES = ("hf-hub", "hf_hub", "local-dir")  # timm prefixes that read a checkpoint's config
ImgSize = Union[int, Tuple[int, int]]


class UnknownModelError(InvalidInputError):
    """A model name that neither timm, torchvision nor transformers knows; ``suggestions`` are close matches."""

    def __init__(self, message: str, suggestions: List[str]):
        self.suggestions = suggestions
        super().__init__(message)


@dataclass
class BuiltModel:
    """A built model, the builder arguments that rebuild it, and the image size to convert it at (None: its own)."""

    name: str
    model: nn.Module
    kwargs: Dict[str, Any] = field(default_factory=dict)
    img_size: Optional[ImgSize] = None


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


def is_hf(name: str) -> bool:
    return name.startswith(HF_PREFIX)


FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_factory(name: str) -> bool:
    """``package.module:factory``: a Python callable (``module:Class.method`` too) that returns an ``nn.Module``."""
    head = name.split(":", 1)[0]
    return bool(FACTORY.fullmatch(name)) and head not in NAMESPACES and head.lower() not in TIMM_SOURCES


def _factory(name: str) -> Any:
    """The callable ``package.module:attr.path`` names; InvalidInputError when it cannot be imported."""
    module_name, _, path = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInputError(f"{name!r}: cannot import module {module_name!r} ({exc})") from None
    for part in path.split("."):
        if not hasattr(obj, part):
            raise InvalidInputError(f"{name!r}: {module_name} has no attribute {path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InvalidInputError(f"{name!r} is {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def _build_factory(name: str, kwargs: Dict[str, Any], img_size: Optional[ImgSize]) -> BuiltModel:
    """Call the factory with ``kwargs`` (and ``img_size`` when it takes one); the result must be an nn.Module."""
    fn = _factory(name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if img_size is not None and "img_size" in params:
        kwargs.setdefault("img_size", img_size)
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise InvalidInputError(f"{name}(**{kwargs}) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"{name}() returned {type(model).__name__}, not an nn.Module")
    return BuiltModel(name, model, kwargs, img_size)


def namespace_of(name: str) -> Optional[str]:
    """``torchvision`` or ``hf`` for a name with that prefix, None for a timm name."""
    return next((ns for ns in NAMESPACES if name.startswith(ns + ":")), None)


def namespace_models(namespace: str) -> List[str]:
    """The models ``list --family NAMESPACE`` covers, with their prefix."""
    return torchvision_hierarchical() if namespace == TORCHVISION else hf_vision_backbones()


def builder_of(name: str) -> str:
    """The call that builds ``name``, for error messages."""
    if is_torchvision(name):
        return "torchvision.models.get_model"
    if is_hf(name):
        return f"transformers.{'AutoBackbone' if split_hf(name)[1] else 'AutoModel'}.from_config"
    if is_factory(name):
        return name
    return "timm.create_model"


def suggest(name: str, names: List[str], n: int = 5) -> List[str]:
    """Close matches for a misspelt model name: similar names of the same family first."""
    scored = sorted(names, key=lambda c: -difflib.SequenceMatcher(None, name, c).ratio())
    family = name.split("_")[0][:4]
    same = [c for c in scored if c.startswith(name)] + [
        c for c in scored if c.startswith(family) and not c.startswith(name)
    ]
    return (same + [c for c in scored if c not in same])[:n]


def torchvision_names() -> List[str]:
    """torchvision's classification models, without the prefix."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def torchvision_hierarchical() -> List[str]:
    """The hierarchical ViT-like torchvision models, with the prefix (what ``list --family torchvision`` covers)."""
    return [PREFIX + n for n in TORCHVISION_HIERARCHICAL]


def check_name(name: str) -> None:
    """Raise UnknownModelError, with close matches, when ``name`` names no timm, torchvision or transformers model
    (or a timm model with a pretrained tag timm does not know); ``hf:`` names import transformers."""
    if is_torchvision(name):
        bare, names = name[len(PREFIX) :], torchvision_names()
        if bare not in names:
            close = [PREFIX + c for c in suggest(bare, names)]
            raise UnknownModelError(f"unknown torchvision model {bare!r}.{_hint(close)}", close)
        return
    if is_hf(name):
        _check_hf(name)
        return
    if is_factory(name):
        _factory(name)
        return
    _check_timm(name)


def _check_timm(name: str) -> None:
    """``name`` as ``timm.create_model`` resolves it: an architecture (current or deprecated) and an optional tag."""
    source = name.split(":", 1)[0].lower()
    if ":" in name and source in TIMM_SOURCES:
        raise InvalidInputError(
            f"{name!r} reads a checkpoint's config from the Hub or a folder; greenmim-convert builds "
            "random weights from a timm name (with an optional pretrained tag) and downloads nothing"
        )
    arch, dot, tag = name.partition(".")
    if not timm.is_model(arch):
        names = timm.list_models() + (timm.list_models(include_tags=True) if dot else [])
        close = suggest(name, list(dict.fromkeys(names)))
        if name in torchvision_names():
            close = [PREFIX + name] + close[:4]
        raise UnknownModelError(f"unknown timm model {name!r}.{_hint(close)}", close)
    if dot:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            close = suggest(name, timm.list_models(arch + ".*", include_tags=True))
            raise UnknownModelError(
                f"unknown pretrained tag {tag!r} of timm model {arch!r}.{_hint(close)}", close
            ) from None


def _hint(close: List[str]) -> str:
    return f" Did you mean: {', '.join(close)}?" if close else ""


def build(name: str, model_kwargs: Optional[Dict[str, Any]] = None, img_size: Optional[int] = None) -> BuiltModel:
    """Build ``name`` with random weights; ``model_kwargs`` go to ``timm.create_model``, torchvision's builder or
    the transformers config.

    timm gets ``img_size`` as today. For torchvision the image size defaults to 224 and is passed as
    ``input_size`` to models that take one (MaxViT). For ``hf:`` the size is the config's ``image_size``, which
    ``img_size`` sets where the config has one; else ``img_size`` or 224.
    """
    check_name(name)
    kwargs = dict(model_kwargs or {})
    if is_hf(name):
        return _build_hf(name, kwargs, img_size)
    if is_factory(name):
        return _build_factory(name, kwargs, img_size)
    if not is_torchvision(name):
        if img_size is not None:
            kwargs.setdefault("img_size", img_size)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"timm.create_model({name!r}, **{kwargs}) failed: {exc}") from None
        return BuiltModel(name, model, kwargs, img_size)
    bare = name[len(PREFIX) :]
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


def hf_vision_backbones() -> List[str]:
    """The transformers vision backbones ``list --family hf`` covers, as ``hf:TYPE`` names."""
    return [HF_PREFIX + t for t in HF_VISION_BACKBONES]


def split_hf(name: str) -> Tuple[str, bool]:
    """The model type of an ``hf:`` name, and whether it asks for the backbone (``/backbone``)."""
    bare = name[len(HF_PREFIX) :]
    if bare.endswith(HF_BACKBONE):
        return bare[: -len(HF_BACKBONE)], True
    return bare, False


def hf_model_types() -> List[str]:
    """Every model type transformers has a config for (its CONFIG_MAPPING)."""
    return sorted(require_transformers().CONFIG_MAPPING.keys())


def has_transformers() -> bool:
    """Whether transformers is installed (without importing it)."""
    return importlib.util.find_spec("transformers") is not None


def require_transformers() -> Any:
    """The transformers module: an optional dependency, imported on the first ``hf:`` name; InvalidInputError
    saying how to install it when it cannot be imported."""
    _unshadow_kernels()
    try:
        import transformers
    except ImportError as exc:
        raise InvalidInputError(
            f"hf: model names need transformers, which cannot be imported ({exc}): pip install transformers"
        ) from None
    return transformers


def _unshadow_kernels() -> None:
    """Import the installed ``kernels`` package (which transformers imports when present) under its name.

    In a source checkout this package's kernels live in a top-level ``kernels/`` folder, which shadows that
    package whenever the checkout's root is on sys.path (``python -m`` run there), and transformers then fails.
    """
    if "kernels" in sys.modules:
        return
    ours = Path(__file__).resolve().parent.parent / "kernels"
    found = importlib.util.find_spec("kernels")
    if found is None or found.origin is None or Path(found.origin).resolve().parent != ours:
        return
    path = [p for p in sys.path if Path(p or ".").resolve() != ours.parent]
    real = importlib.machinery.PathFinder.find_spec("kernels", path)
    if real is None or real.loader is None:
        return
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except Exception:
        del sys.modules["kernels"]
        raise


def _check_hf(name: str) -> None:
    """An ``hf:TYPE`` or ``hf:TYPE/backbone`` name whose type transformers has a config for."""
    mtype, _ = split_hf(name)
    types = hf_model_types()
    if mtype in types:
        return
    head, slash, tail = mtype.partition("/")
    if slash and head in types:
        raise InvalidInputError(
            f"unknown suffix /{tail} of {name!r}: {HF_PREFIX}{head}{HF_BACKBONE} builds the "
            f"backbone, {HF_PREFIX}{head} the model"
        )
    close = [HF_PREFIX + c for c in suggest(tail if slash else mtype, types)]
    what = (
        " (hf: names a model type, built from its default config; Hub repositories are not downloaded)" if slash else ""
    )
    raise UnknownModelError(f"unknown transformers model type {mtype!r}{what}.{_hint(close)}", close)


def _as_lists(value: Any) -> Any:
    """Tuples (as ``--model-arg`` parses lists) back to lists: transformers configs check for lists."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _config_keys(config: Any) -> List[str]:
    """The keys a transformers config takes: its fields (``_out_features`` as ``out_features``) and attributes."""
    fields = [f.name.lstrip("_") for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config) else []
    own = [k.lstrip("_") for k in vars(config)]
    return sorted(set(fields + own + list(getattr(config, "attribute_map", {})) + ["attn_implementation"]))


def _build_hf(name: str, kwargs: Dict[str, Any], img_size: Optional[int]) -> BuiltModel:
    """``AutoModel`` (``AutoBackbone`` for ``/backbone``) ``.from_config(AutoConfig.for_model(TYPE, **kwargs))``.

    Keys the config does not have are refused (transformers would keep them silently); ``img_size`` sets the
    config's ``image_size`` when it has one, in the default's shape (an int or a pair).
    """
    tf = require_transformers()
    mtype, backbone = split_hf(name)
    kwargs = _as_lists(kwargs)
    try:
        default = tf.AutoConfig.for_model(mtype)
    except Exception as exc:  # a config class that cannot be built from its defaults
        raise InvalidInputError(f"transformers.AutoConfig.for_model({mtype!r}) failed: {_first_line(exc)}") from None
    keys = _config_keys(default)
    for key in kwargs:
        if key not in keys and not hasattr(default, key):
            close = difflib.get_close_matches(key, keys, 3, 0.6)
            own = [k for k in getattr(type(default), "__annotations__", {}) if not k.startswith("_")]
            hint = _hint(close) if close else f" Its own keys: {', '.join(own)}." if own else ""
            raise InvalidInputError(f"{type(default).__name__} ({name}) has no config key {key!r}.{hint}")
    if img_size is not None and getattr(default, "image_size", None) is not None:
        kwargs.setdefault("image_size", img_size if isinstance(default.image_size, int) else [img_size, img_size])
    auto = tf.AutoBackbone if backbone else tf.AutoModel
    call = f"transformers.{auto.__name__}.from_config(AutoConfig.for_model({mtype!r}, **{kwargs}))"
    try:
        config = tf.AutoConfig.for_model(mtype, **kwargs)
        model = auto.from_config(config)
    except ValueError as exc:
        if backbone and "AutoBackbone" in str(exc):
            have = [HF_PREFIX + t + HF_BACKBONE for t in HF_VISION_BACKBONES if t in _hf_backbone_types()]
            raise InvalidInputError(
                f"transformers has no backbone for {mtype!r}; vision types with one: {', '.join(have)}"
            ) from None
        raise InvalidInputError(f"{call} failed: {_first_line(exc)}") from None
    except Exception as exc:  # any failure of third-party model code on user-given config values
        raise InvalidInputError(f"{call} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return BuiltModel(name, model, kwargs, _hf_img_size(config, img_size))


def _hf_backbone_types() -> List[str]:
    """The model types transformers' AutoBackbone builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    return list(MODEL_FOR_BACKBONE_MAPPING_NAMES)


def _hf_img_size(config: Any, img_size: Optional[int]) -> ImgSize:
    """The config's ``image_size`` (an int, a pair, or height/width) as an int when square; else ``img_size`` or 224."""
    size = getattr(config, "image_size", None)
    if size is None:
        return img_size or HF_IMG_SIZE
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        size = (size["height"], size["width"])
    h, w = (int(v) for v in size[:2])
    return h if h == w else (h, w)


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line, cut at 300 characters."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__
