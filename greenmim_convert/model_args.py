"""``key=value`` model arguments from the command line, for ``timm.create_model``."""
from __future__ import annotations

import json
from typing import Any, Dict, Sequence

from .errors import InvalidInputError


def parse_model_args(pairs: Sequence[str]) -> Dict[str, Any]:
    """Values parse as JSON when they can (numbers, booleans, lists become tuples), else stay strings."""
    kwargs: Dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InvalidInputError(f"--model-arg expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        kwargs[key.strip()] = tuple(value) if isinstance(value, list) else value
    return kwargs
