"""Exception types: every failure the user can cause has its own type and names the offending value."""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch.fx as fx


class GreenMIMError(Exception):
    """Base class of every error raised by greenmim-convert."""


class InvalidInputError(GreenMIMError, ValueError):
    """Images, masks, sizes or options that do not fit the converted model."""


class MaskUnitError(InvalidInputError):
    """A mask unit that is not a multiple of the model's minimal unit, or does not tile the image."""


class TraceError(GreenMIMError):
    """The model could not be captured (``torch.export``) or its stages could not be found."""


class LoadError(GreenMIMError):
    """A file given to ``load`` is not a greenmim-convert file, or is damaged."""


def describe_node(node: fx.Node) -> str:
    """One line naming an FX node, the module it came from and its source line."""
    stack = node.meta.get("nn_module_stack") or {}
    path, kind = "<top level>", ""
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        if isinstance(last, tuple) and len(last) > 1:
            kind = getattr(last[1], "__name__", str(last[1]).rsplit(".", 1)[-1].strip("'>"))
        if path.startswith("m."):
            path = path[2:]
        elif path == "m":
            path, kind = "<top level>", ""
    target = str(getattr(node.target, "__name__", node.target))
    target = target[2:] if target.startswith("m.") else target
    source = _source_line(node)
    module = f"module '{path}'" + (f" ({kind})" if kind else "")
    return f"node '{node.name}' ({node.op} {target}) in {module}" + (f" at {source}" if source else "")


def _source_line(node: fx.Node) -> Optional[str]:
    """The innermost frame of the model's own code (torch's frames skipped) that created the node."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    frames = [(i, ln) for i, ln in enumerate(lines) if ln.startswith("File ")]
    frames = [(i, ln) for i, ln in frames if f"{os.sep}torch{os.sep}" not in ln]
    if not frames:
        return None
    idx, frame = frames[-1]
    code = lines[idx + 1] if idx + 1 < len(lines) and not lines[idx + 1].startswith("File ") else ""
    where = frame.replace("File ", "", 1)
    return f"{where}: {code}" if code else where


class UnsupportedOperationError(GreenMIMError):
    """An operation of the traced model that no pass knows how to run on visible tokens."""

    def __init__(self, reason: str, node: Optional[fx.Node] = None):
        self.reason = reason
        self.node_name = node.name if node is not None else None
        self.where = describe_node(node) if node is not None else None
        super().__init__(f"{self.where}: {reason}" if self.where else reason)

    def extended(self, more: str) -> "UnsupportedOperationError":
        """The same refusal at the same node, its reason followed by ``more``."""
        out = copy.copy(self)
        out.reason = f"{self.reason}; {more}"
        out.args = (f"{self.where}: {out.reason}" if self.where else out.reason,)
        return out


class ImageWideMixingError(UnsupportedOperationError):
    """An operation grouping positions that no mask unit finer than the image holds whole: the model converts only
    with the image as its mask unit (every sample all visible or all hidden)."""
