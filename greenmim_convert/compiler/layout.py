"""Symbolic layout of a dense tensor in terms of batch, row, column and channel digits.

Layout ops of a traced model (view, reshape, permute, flatten, roll, ...) only rename which dense
index holds which (sample, row, col, channel). On packed visible tokens they cost nothing: the
compiler follows them symbolically and the ops that *interpret* the layout (window attention, patch
merging, outputs) read what they need from it.

An *atom* is one mixed-radix digit of a logical dimension: kind ``b`` (sample), ``h`` (row),
``w`` (column) or ``c`` (channel), its ``size`` and its ``inner`` place value, so that the logical
coordinate is the sum of ``digit * inner`` over the atoms of that kind. A tensor axis is a tuple of
atoms, major first. ``offset`` records cyclic rolls: dense row index ``p`` holds grid row
``(p + offset_h) mod H``. ``prefix`` counts tokens that stand before the grid on the axis holding the
row and column digits (a class token), ``key_prefix`` the same on the key axis of a pair layout.
``border`` counts the positions a pad added around the image's positions (rows before and after, columns
before and after): ``grid`` is then the padded grid, whose padded positions are constant tokens of the
source model, always present (see ``passes.grid_padding``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Dict, List, Optional, Sequence, Tuple

SPATIAL = ("h", "w")
KEY_SPATIAL = ("kh", "kw")  # spatial digits of the key side of a query-key pair layout


class LayoutError(Exception):
    """A layout op that cannot be expressed on visible tokens (caught and reported with the node)."""


class ImageWideError(LayoutError):
    """Positions grouped in no block of the grid finer than the image (rows many units apart, tokens regrouped in
    an order not made of the grid's digits): no mask unit finer than the image holds each group whole."""


@dataclass(frozen=True)
class Atom:
    kind: str
    size: int
    inner: int = 1

    def split(self, outer: int) -> Tuple["Atom", "Atom"]:
        """Split into a major atom of ``outer`` digits and the minor remainder."""
        if self.size % outer:
            raise LayoutError(f"cannot split {self} into {outer} x {self.size // max(outer, 1)}")
        rest = self.size // outer
        return Atom(self.kind, outer, self.inner * rest), Atom(self.kind, rest, self.inner)


Axis = Tuple[Atom, ...]


def _canonical_axis(atoms: Sequence[Atom]) -> Axis:
    out: List[Atom] = []
    for a in atoms:
        if a.size == 1:
            continue
        if out and out[-1].kind == a.kind and out[-1].inner == a.inner * a.size:
            prev = out.pop()
            a = Atom(a.kind, prev.size * a.size, a.inner)
        out.append(a)
    return tuple(out)


def _uneven(shape: Sequence[int], a: Atom, need: int, size: int) -> None:
    """Refuse a view whose axis takes a digit's values in runs that are not whole multiples of one another: its
    entries are no rows, columns or blocks of the grid (tokens regrouped in an order not made of the grid's
    digits, e.g. windows of raster tokens that were never unrolled)."""
    error = ImageWideError if a.kind in "hw" else LayoutError
    raise error(
        f"view {tuple(shape)} splits digit {a} unevenly ({need} entries left of an axis of {size} and its "
        f"{a.size} values are no whole multiples of one another): the entries are no rows, columns or blocks of "
        "the image (tokens regrouped in an order that is not made of the grid's digits, e.g. windows of raster "
        "tokens that were never unrolled)"
    )


@dataclass(frozen=True)
class Layout:
    """Axes of atoms, the grid the spatial atoms live on, its stride in pixels, and roll offsets."""

    axes: Tuple[Axis, ...]
    grid: Tuple[int, int]
    stride: int
    offset: Tuple[int, int] = (0, 0)
    prefix: int = 0
    key_prefix: int = 0
    border: Tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self):
        object.__setattr__(self, "axes", tuple(_canonical_axis(ax) for ax in self.axes))
        for count, kinds in ((self.prefix, SPATIAL), (self.key_prefix, KEY_SPATIAL)):
            holding = [i for i, ax in enumerate(self.axes) if any(a.kind in kinds for a in ax)]
            if count and (len(holding) != 1 or any(a.kind not in kinds for a in self.axes[holding[0]])):
                raise LayoutError("prefix tokens on an axis that does not hold exactly the token digits")
        if any(self.border) and (self.prefix or self.key_prefix):
            raise LayoutError("prefix tokens (a class token) on a padded grid")

    @property
    def image_grid(self) -> Tuple[int, int]:
        """The grid of the image's positions inside a padded grid: ``grid`` less the ``border``."""
        top, bottom, left, right = self.border
        return self.grid[0] - top - bottom, self.grid[1] - left - right

    def prefixed_axes(self) -> Dict[int, int]:
        """``{axis: count}`` of the axes holding prefix tokens before their grid tokens."""
        out: Dict[int, int] = {}
        for count, kinds in ((self.prefix, SPATIAL), (self.key_prefix, KEY_SPATIAL)):
            if count:
                out[next(i for i, ax in enumerate(self.axes) if any(a.kind in kinds for a in ax))] = count
        return out

    @staticmethod
    def nhwc(batch: int, grid: Tuple[int, int], channels: int, stride: int) -> "Layout":
        h, w = grid
        return Layout(((Atom("b", batch),), (Atom("h", h),), (Atom("w", w),), (Atom("c", channels),)), grid, stride)

    @staticmethod
    def nchw(batch: int, grid: Tuple[int, int], channels: int, stride: int) -> "Layout":
        h, w = grid
        return Layout(((Atom("b", batch),), (Atom("c", channels),), (Atom("h", h),), (Atom("w", w),)), grid, stride)

    @property
    def channels(self) -> int:
        """Number of channels: the product of the channel digits."""
        return prod(a.size for ax in self.axes for a in ax if a.kind == "c")

    @property
    def shape(self) -> Tuple[int, ...]:
        extra = self.prefixed_axes()
        return tuple(prod(a.size for a in ax) + extra.get(i, 0) for i, ax in enumerate(self.axes))

    def atoms(self, axis: int) -> Axis:
        return self.axes[axis]

    def kinds(self, axis: int) -> set:
        return {a.kind for a in self.axes[axis]}

    # ---- layout ops -------------------------------------------------------------------------------------
    def view(self, shape: Sequence[int]) -> "Layout":
        """Regroup the flat atom sequence into axes of the given sizes (``view`` / ``reshape``)."""
        shape = list(shape)
        total = prod(self.shape)
        if -1 in shape:
            known = prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = total // known
        if prod(shape) != total:
            raise LayoutError(f"cannot view {self.shape} as {tuple(shape)}")
        if self.prefixed_axes():
            return self._view_around_prefix(shape)
        pending = [a for ax in self.axes for a in ax]
        axes: List[Axis] = []
        for size in shape:
            taken: List[Atom] = []
            need = size
            while need > 1:
                if not pending:
                    raise LayoutError(f"cannot view {self.shape} as {tuple(shape)}")
                a = pending.pop(0)
                if a.size <= need:
                    if need % a.size:
                        _uneven(shape, a, need, size)
                    taken.append(a)
                    need //= a.size
                else:
                    if a.size % need:
                        _uneven(shape, a, need, size)
                    major, minor = a.split(need)
                    taken.append(major)
                    pending.insert(0, minor)
                    need = 1
            axes.append(tuple(taken))
        return replace(self, axes=tuple(axes))

    def _view_around_prefix(self, shape: List[int]) -> "Layout":
        """A view that keeps every axis holding prefix tokens whole and regroups the axes between them."""
        old = self.shape
        axes: List[Axis] = []
        prev_old = prev_new = 0
        for i in sorted(self.prefixed_axes()):
            before = prod(old[:i])
            j = next((j for j in range(prev_new, len(shape)) if prod(shape[:j]) == before and shape[j] == old[i]), None)
            if j is None:
                raise LayoutError(f"view {tuple(shape)} splits or merges an axis of {old} holding prefix tokens")
            axes += Layout(self.axes[prev_old:i], self.grid, self.stride).view(shape[prev_new:j]).axes
            axes.append(self.axes[i])
            prev_old, prev_new = i + 1, j + 1
        axes += Layout(self.axes[prev_old:], self.grid, self.stride).view(shape[prev_new:]).axes
        return replace(self, axes=tuple(axes))

    def without_prefix(self, axis: int) -> "Layout":
        """The grid tokens of an axis holding prefix tokens (``x[:, prefix:]``)."""
        count = self.prefixed_axes().get(axis % len(self.axes))
        if count is None:
            raise LayoutError(f"axis {axis} holds no prefix tokens")
        key = any(a.kind in KEY_SPATIAL for a in self.axes[axis])
        return replace(self, key_prefix=0) if key else replace(self, prefix=0)

    def permute(self, dims: Sequence[int]) -> "Layout":
        n = len(self.axes)
        dims = [d % n for d in dims]
        if sorted(dims) != list(range(n)):
            raise LayoutError(f"bad permutation {tuple(dims)} of {n} axes")
        return replace(self, axes=tuple(self.axes[d] for d in dims))

    def transpose(self, a: int, b: int) -> "Layout":
        dims = list(range(len(self.axes)))
        a, b = a % len(dims), b % len(dims)
        dims[a], dims[b] = dims[b], dims[a]
        return self.permute(dims)

    def flatten(self, start: int = 0, end: int = -1) -> "Layout":
        n = len(self.axes)
        start, end = start % n, end % n
        if (
            any(start <= i <= end for i in self.prefixed_axes())
            and sum(bool(ax) for ax in self.axes[start : end + 1]) > 1
        ):
            raise LayoutError("flatten merges an axis holding prefix tokens with another axis")
        merged = tuple(a for ax in self.axes[start : end + 1] for a in ax)
        return replace(self, axes=self.axes[:start] + (merged,) + self.axes[end + 1 :])

    def unsqueeze(self, dim: int) -> "Layout":
        n = len(self.axes) + 1
        dim = dim % n
        return replace(self, axes=self.axes[:dim] + ((),) + self.axes[dim:])

    def roll(self, shifts: Sequence[int], dims: Sequence[int]) -> "Layout":
        """Cyclic shift of whole spatial axes; the shift becomes a coordinate offset."""
        if self.prefixed_axes():
            raise LayoutError("roll of tokens that hold prefix tokens")
        offset = list(self.offset)
        for s, d in zip(shifts, dims):
            ax = self.axes[d % len(self.axes)]
            if len(ax) != 1 or ax[0].kind not in SPATIAL or ax[0].inner != 1:
                raise LayoutError(f"roll along axis {d} which is not one whole spatial dimension")
            k = SPATIAL.index(ax[0].kind)
            if ax[0].size != self.grid[k]:
                raise LayoutError("roll along a spatial axis that does not span the grid")
            offset[k] = (offset[k] - s) % self.grid[k]
        return replace(self, offset=(offset[0], offset[1]))

    # ---- queries used by the passes ---------------------------------------------------------------------
    def channel_axis(self) -> Optional[int]:
        """The axis holding exactly the channels, in order, when there is one (NCHW: 1, NHWC: 3)."""
        for i, ax in enumerate(self.axes):
            if len(ax) == 1 and ax[0].kind == "c" and ax[0].inner == 1:
                return i if all(a.kind != "c" for j, other in enumerate(self.axes) if j != i for a in other) else None
        return None

    def channel_last(self) -> bool:
        """True when the last axis holds exactly the channels, in order (token-wise ops act on it)."""
        return bool(self.axes) and self.channel_axis() == len(self.axes) - 1

    def is_per_sample(self) -> bool:
        """True when no spatial digit is left: one value per sample (after a global reduction)."""
        return all(a.kind not in SPATIAL + KEY_SPATIAL for ax in self.axes for a in ax)

    def is_pair(self) -> bool:
        """True for a query-key pair layout (attention logits): it holds key digits."""
        return any(a.kind in KEY_SPATIAL for ax in self.axes for a in ax)

    def channel_atoms(self) -> List[Atom]:
        """Channel digits, most significant first: the column order of the packed ``(rows, C)`` tensor."""
        return sorted((a for ax in self.axes for a in ax if a.kind == "c"), key=lambda a: -a.inner)

    def check_packed(self) -> None:
        """Raise unless the channel digits are distinct and the spatial digits tile the grid.

        Packed columns enumerate the channel digits present, most significant first; a reduction
        over a digit (a per-head norm) leaves the others in place.
        """
        chans = self.channel_atoms()
        for major, minor in zip(chans, chans[1:]):
            if major.inner < minor.inner * minor.size:
                raise LayoutError(f"channel digits {chans} overlap")
        if self.is_per_sample():
            return
        for k, n in zip(SPATIAL, self.grid):
            place = 1
            for a in sorted((a for ax in self.axes for a in ax if a.kind == k), key=lambda a: a.inner):
                if a.inner != place:
                    raise LayoutError(
                        f"layout {self.shape} does not hold every {'row' if k == 'h' else 'column'} of its grid"
                    )
                place *= a.size
            if place != n:
                raise LayoutError(f"layout {self.shape} holds a part of the {self.grid} grid")

    def padded_to(self, ndim: int) -> "Layout":
        """Broadcasting view with leading size-one axes up to ``ndim`` axes."""
        return replace(self, axes=((),) * (ndim - len(self.axes)) + self.axes)

    def with_channels(self, channels: int) -> "Layout":
        """The same layout with ``channels`` channels on its channel axis (conv 1x1, channel slices)."""
        axis = self.channel_axis()
        if axis is None:
            if self.channels != 1:
                raise LayoutError(f"layout {self.shape} has no single channel axis")
            raise LayoutError("a one-channel layout does not say which axis holds the channels")
        axes = list(self.axes)
        axes[axis] = (Atom("c", channels),)
        return replace(self, axes=tuple(axes))

    def broadcast(self, other: "Layout") -> "Layout":
        """The layout of an elementwise op between two layouts whose shapes broadcast axis by axis."""
        n = max(len(self.axes), len(other.axes))
        self, other = self.padded_to(n), other.padded_to(n)
        sample = self.is_per_sample() or other.is_per_sample()
        if not sample and (
            (self.grid, self.stride, self.offset, self.prefix, self.key_prefix, self.border)
            != (other.grid, other.stride, other.offset, other.prefix, other.key_prefix, other.border)
        ):
            raise LayoutError(f"elementwise op on tensors of different layouts {self.shape} and {other.shape}")
        axes = []
        for a, b in zip(self.axes, other.axes):
            if a and b and a != b:
                raise LayoutError(f"elementwise op on tensors of different layouts {self.shape} and {other.shape}")
            axes.append(a or b)
        base = other if self.is_per_sample() else self
        return replace(base, axes=tuple(axes))

    def is_canonical_tokens(self) -> bool:
        """Batch, then rows, then columns (raster), then channels; no roll offset."""
        kinds = [a.kind for ax in self.axes for a in ax]
        return (
            kinds == ["b", "h", "w", "c"]
            and self.offset == (0, 0)
            and not self.prefix
            and self.channel_last()
            and all(a.inner == 1 for ax in self.axes for a in ax)
        )

    def spatial_factor_in_last_axis(self) -> Optional[Tuple[int, int]]:
        """(fh, fw) when the last axis mixes low spatial digits into the channels (space-to-depth)."""
        last = self.axes[-1] if self.axes else ()
        f = {"h": 1, "w": 1}
        for a in last:
            if a.kind in SPATIAL:
                f[a.kind] *= a.size
        if f == {"h": 1, "w": 1}:
            return None
        return f["h"], f["w"]


def space_to_depth_plan(layout: Layout) -> Tuple[Layout, Tuple[int, int], List[Tuple[int, int, int]]]:
    """Plan for gathering low spatial digits of the last axis into features on a coarser grid.

    Returns the layout after the gather, the factors ``(fh, fw)`` and, for every new feature index,
    ``(dh, dw, c)``: which fine neighbour and which channel it reads.
    """
    factors = layout.spatial_factor_in_last_axis()
    if factors is None:
        raise LayoutError("nothing to gather")
    if layout.offset != (0, 0):
        raise LayoutError("space-to-depth on rolled coordinates")
    if layout.prefixed_axes():
        raise LayoutError("space-to-depth of tokens that hold prefix tokens")
    fh, fw = factors
    last = layout.axes[-1]
    for a in last:
        if a.kind == "b":
            raise LayoutError("batch digits inside the feature axis")
        if a.kind in SPATIAL and a.inner * a.size > (fh if a.kind == "h" else fw):
            raise LayoutError("feature axis holds high spatial digits")
    outer: List[Axis] = []
    for ax in layout.axes[:-1]:
        new_ax = []
        for a in ax:
            if a.kind in SPATIAL:
                f = fh if a.kind == "h" else fw
                if a.inner % f:
                    raise LayoutError("coarse digits are not multiples of the gather factor")
                a = Atom(a.kind, a.size, a.inner // f)
            new_ax.append(a)
        outer.append(tuple(new_ax))
    plan: List[Tuple[int, int, int]] = []
    sizes = [a.size for a in last]
    for flat in range(prod(sizes)):
        digit: Dict[str, int] = {"h": 0, "w": 0, "c": 0}
        rem = flat
        for a in reversed(last):
            d = rem % a.size
            rem //= a.size
            digit[a.kind] += d * a.inner
        plan.append((digit["h"], digit["w"], digit["c"]))
    if fh != fw:
        raise LayoutError(f"anisotropic space-to-depth {factors}")
    grid = (layout.grid[0] // fh, layout.grid[1] // fw)
    new = Layout(tuple(outer) + ((Atom("c", len(plan)),),), grid, layout.stride * fh)
    return new, (fh, fw), plan
