"""Run time: what the converted graph calls on packed visible tokens (plan, ops, attention, compile support)."""

from typing import Any


def is_runtime_function(target: Any) -> bool:
    """Whether a graph node's target is one of the runtime's functions (an op, a plan step, attention)."""
    return getattr(target, "__module__", "").startswith(__name__ + ".")
