"""Row movements of packed tokens: pads and crops, position constants, dense islands, prefix tokens,
outputs."""

from __future__ import annotations

from typing import List, Tuple

import torch

from greenmim_convert.runtime.gather import RowMap
from greenmim_convert.runtime.plan.sites import Sites, digit_sum
from greenmim_convert.runtime.table_einsum import PositionBuckets, table_einsum
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens


def move_rows(feats: torch.Tensor, src: Sites, dst: Sites, shift: Tuple[int, int], fill: float) -> torch.Tensor:
    """Rows of ``dst``'s sites read from ``src``'s: the site at ``(row, col)`` reads ``src``'s at
    ``(row - shift[0], col - shift[1])``, or ``fill`` where that lies outside ``src``'s grid (a pad of the grid
    by ``shift`` before, or a crop by ``-shift``); every source row is read at most once."""

    def plan() -> Tuple[torch.Tensor, RowMap]:
        rows = dst.coords[:, 0] - shift[0]
        cols = dst.coords[:, 1] - shift[1]
        inside = (rows >= 0) & (rows < src.grid[0]) & (cols >= 0) & (cols < src.grid[1])
        found = src.index_grid()[dst.batch, rows.clamp(0, src.grid[0] - 1), cols.clamp(0, src.grid[1] - 1)]
        found = torch.where(inside, found, -1)
        return found < 0, RowMap.from_index(found, src.num_tokens)

    outside, rows = dst.memo(("rows from", id(src), tuple(shift)), plan)
    out = rows(feats)
    return torch.where(outside[:, None], torch.full_like(out, fill), out) if fill else out


def gather_constant(
    const: torch.Tensor, sites: Sites, spatial, roll: Tuple[int, int], channel_offsets: torch.Tensor
) -> torch.Tensor:
    """A constant varying over positions (a position embedding), read at every visible token: ``(T, C)``.

    ``spatial`` lists ``(kind, size, inner, stride)`` digits of the dense index (rows ``h``, columns
    ``w``, after the layout's ``roll``) and where each sits in the constant.
    """
    offset = digit_sum(sites.coords, sites.grid, roll, spatial)
    index = offset[:, None] + channel_offsets.to(sites.device)[None, :]
    return const.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)


def scatter_dense(feats: torch.Tensor, sites: Sites, perm: Tuple[int, ...]) -> torch.Tensor:
    """Packed tokens ``(T, C)`` -> the dense map whose axes hold (sample, row, column, channel) in the order
    ``perm`` (indices into b, h, w, c), zeros at masked positions: the input of a dense island."""
    h, w = sites.grid
    dense = feats.new_zeros(sites.batch_size, h, w, feats.shape[1])
    dense = dense.index_put((sites.batch, sites.coords[:, 0], sites.coords[:, 1]), feats)
    return dense.permute(*perm)


def gather_window_map(dense: torch.Tensor, sites: Sites, order: Tuple[int, ...]) -> torch.Tensor:
    """A per-sample window-sized map (axes brought to (b, h, w, c) by ``order``) read by every visible token
    at its in-window position: ``(T, C)`` rows ``map[sample, row % mh, col % mw]``."""
    m = dense.permute(*order)
    mh, mw = m.shape[1], m.shape[2]
    return m[sites.batch, sites.coords[:, 0] % mh, sites.coords[:, 1] % mw]


def position_einsum(feats: torch.Tensor, sites: Sites, table: torch.Tensor, spec) -> torch.Tensor:
    """``einsum`` of packed tokens with a table whose leading axes are read at each token's position digits
    (``spec.spatial``, after the roll ``spec.offset``); ``spec`` names the packed channel digits (``EinsumSpec``)."""
    x = feats.reshape(feats.shape[0], *spec.sizes)
    if spec.spatial:
        digits = tuple(digit for _, digit in spec.spatial)
        lead = tuple(table.shape[: len(digits)])

        def index() -> Tuple[torch.Tensor, ...]:
            return tuple(digit_sum(sites.coords, sites.grid, spec.offset, [(*d, 1)]) for d in digits)

        found = sites.memo(("position digits", digits, tuple(spec.offset)), index)
        buckets = sites.memo(
            ("position buckets", digits, tuple(spec.offset), lead), lambda: PositionBuckets.from_index(found, lead)
        )
        return table_einsum(spec.equation, x, table, found, buckets).reshape(feats.shape[0], -1)
    return torch.einsum(spec.equation, x, table).reshape(feats.shape[0], -1)


def grid_rows(x: torch.Tensor, visible: torch.Tensor, prefix: int) -> torch.Tensor:
    """``x[:, prefix:]`` on packed rows: the grid tokens, which come first."""
    return x[: x.shape[0] - visible.shape[0] * prefix]


def prefix_rows(x: torch.Tensor, visible: torch.Tensor, prefix: int) -> torch.Tensor:
    """``x[:, :prefix]`` on packed rows: every sample's prefix tokens, ``(B * prefix, C)``, which come last."""
    return x[x.shape[0] - visible.shape[0] * prefix :]


def join_prefix(grid: torch.Tensor, parts: List[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
    """``cat((*parts, grid), token axis)`` on packed rows: grid tokens first, then every sample's prefix rows
    (sample-major; ``parts`` hold ``(B * count, C)`` rows each)."""
    batch, channels = visible.shape[0], grid.shape[1]
    own = torch.cat([p.to(grid.dtype).reshape(batch, -1, channels) for p in parts], 1)
    return torch.cat([grid, own.reshape(-1, channels)])


def constant_prefix_rows(
    const: torch.Tensor, token_axis: int, channel_axis: int, visible: torch.Tensor
) -> torch.Tensor:
    """Constant prefix tokens (``cls_token.expand(B, -1, -1)``'s source, or a position embedding's prefix rows) as
    ``(B * count, C)`` packed rows: every sample's copy, sample-major."""
    order = [token_axis] + [d for d in range(const.dim()) if d not in (token_axis, channel_axis)] + [channel_axis]
    rows = const.permute(order).reshape(const.shape[token_axis], const.shape[channel_axis])
    return rows.unsqueeze(0).expand(visible.shape[0], *rows.shape).reshape(-1, rows.shape[1])


def tokens(feats: torch.Tensor, sites: Sites) -> VisibleTokens:
    return VisibleTokens(feats, sites)


def green_output(last: VisibleTokens, stages: List[VisibleTokens]) -> GreenOutput:
    return GreenOutput(last, list(stages))


def map_rows(dense: torch.Tensor, sites: Sites, fmt: str) -> torch.Tensor:
    """A dense ``(B, C, H, W)`` (NCHW) or ``(B, H, W, C)`` (NHWC) map read at every visible site: ``(T, C)``."""
    m = dense.permute(0, 2, 3, 1) if fmt == "NCHW" else dense
    return m[sites.batch, sites.coords[:, 0], sites.coords[:, 1]]
