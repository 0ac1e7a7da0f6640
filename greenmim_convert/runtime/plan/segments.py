"""Window segmentation of packed visible tokens.

Swin-style (shifted) window attention lets a token attend to the tokens of its window. On packed
tokens a window is a *segment*: a set of token indices. Shifted windows are expressed by window ids
computed on shifted coordinates, with no cyclic roll: a token at row ``r`` sits at rolled position
``p = (r - s) mod H``; timm's shifted-window mask further splits the last window row/column into the
tokens that wrapped around (``r < s``) and those that did not, which is the same as windowing the
*unwrapped* coordinate ``r - s`` with ``floor``. Both views are implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class WindowSpec:
    """Window attention geometry on one grid: window size, cyclic shift and whether the seam splits windows."""

    window: Tuple[int, int]
    shift: Tuple[int, int] = (0, 0)
    split_seam: bool = True  # timm's -100 shifted-window mask: wrapped tokens form their own region

    def segments_per_dim(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """Number of segment rows and columns of a sample's grid."""
        out = []
        for size, win, sh in zip(grid, self.window, self.shift):
            n = size // win
            out.append(n + 1 if (sh and self.split_seam) else n)
        return out[0], out[1]


def _axis_segment(coord: torch.Tensor, size: int, win: int, shift: int, split_seam: bool) -> torch.Tensor:
    if shift and split_seam:
        return torch.div(coord - shift, win, rounding_mode="floor") + 1
    return torch.remainder(coord - shift, size) // win


def window_segments(
    batch: torch.Tensor, coords: torch.Tensor, grid: Tuple[int, int], batch_size: int, spec: WindowSpec
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Segment id and in-window position of every token.

    Returns ``(segment (T,), position (T,), num_segments)``. Segment ids are sample-major and raster
    ordered, so sorting by them is deterministic; ``position`` is ``row * window_w + col`` inside the
    (rolled) window, the index timm's relative-position tables use.
    """
    (h, w), (wh, ww), (sh, sw) = grid, spec.window, spec.shift
    if h % wh or w % ww:
        raise ValueError(f"grid {grid} is not divisible by window {spec.window}")
    nr, nc = spec.segments_per_dim(grid)
    r, c = coords[:, 0], coords[:, 1]
    seg_r = _axis_segment(r, h, wh, sh, spec.split_seam)
    seg_c = _axis_segment(c, w, ww, sw, spec.split_seam)
    segment = (batch * nr + seg_r) * nc + seg_c
    position = torch.remainder(r - sh, wh) * ww + torch.remainder(c - sw, ww)
    return segment, position, batch_size * nr * nc


def digit_sum(
    coords: torch.Tensor, grid: Tuple[int, int], offset: Tuple[int, int], digits: Sequence[Tuple[str, int, int, int]]
) -> torch.Tensor:
    """``sum(digit * stride)`` at every coordinate, for layout digits ``(kind, size, inner, stride)``.

    A digit of kind ``h`` (rows) or ``w`` (columns) is ``(p // inner) % size`` of the dense position
    ``p = (coord - offset) mod grid`` (``offset`` is a layout's roll). Every index the runtime reads
    from layout digits (window ids, in-window positions, term and position-table offsets) is one.
    """
    out = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device)
    for kind, size, inner, stride in digits:
        axis = "hw".index(kind)
        dense = torch.remainder(coords[:, axis] - offset[axis], grid[axis])
        out += (torch.div(dense, inner, rounding_mode="floor") % size) * stride
    return out


@dataclass(frozen=True)
class DigitWindows:
    """Windows described by layout digits: the digits shared by a query and its keys index the window,
    the digits of the token axis index the position inside it (any order, any stride: blocks,
    dilated grids). A digit is ``(kind, size, inner)`` with kind ``h`` or ``w``; ``offset`` is the
    roll: dense row ``p`` holds grid row ``(p + offset) mod H``."""

    grid: Tuple[int, int]
    offset: Tuple[int, int]
    shared: Tuple[Tuple[str, int, int], ...]
    token: Tuple[Tuple[str, int, int], ...]

    @property
    def area(self) -> int:
        out = 1
        for _, size, _ in self.token:
            out *= size
        return out

    @property
    def windows_per_sample(self) -> int:
        out = 1
        for _, size, _ in self.shared:
            out *= size
        return out

    def digits(self, coords: torch.Tensor, digits: Tuple[Tuple[str, int, int], ...]) -> torch.Tensor:
        """Mixed-radix value of ``digits`` (major first) at every coordinate."""
        weighted, place = [], 1
        for kind, size, inner in reversed(digits):
            weighted.append((kind, size, inner, place))
            place *= size
        return digit_sum(coords, self.grid, self.offset, weighted)


def digit_segments(
    batch: torch.Tensor,
    coords: torch.Tensor,
    batch_size: int,
    windows: DigitWindows,
    labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Segment id (sample-major) and in-window position of every token for digit-described windows.

    ``labels`` ``(H, W)`` splits windows further into regions (a block mask such as the shifted
    window seam); labels are small non-negative ints, at most ``area`` of them per window.
    """
    window = windows.digits(coords, windows.shared)
    position = windows.digits(coords, windows.token)
    per_sample = windows.windows_per_sample
    segment = batch * per_sample + window
    count = batch_size * per_sample
    if labels is not None:
        region = labels[coords[:, 0], coords[:, 1]]
        segment = segment * windows.area + region
        count *= windows.area
    return segment, position, count
