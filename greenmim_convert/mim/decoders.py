"""MIM decoders: GreenMIM/MAE's light transformer over visible tokens and mask tokens, and SimMIM's linear head.

A decoder maps one feature per visible unit (``feats (V, C)`` at flat positions ``index``: b * N + u) to pixel
predictions ``(B, N, P)``, or, given ``rows`` (flat positions), to those units' predictions ``(len(rows), P)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


def sincos_2d(grid: Tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed ``(gh*gw, dim)`` position embedding: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"decoder width {dim} must be a multiple of 4 for 2-D sin-cos positions")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def enc(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1) * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


class TransformerDecoder(nn.Module):
    """Encoder tokens -> decoder width, a learned mask token at hidden units, fixed 2-D sin-cos positions,
    pre-norm transformer layers, pixel head (GreenMIM / MAE)."""

    reads_hidden = False  # predicts hidden units from mask tokens: the encoder need not compute them

    def __init__(
        self,
        enc_dim: int,
        grid: Tuple[int, int],
        unit: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 8,
        in_chans: int = 3,
    ):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.register_buffer("pos_embed", sincos_2d(self.grid, dim), persistent=False)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, unit * unit * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for lin in (self.embed, self.pred):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self, feats: torch.Tensor, index: torch.Tensor, batch_size: int, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Predictions ``(B, N, P)``, or ``(len(rows), P)`` of the units ``rows`` (the pixel head is per unit)."""
        n = self.grid[0] * self.grid[1]
        emb = self.embed(feats)
        tokens = self.mask_token.to(emb.dtype).expand(batch_size * n, -1).index_put((index,), emb)
        x = self.blocks(tokens.view(batch_size, n, -1) + self.pos_embed.to(emb.dtype))
        if rows is not None:
            x = x.reshape(batch_size * n, -1).index_select(0, rows)
        return self.pred(self.norm(x))


class LinearDecoder(nn.Module):
    """SimMIM's one-layer head: a linear map of each unit's own encoder feature to its pixels.

    It predicts a hidden unit from the encoder's feature at that unit, so the encoder must compute features at
    hidden units too (the dense SimMIM encoder with its mask token); a converted encoder computes none there.
    """

    reads_hidden = True

    def __init__(self, enc_dim: int, grid: Tuple[int, int], unit: int, in_chans: int = 3):
        super().__init__()
        self.grid = tuple(grid)
        self.pred = nn.Linear(enc_dim, unit * unit * in_chans)

    def forward(
        self, feats: torch.Tensor, index: torch.Tensor, batch_size: int, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        n = self.grid[0] * self.grid[1]
        out = self.pred(feats)
        full = out.new_zeros(batch_size * n, out.shape[1]).index_put((index,), out)
        return full.index_select(0, rows) if rows is not None else full.view(batch_size, n, -1)


DECODERS = ("transformer", "linear")
