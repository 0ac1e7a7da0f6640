"""``key=value`` model arguments from the command line, for timm.create_model, torchvision's builders or a
transformers config."""

from __future__ import annotations

import ast
import json
from typing import Any, Dict, Sequence

from greenmim_convert.errors import InvalidInputError


def parse_model_args(pairs: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` pairs as a dict of keyword arguments; values as ``parse_value`` reads them."""
    kwargs: Dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InvalidInputError(f"--model-arg expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        kwargs[key.strip()] = parse_value(raw)
    return kwargs


def parse_value(raw: str) -> Any:
    """JSON when it parses (numbers, booleans, null, lists), else a Python literal (``(4, 4)``, ``None``, ``True``),
    else ``[a,b]`` as a list of words, else the string itself; lists become tuples, nested ones too."""
    try:
        return _tuples(json.loads(raw))
    except json.JSONDecodeError:
        pass
    try:
        return _tuples(ast.literal_eval(raw.strip()))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    text = raw.strip()
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]" and "[" not in text[1:-1]:
        items = [item.strip() for item in text[1:-1].split(",")]
        return tuple(parse_value(item) for item in items if item)
    return raw


def _tuples(value: Any) -> Any:
    """Lists (and lists inside lists or dicts) as tuples: the builders take either, and tuples hash."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value
