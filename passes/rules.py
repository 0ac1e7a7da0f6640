"""Registries of rules: a pass module registers a rule with ``@rules.layout(name, priority)`` (what an op's result
holds) or ``@rules.spelling(name, priority)`` (canonicalize: one spelling of an op rewritten to the canonical one).

Layout analysis tries the registered rules on a node in ascending ``priority``; the first that returns a layout
wins, so a rule for a narrower reading of an op that a later rule also accepts takes the lower number:

====  =================  ==============================================================================
  10  prefix-tokens      a slice of a token axis holding prefix tokens, before layout-ops' full slice
  20  strided-pick       a strided slice of rows or columns, before layout-ops
  30  layout-ops         views, permutes, rolls, zero pads, full slices
  40  grid-padding       other constant pads of the grid, and crops of them
  50  conv
  60  pooling            pools and reductions over the grid
  70  attention          matmuls and softmax of logits, before token-wise softmax and elementwise terms
  80  position-einsum
  90  channel-split      splits over channel digits and stacks, before the channel cat
 100  cat                strided merges and channel concatenations
 110  dense-island
 120  token-wise         any elementwise op with an image operand: last
====  =================  ==============================================================================

A rule returns None for a node it does not claim, and raises ``LayoutError`` (recorded against the node) for one it
claims but cannot convert. Its facts go on ``facts(node)`` (``greenmim_convert.compiler.annotations``).
Spelling rules are tried the same way; their priorities (at their definitions in ``canonicalize.py``) keep the
order in which they were written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch.fx as fx

RuleFn = Callable[[fx.GraphModule, fx.Node], Any]


@dataclass(frozen=True)
class Rule:
    """A registered rule: its name (the report's count), its place in the order, and the function."""

    name: str
    priority: int
    fn: RuleFn

    def __call__(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        return self.fn(gm, node)


class Registry:
    """The rules of one kind, tried in ascending priority: the first whose result is not None (or, for spelling
    rules, not empty) wins. Names and priorities are unique within a registry."""

    def __init__(self, kind: str):
        self.kind = kind
        self._rules: Dict[str, Rule] = {}

    def __call__(self, name: str, priority: int) -> Callable[[RuleFn], RuleFn]:
        """Register the decorated function as the rule ``name``, tried in ascending ``priority``."""

        def register(fn: RuleFn) -> RuleFn:
            for other in self._rules.values():
                same = (other.fn.__module__, other.fn.__qualname__) == (fn.__module__, fn.__qualname__)
                if (other.name == name or other.priority == priority) and not same:
                    raise ValueError(
                        f"{self.kind} rule {name!r} (priority {priority}) clashes with {other.name!r} "
                        f"(priority {other.priority})"
                    )
            self._rules[name] = Rule(name, priority, fn)
            return fn

        return register

    def ordered(self) -> List[Rule]:
        """The registered rules in the order they are tried."""
        return sorted(self._rules.values(), key=lambda r: r.priority)


layout = Registry("layout")
spelling = Registry("spelling")
