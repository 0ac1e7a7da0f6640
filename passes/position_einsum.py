"""``einsum`` of image features with a table read at each token's position -> a per-token product.

MViTv2's decomposed relative positions compute ``einsum("byhwc,hkc->byhwk", q, R)``: the query's
channels contract with a constant table ``R`` (gathered from a parameter by constant indices) that is
indexed by the query's row (``h``) and has a free axis ``k``. Every output element depends on one
token, so on packed tokens it is a token-wise op: each token contracts its channels with the table's
slice at its position digits (:mod:`greenmim_convert.runtime.table_einsum` runs it bucketed by table entry). An
axis the table reads holds one spatial digit: a whole grid side (MViTv2), or the row or column inside a
window (ViTDet's ``"bhwc,hkc->bhwk"``, whose ``b`` folds sample, window and head together: axes the
table does not read may hold any digits, channel digits among them, and pass through). The free table
axes become new channel digits of the result (above the ones kept), which the attention pass may later
align with key positions (a query-dependent term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch.fx as fx

from greenmim_convert.compiler.annotations import Property
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, aten, constant, is_op, layout_of, replace_with_call, shape_of, sites_node


@dataclass(frozen=True)
class EinsumSpec:
    """A packed per-token einsum: letters of the input's packed channel digits, of the table (spatial letters
    first, each with the layout digit ``(kind, size, inner)`` of the token position it reads, after the
    layout's roll ``offset``) and of the output's packed channel digits."""

    inputs: str
    sizes: Tuple[int, ...]
    spatial: Tuple[Tuple[str, Tuple[str, int, int]], ...]
    table: str
    output: str
    offset: Tuple[int, int] = (0, 0)

    @property
    def equation(self) -> str:
        rest = "".join(ch for ch in self.table if ch not in dict(self.spatial))
        return f"t{self.inputs},{'t' if self.spatial else ''}{rest}->t{self.output}"


def _operands(node: fx.Node) -> Optional[Tuple[str, str, str, fx.Node, fx.Node, bool]]:
    """(image letters, table letters, output letters, image node, table node, image first), or None."""
    equation, operands = node.args[0], list(node.args[1])
    if len(operands) != 2 or "..." in equation or "->" not in equation:
        return None
    ins, out = equation.replace(" ", "").split("->")
    parts = ins.split(",")
    with_layout = [layout_of(x) is not None for x in operands]
    if with_layout.count(True) != 1:
        return None
    i = with_layout.index(True)
    return parts[i], parts[1 - i], out, operands[i], operands[1 - i], i == 0


def _channel_letters(img: str, tab: str, out: str, lay: Layout) -> Dict[Atom, str]:
    """A letter for every channel digit of the image operand: its axis' letter when the axis holds that digit
    alone, a fresh letter for each channel digit of an axis that passes through with other digits."""
    fresh = (ch for ch in "abcdefghijklmnopqrsuvwxyz" if ch not in img + tab + out)
    letter_of: Dict[Atom, str] = {}
    for letter, ax in zip(img, lay.axes):
        chans = [a for a in ax if a.kind == "c"]
        if len(ax) == 1 and chans:
            letter_of[chans[0]] = letter
        elif chans and (letter not in out or letter in tab):
            raise LayoutError(f"einsum over axis {letter!r} holding several digits, channel digits among them")
        else:
            letter_of.update({a: next(fresh) for a in chans})
    return letter_of


def _spatial_digit(letter: str, ax) -> Tuple[str, int, int]:
    """The one spatial digit an axis the table reads holds."""
    if len(ax) != 1 or ax[0].kind not in "hw":
        raise LayoutError(f"einsum table indexed by axis {letter!r}, which does not hold one row or column digit")
    return ax[0].kind, ax[0].size, ax[0].inner


def plan(node: fx.Node) -> Tuple[Layout, EinsumSpec]:
    """The output layout and the packed spec of an einsum of image features with a position-indexed table."""
    found = _operands(node)
    if found is None:
        raise LayoutError("einsum that is not one image operand with one constant table")
    img, tab, out, x, table, _ = found
    lay = layout_of(x)
    if len(img) != len(lay.axes) or len(set(img)) != len(img) or len(set(tab)) != len(tab):
        raise LayoutError(f"einsum {img},{tab}->{out} with repeated letters or axes it does not name")
    if lay.is_pair() or lay.prefixed_axes():
        raise LayoutError("einsum of attention logits or of tokens holding prefix tokens with a table")
    spatial = []
    for letter, ax in zip(img, lay.axes):
        if letter not in out and (letter not in tab or any(a.kind != "c" for a in ax)):
            raise LayoutError(f"einsum sums axis {letter!r} of image features that is not a channel axis of both")
        if letter in out and letter in tab:
            spatial.append((letter, _spatial_digit(letter, ax)))
    letter_of = _channel_letters(img, tab, out, lay)
    kept = [a for ch in out if ch in img for a in lay.axes[img.index(ch)] if a.kind == "c"]
    new_letters = [ch for ch in out if ch not in img]
    if any(ch not in tab for ch in new_letters) or any(ch not in img and ch not in out for ch in tab):
        raise LayoutError(f"einsum {img},{tab}->{out} sums over table axes")
    top = max((a.inner * a.size for a in kept), default=1)
    table_shape = shape_of(table)
    new_atoms: Dict[str, Atom] = {}
    for ch in reversed(new_letters):
        size = table_shape[tab.index(ch)]
        new_atoms[ch] = Atom("c", size, top)
        top *= size
    axes = tuple(lay.axes[img.index(ch)] if ch in img else (new_atoms[ch],) for ch in out)
    result = Layout(axes, lay.grid, lay.stride, lay.offset, border=lay.border)
    result.check_packed()
    letter_of.update({a: ch for ch, a in new_atoms.items()})
    inputs = "".join(letter_of[a] for a in lay.channel_atoms())
    output = "".join(letter_of[a] for a in result.channel_atoms())
    order = "".join(ch for ch, _ in spatial) + "".join(ch for ch in tab if ch not in dict(spatial))
    sizes = tuple(a.size for a in lay.channel_atoms())
    return result, EinsumSpec(inputs, sizes, tuple(spatial), order, output, lay.offset)


@rules.layout("position-einsum", priority=80)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if not is_op(node, aten.einsum):
        return None
    return plan(node)[0]


class PositionEinsumPass(GreenPass):
    name = "position-einsum"
    description = "einsum of tokens with a table read at each token's row or column -> per-token product"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.POSITION_EINSUMS})

    def run(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.einsum) or layout_of(node) is None:
                continue
            lay, spec = plan(node)
            _, tab, _, x, table, _ = _operands(node)
            perm = [tab.index(ch) for ch in spec.table]
            with gm.graph.inserting_before(node):
                if perm != list(range(len(perm))):
                    table = gm.graph.call_function(aten.permute.default, (table, perm))
            spec_node = constant(gm, spec, node, "einsum_spec")
            replace_with_call(gm, node, ops.position_einsum, (x, sites_node(gm, layout_of(x)), table, spec_node))
            self.report["einsum with a position-indexed table"] += 1
