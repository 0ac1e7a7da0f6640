"""The pre-training configuration: defaults, a TOML / YAML / JSON file, command-line overrides (in that order of
precedence, last wins), validation, and the resolved configuration written to the run folder."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import tomllib

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.tools.model_args import _tuples

from .decoders import DECODERS
from .masks import MASKS

RESOLVED = "config.toml"


@dataclass
class PretrainConfig:
    """Every setting of a pre-training run; the field names are the config file's keys and, with dashes for
    underscores, the command's options."""

    # model
    model: str = "swin_tiny_patch4_window7_224"
    model_args: Dict[str, Any] = field(default_factory=dict)
    img_size: Optional[int] = None
    mask_unit: Optional[int] = None
    grouping: str = "dp"
    dense: bool = False
    decoder: str = "transformer"
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    norm_pix: bool = True
    # masks
    mask: str = "random"
    mask_ratio: float = 0.75
    secondary_ratio: float = 0.25
    # data
    data: Optional[str] = None
    demo_size: int = 1024
    workers: int = 2
    min_crop_scale: float = 0.2
    # optimisation
    batch_size: int = 32
    accum_steps: int = 1
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    bf16: bool = False
    compile: bool = False
    fsdp: bool = False
    seed: int = 0
    # run
    out: str = "runs/pretrain"
    ckpt_every: int = 100
    keep_ckpts: int = 3
    resume: Optional[str] = None
    stop_after: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None
    log_every: int = 10
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True
    vis_every: int = 0
    bench_steps: Optional[int] = None
    malloc_tuning: bool = True

    @property
    def warmup(self) -> int:
        """Linear warm-up steps: ``warmup_steps``, else 5% of ``steps`` (at least 1)."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(PretrainConfig)}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def read_file(path: str) -> Dict[str, Any]:
    """A config file as a dict: TOML (``tomllib``), YAML (needs pyyaml) or JSON, by suffix."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"--config {path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"{path}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidInputError(
                f"{path}: YAML config files need pyyaml (pip install pyyaml); or write it as TOML, which needs nothing"
            ) from None
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{path}: invalid YAML: {exc}") from None
    elif suffix == ".json":
        data = json.loads(p.read_text())
    else:
        raise InvalidInputError(f"{path}: a config file is .toml, .yaml, .yml or .json, got {suffix or 'no suffix'}")
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: the config must be a table of settings, got {type(data).__name__}")
    return data


def _check_value(key: str, value: Any) -> Any:
    """``value`` for field ``key`` if its type fits (ints for floats too), else InvalidInputError."""
    kind = str(FIELDS[key].type)
    if value is None:
        if "Optional" not in kind:
            raise InvalidInputError(f"config key {key!r} cannot be empty")
        return None
    if key == "model_args":
        if not isinstance(value, dict):
            raise InvalidInputError(f"config key 'model_args' must be a table of keyword arguments, got {value!r}")
        return dict(_tuples(value))
    base = kind.replace("Optional[", "").rstrip("]")
    ok = isinstance(value, _TYPES.get(base, (object,))) and not (base != "bool" and isinstance(value, bool))
    if not ok:
        raise InvalidInputError(f"config key {key!r} must be {base}, got {value!r}")
    return float(value) if base == "float" else value


def normalise(settings: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Keys with dashes as underscores, each known and of its field's type."""
    out = {}
    for raw, value in settings.items():
        key = str(raw).replace("-", "_")
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), 3, 0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise InvalidInputError(f"{source}: unknown setting {raw!r}.{hint}")
        out[key] = _check_value(key, value)
    return out


def resolve(file: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> PretrainConfig:
    """Defaults, then the file's settings, then ``overrides`` (``model_args`` merge key by key)."""
    settings = normalise(read_file(file), file) if file else {}
    given = normalise(overrides or {}, "command line")
    args = {**settings.get("model_args", {}), **given.pop("model_args", {})}
    cfg = PretrainConfig(**{**settings, **given, "model_args": args})
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Raise InvalidInputError naming the first setting out of its range."""
    positive = ("batch_size", "accum_steps", "steps", "decoder_dim", "decoder_depth", "decoder_heads", "demo_size")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise InvalidInputError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("keep_ckpts", "ckpt_every", "vis_every", "workers", "log_every"):
        if getattr(cfg, key) < 0:
            raise InvalidInputError(f"{key} must be 0 or positive, got {getattr(cfg, key)}")
    if cfg.bench_steps is not None and cfg.bench_steps < 1:
        raise InvalidInputError(f"bench_steps must be positive, got {cfg.bench_steps}")
    for key in ("mask_ratio", "secondary_ratio"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise InvalidInputError(f"{key} must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.mask not in MASKS:
        raise InvalidInputError(f"mask must be one of {', '.join(MASKS)}, got {cfg.mask!r}")
    if cfg.decoder not in DECODERS:
        raise InvalidInputError(f"decoder must be one of {', '.join(DECODERS)}, got {cfg.decoder!r}")
    if cfg.decoder == "transformer" and cfg.decoder_dim % 4:
        raise InvalidInputError(f"decoder_dim must be a multiple of 4 (2-D sin-cos positions), got {cfg.decoder_dim}")
    if cfg.lr <= 0 or cfg.min_lr < 0:
        raise InvalidInputError(f"lr must be positive and min_lr not negative, got {cfg.lr}, {cfg.min_lr}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def to_toml(cfg: PretrainConfig) -> str:
    """The configuration as TOML, readable back by ``--config`` (unset optional settings are left out)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.to_dict().items() if v is not None]
    return "\n".join(lines) + "\n"


def save_resolved(cfg: PretrainConfig, out_dir: Path) -> Path:
    """Write the resolved configuration to ``out_dir/config.toml``."""
    path = Path(out_dir) / RESOLVED
    path.write_text(to_toml(cfg))
    return path
