"""The set of visible positions of one grid, in canonical order (sample-major, raster inside a sample)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch


class Sites:
    """Visible positions of a ``grid`` at ``stride`` pixels per cell: ``batch (T,)`` and ``coords (T, 2)``.

    Every packed feature tensor ``(T, C)`` of the converted model is indexed by one ``Sites``. The
    dense index grid (token index or -1 per cell) is built lazily and cached, since neighbour
    lookups of several ops on the same grid share it.
    """

    def __init__(
        self,
        batch: torch.Tensor,
        coords: torch.Tensor,
        grid: Tuple[int, int],
        batch_size: int,
        stride: int = 1,
        counts: Optional[torch.Tensor] = None,
    ):
        self.batch = batch
        self.coords = coords
        self.grid = (int(grid[0]), int(grid[1]))
        self.batch_size = int(batch_size)
        self.stride = int(stride)
        self._index_grid: Optional[torch.Tensor] = None
        self._counts = counts  # visible positions per sample, when the caller has them
        self._rank: Optional[torch.Tensor] = None
        self._memo: Dict[Hashable, Any] = {}

    @classmethod
    def from_mask(cls, visible: torch.Tensor, grid: Tuple[int, int], stride: int) -> "Sites":
        """Cells of ``grid`` whose mask unit is visible; ``visible`` is ``(B, gh, gw)`` with ``grid`` a multiple of
        it."""
        b, uh, uw = visible.shape
        fh, fw = grid[0] // uh, grid[1] // uw
        if fh * uh != grid[0] or fw * uw != grid[1]:
            raise ValueError(f"grid {tuple(grid)} is not a multiple of the mask grid {(uh, uw)}")
        dense = visible.repeat_interleave(fh, dim=1).repeat_interleave(fw, dim=2)
        nz = dense.nonzero()
        return cls(nz[:, 0], nz[:, 1:], grid, b, stride)

    @property
    def num_tokens(self) -> int:
        return int(self.batch.shape[0])

    @property
    def device(self) -> torch.device:
        return self.batch.device

    def counts(self) -> torch.Tensor:
        """Number of visible positions of every sample, ``(B,)``."""
        if self._counts is None:
            self._counts = torch.bincount(self.batch, minlength=self.batch_size)
        return self._counts

    def rank(self) -> torch.Tensor:
        """Position of every token among its sample's tokens, ``(T,)``."""
        if self._rank is None:
            counts = self.counts()
            starts = torch.cumsum(counts, 0) - counts
            self._rank = torch.arange(self.num_tokens, device=self.device) - starts[self.batch]
        return self._rank

    def equal_counts(self) -> bool:
        """Whether every sample has the same number of visible positions (packed rows then reshape per sample);
        read off the counts once per sites, not at every pad and unpad."""

        def same() -> bool:
            counts = self.counts()
            return bool(counts.numel()) and int(counts.min().item()) == int(counts.max().item())

        return self.memo("equal counts", same)

    def pad(self, feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, Nmax, C)`` zero-padded per-sample features and the ``(B, Nmax)`` validity mask.

        When every sample has the same count there is no padding and the result is a view of ``feats``
        (no copy, nothing more kept for backward); do not modify it in place.
        """
        counts = self.counts()
        nmax = int(counts.max().item()) if counts.numel() else 0
        if self.equal_counts():
            valid = torch.ones(self.batch_size, nmax, dtype=torch.bool, device=self.device)
            return feats.view(self.batch_size, nmax, *feats.shape[1:]), valid
        out = feats.new_zeros(self.batch_size, nmax, feats.shape[1])
        out = out.index_put((self.batch, self.rank()), feats)
        valid = torch.zeros(self.batch_size, nmax, dtype=torch.bool, device=self.device)
        valid[self.batch, self.rank()] = True
        return out, valid

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Inverse of ``pad``: the ``(T, C)`` rows of the visible tokens, in canonical order (a reshape when every
        sample has the same count)."""
        if self.equal_counts():
            return padded.reshape(self.num_tokens, *padded.shape[2:])
        return padded[self.batch, self.rank()]

    def index_grid(self) -> torch.Tensor:
        """``(B, H, W)`` long tensor: the token index at each visible cell, -1 elsewhere."""
        if self._index_grid is None:
            h, w = self.grid
            flat = torch.full((self.batch_size * h * w,), -1, dtype=torch.long, device=self.device)
            lin = (self.batch * h + self.coords[:, 0]) * w + self.coords[:, 1]
            flat[lin] = torch.arange(self.num_tokens, device=self.device)
            self._index_grid = flat.view(self.batch_size, h, w)
        return self._index_grid

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per ``key`` for these sites: index tables that several ops on the same
        sites share (neighbour maps of convolutions with one geometry), so they are built and stored once."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def __repr__(self) -> str:
        return f"Sites(tokens={self.num_tokens}, grid={self.grid}, batch_size={self.batch_size}, stride={self.stride})"


class PrefixedSites:
    """Visible grid sites followed by ``prefix`` always-visible tokens per sample (a class token).

    Packed rows of such a layout are the grid tokens in canonical order, then every sample's prefix
    tokens, sample-major: ``(T + B * prefix, C)``.
    """

    def __init__(self, sites: Sites, prefix: int):
        self.sites = sites
        self.prefix = int(prefix)
        self.batch_size = sites.batch_size
        self.grid = sites.grid
        self.stride = sites.stride
        own = torch.arange(sites.batch_size, device=sites.device).repeat_interleave(self.prefix)
        self.batch = torch.cat([sites.batch, own])

    @property
    def num_tokens(self) -> int:
        return int(self.batch.shape[0])

    def __repr__(self) -> str:
        return f"PrefixedSites({self.sites!r}, prefix={self.prefix})"


def visible_sites(visible: torch.Tensor, grid: Tuple[int, int], stride: int) -> Sites:
    """The visible cells of a grid at ``stride`` pixels per cell."""
    return Sites.from_mask(visible, grid, stride)


def padded_sites(sites: Sites, border: Tuple[int, int, int, int]) -> Sites:
    """The sites of a grid padded by ``border`` (rows before and after, columns before and after): the visible
    sites, moved by the rows and columns added before them, and every padded position of every sample (the
    constant tokens a pad adds are always present), in canonical order."""
    top, bottom, left, right = border
    h, w = sites.grid
    grid = (h + top + bottom, w + left + right)

    def pads() -> torch.Tensor:
        inside = torch.zeros(grid, dtype=torch.bool, device=sites.device)
        inside[top : top + h, left : left + w] = True
        return (~inside).nonzero()

    pad = sites.memo(("padded positions", tuple(border)), pads)
    b = sites.batch_size
    batch = torch.cat([sites.batch, torch.arange(b, device=sites.device).repeat_interleave(pad.shape[0])])
    coords = torch.cat([sites.coords + torch.tensor([top, left], device=sites.device), pad.repeat(b, 1)])
    order = torch.argsort((batch * grid[0] + coords[:, 0]) * grid[1] + coords[:, 1])
    return Sites(batch[order], coords[order], grid, b, sites.stride)


def picked_sites(
    fine: Sites, factor: Tuple[int, int], offset: Tuple[int, int], grid: Tuple[int, int], stride: int
) -> Sites:
    """The sites of the grid whose cell ``j`` is the fine cell ``j * factor + offset`` (a strided pick of the rows and
    the columns): the fine sites at such cells, their coordinates divided down, in canonical order (the map keeps
    the raster order). A picked cell is visible exactly when the fine cell it picks is, whether or not the step
    tiles the fine grid (a pick of every second cell of 7 has 4 cells)."""
    f = torch.tensor(factor, device=fine.device)
    o = torch.tensor(offset, device=fine.device)
    kept = ((fine.coords - o) % f == 0).all(1) & (fine.coords >= o).all(1)
    return Sites(fine.batch[kept], (fine.coords[kept] - o) // f, grid, fine.batch_size, stride)


def prefixed_sites(sites: Sites, prefix: int) -> PrefixedSites:
    """The sites of a grid followed by ``prefix`` tokens per sample (rows of a layout holding a class token)."""
    return PrefixedSites(sites, prefix)


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
