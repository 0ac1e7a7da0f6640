"""Same math, many spellings: every canonical-form rule exercised by several spellings inside one small model.

A probe is a 4x4/4 patch embedding followed by one spelled operation and a residual. Each rule has one
masked-dense reference written here in plain PyTorch (keys at masked positions removed, grid statistics
over visible positions), shared by all its spellings and sharing no code with the compiler. Every
spelling is checked in float64: masked against that reference (outputs and parameter gradients) and
all-visible against the source model.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask

IMG, UNIT, C = 64, 8, 8  # a 16x16 grid at stride 4; mask units of 2x2 cells, so 4x4 windows straddle units
WINDOW, HEADS = 4, 2
NEG = -1e30


def _vis(visible: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, size, size) float visibility of a grid."""
    f = size // visible.shape[-1]
    return visible.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None].double()


# ---- spelled operations: (B, C, H, W) -> (B, C, H, W), and the masked references ---------------------------
class GridMean(nn.Module):
    """A per-sample global context: ``fc(mean over the grid)`` added to every position."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell, self.fc = spell, nn.Linear(C, C)

    def forward(self, x):
        b = x.shape[0]
        if self.spell == "mean23":
            m = x.mean((2, 3))
        elif self.spell == "mean2-mean3":
            m = x.mean(2).mean(2)
        elif self.spell == "mean3k-mean2k":
            m = x.mean(3, keepdim=True).mean(2, keepdim=True).view(b, C)
        elif self.spell == "adaptive-pool":
            m = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:  # flatten, then mean over the tokens
            m = x.flatten(2).mean(-1)
        return self.fc(m)[:, :, None, None].expand_as(x)

    def reference(self, x, vis):
        m = (x * vis).sum((2, 3)) / vis.sum((2, 3))
        return self.fc(m)[:, :, None, None].expand_as(x)


class GridMax(nn.Module):
    """The per-sample maximum over the grid, scaled and added to every position."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell, self.scale = spell, nn.Parameter(torch.randn(C))

    def forward(self, x):
        if self.spell == "amax":
            m = x.amax((2, 3))
        elif self.spell == "max-values":
            m = x.flatten(2).max(-1).values
        else:  # max of max, by dim
            m = x.max(3).values.max(2).values
        return (m * self.scale)[:, :, None, None] + 0 * x

    def reference(self, x, vis):
        m = torch.where(vis > 0, x, torch.tensor(-math.inf, dtype=x.dtype)).amax((2, 3))
        return (m * self.scale)[:, :, None, None] + 0 * x


class GroupStats(nn.Module):
    """Normalisation by statistics over each group's channels and the grid (PoolFormer's GroupNorm(1, C))."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        self.groups = 2 if spell == "groupnorm2" else 1
        self.norm = nn.GroupNorm(self.groups, C)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.2)
            self.norm.bias.normal_(0, 0.2)

    def forward(self, x):
        if self.spell.startswith("groupnorm"):
            return self.norm(x)
        dims = (1, 2, 3)
        if self.spell == "var":
            mu, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, unbiased=False)
        else:  # mean of squares of the deviation
            mu = x.mean(dims, keepdim=True)
            var = ((x - mu) ** 2).mean(dims, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.norm.eps)
        return y * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]

    def reference(self, x, vis):
        b, g = x.shape[0], self.groups
        xs, vs = x.view(b, g, C // g, *x.shape[2:]), vis[:, None].expand(b, g, C // g, *x.shape[2:])
        n = vs.sum((2, 3, 4), keepdim=True)
        mu = (xs * vs).sum((2, 3, 4), keepdim=True) / n
        var = (((xs - mu) * vs) ** 2).sum((2, 3, 4), keepdim=True) / n
        y = ((xs - mu) / torch.sqrt(var + self.norm.eps)).view_as(x)
        return y * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]


class WindowAttention(nn.Module):
    """Attention inside 4x4 windows of the grid, with a constant term and qkv, softmax and layout spelled
    ``spell`` (one of ``SPELLS['attention']``)."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        self.qkv = nn.Linear(C, 3 * C)
        self.proj_weight = nn.Parameter(torch.randn(C, C) / math.sqrt(C))  # used as x @ W in one spelling
        self.proj = nn.Linear(C, C)
        n = WINDOW * WINDOW
        self.register_buffer("term", torch.randn(16, n, n) * 0.5)  # one (N, N) term per window, equal across samples

    def partition(self, x):
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1)
        if self.spell == "movedim":
            t = torch.movedim(x, 1, -1)
        t = t.reshape(b, h // WINDOW, WINDOW, w // WINDOW, WINDOW, c)
        if self.spell == "swapaxes":
            t = t.swapaxes(2, 3)
        else:
            t = t.transpose(2, 3)
        return t.reshape(b * (h // WINDOW) * (w // WINDOW), WINDOW * WINDOW, c)

    def unpartition(self, y, like):
        b, c, h, w = like.shape
        y = y.view(b, h // WINDOW, w // WINDOW, WINDOW, WINDOW, c).transpose(2, 3).reshape(b, h, w, c)
        if self.spell == "reshape_as":
            return y.permute(0, 3, 1, 2).reshape_as(like)
        return y.permute(0, 3, 1, 2)

    def split(self, qkv):
        if self.spell == "chunk":
            return qkv.chunk(3, -1)
        if self.spell == "split":
            return qkv.split(C, -1)
        if self.spell == "unbind":
            return qkv.unflatten(-1, (3, C)).unbind(-2)
        if self.spell == "narrow":
            return tuple(qkv.narrow(-1, i * C, C) for i in range(3))
        return qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]

    def heads(self, t):
        return t.view(t.shape[0], t.shape[1], HEADS, C // HEADS).transpose(1, 2)

    def term_for(self, b):
        t = self.term  # (windows, N, N)
        if self.spell == "term-expand":
            return t.unsqueeze(0).expand(b, -1, -1, -1).reshape(-1, 1, *t.shape[1:])
        if self.spell == "term-repeat":
            return t.repeat(b, 1, 1).unsqueeze(1)
        if self.spell == "term-cat":
            return torch.cat([t] * b, 0).unsqueeze(1)
        return None

    def softmax(self, a):
        if self.spell == "exp-amax":
            e = torch.exp(a - a.amax(-1, keepdim=True))
            return e / e.sum(-1, keepdim=True)
        if self.spell == "exp":
            e = a.exp()
            return e / e.sum(dim=-1, keepdim=True)
        if self.spell == "max-values-exp":
            e = torch.exp(a - a.max(-1, keepdim=True).values)
            return e / e.sum(-1, keepdim=True)
        return F.softmax(a, dim=-1)

    def attend(self, x, key_bias=None):
        b = x.shape[0]
        t = self.partition(x)
        q, k, v = (self.heads(p) for p in self.split(self.qkv(t)))
        a = (q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5
        term = self.term_for(b)
        if term is not None:
            a = a + term
        else:  # broadcast against (B, windows, heads, N, N)
            a = (a.view(b, -1, HEADS, *a.shape[-2:]) + self.term.unsqueeze(1)).view(a.shape)
        if key_bias is not None:
            a = a + key_bias
        y = (self.softmax(a) @ v).transpose(1, 2).reshape(t.shape)
        y = y @ self.proj_weight if self.spell == "matmul-weight" else self.proj(y)
        return self.unpartition(y, x)

    def forward(self, x):
        return self.attend(x)

    def reference(self, x, vis):
        keys = self.partition(vis.expand(-1, 1, -1, -1))[:, None, None, :, 0]  # (B*windows, 1, 1, N)
        return self.attend(x, torch.where(keys > 0, 0.0, NEG).to(x.dtype))


PAD_WINDOW = 3  # 16 = 5 * 3 + 1: windows of 3 need the 16x16 grid padded by two rows and two columns


class PaddedWindowAttention(nn.Module):
    """Attention inside 3x3 windows of the grid padded to 18x18 after a norm (padded positions are constant tokens
    of the model: keys whose k and v are the qkv biases), cropped back; pad, windows and crop spelled ``spell``."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        self.norm = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.2)
            self.norm.bias.normal_(0, 0.2)

    def sides(self) -> Tuple[int, int, int, int]:
        """Rows padded before and after, columns before and after."""
        return (1, 1, 1, 1) if self.spell == "both-sides" else (0, 2, 0, 2)

    def pad(self, t, value: float = 0.0):
        """NHWC ``t`` padded on the grid: on NHWC, on NCHW, or with ``constant_pad_nd``."""
        top, bottom, left, right = self.sides()
        if self.spell == "nchw":
            return F.pad(t.permute(0, 3, 1, 2), (left, right, top, bottom), value=value).permute(0, 2, 3, 1)
        if self.spell == "constant-pad-nd":
            return torch.constant_pad_nd(t, (0, 0, left, right, top, bottom), value)
        return F.pad(t, (0, 0, left, right, top, bottom), value=value)

    def partition(self, t):
        b, h, w, c = t.shape
        n = PAD_WINDOW
        if self.spell == "shifted":
            t = torch.roll(t, (-1, -1), (1, 2))
        if self.spell == "unfold":
            return t.unfold(1, n, n).unfold(2, n, n).permute(0, 1, 2, 4, 5, 3).reshape(-1, n * n, c)
        return t.view(b, h // n, n, w // n, n, c).transpose(2, 3).reshape(-1, n * n, c)

    def unpartition(self, y, like):
        b, h, w, c = like.shape
        n = PAD_WINDOW
        y = y.view(b, h // n, w // n, n, n, c).transpose(2, 3).reshape(b, h, w, c)
        return torch.roll(y, (1, 1), (1, 2)) if self.spell == "shifted" else y

    def crop(self, y, size: int):
        top, _, left, _ = self.sides()
        if self.spell == "narrow":
            return y.narrow(1, top, size).narrow(2, left, size)
        return y[:, top : top + size, left : left + size]

    def attend(self, x, key_bias=None):
        t = self.pad(self.norm(x.permute(0, 2, 3, 1)), 0.25 if self.spell == "value" else 0.0)
        win = self.partition(t)
        q, k, v = (p.view(*p.shape[:2], HEADS, C // HEADS).transpose(1, 2) for p in self.qkv(win).chunk(3, -1))
        a = (q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5
        if key_bias is not None:
            a = a + key_bias
        y = self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(win.shape))
        return self.crop(self.unpartition(y, t), x.shape[-1]).permute(0, 3, 1, 2)

    def forward(self, x):
        return self.attend(x)

    def reference(self, x, vis):
        """Keys at hidden image positions removed; padded positions stay keys."""
        top, bottom, left, right = self.sides()
        padded = F.pad(vis, (left, right, top, bottom), value=1.0).permute(0, 2, 3, 1)
        keys = self.partition(padded)[:, None, None, :, 0]
        return self.attend(x, torch.where(keys > 0, 0.0, NEG).to(x.dtype))


POOL_PAD, POOL_WINDOW = 2, 5  # the 16x16 grid padded to 20x20, pooled onto 10x10 (8x8 image cells), windows of 5


class PaddedPool(nn.Module):
    """The grid padded by two positions on every side after a norm, pooled onto a 10x10 grid whose border cells hold
    only padded positions (kernel == stride) or some image positions too (sliding 3x3 windows), then attention in
    5x5 windows of the pooled grid, whose padded cells are keys, cropped to the image's 8x8 cells; the pool is
    spelled ``spell``."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        self.norm = nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        with torch.no_grad():
            self.norm.bias.normal_(0, 0.5)

    def pool(self, t, vis=None):
        """NCHW ``t`` (20x20) -> its pool (10x10); over the positions ``vis`` > 0 only when given."""
        if self.spell.endswith("max"):
            if vis is None:
                return self.max_pool(t)
            pooled = self.max_pool(torch.where(vis > 0, t, torch.tensor(-math.inf, dtype=t.dtype)))
            return torch.where(pooled > -math.inf, pooled, 0.0)  # cells with no visible position: hidden cells
        k, p = (3, 1) if self.spell == "sliding-avg" else (2, 0)
        if vis is None:
            return F.avg_pool2d(t, k, 2, p, count_include_pad=False)
        total = F.avg_pool2d(t * vis, k, 2, p, divisor_override=1)
        return total / F.avg_pool2d(vis, k, 2, p, divisor_override=1).clamp_min(1)

    def max_pool(self, t):
        if self.spell == "view-max":
            b, c, h, w = t.shape
            return t.view(b, c, h // 2, 2, w // 2, 2).amax((3, 5))
        if self.spell == "windows-max":  # windows of 10x10 folded into the batch, pooled, unfolded
            return self.unpartition(F.max_pool2d(self.partition(t, 2 * POOL_WINDOW), 2), t.shape[0])
        return F.max_pool2d(t, 3, 2, 1) if self.spell == "sliding-max" else F.max_pool2d(t, 2)

    @staticmethod
    def partition(t, n: int):
        """NCHW ``t`` -> its n x n windows, NCHW, folded into the batch axis."""
        b, c, h, w = t.shape
        return t.view(b, c, h // n, n, w // n, n).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, n, n)

    @staticmethod
    def unpartition(t, b: int):
        """Inverse of ``partition`` for a batch of ``b`` square maps."""
        nb, c, n, _ = t.shape
        g = math.isqrt(nb // b)
        return t.view(b, g, g, c, n, n).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * n, g * n)

    def attend(self, x, vis=None):
        b, c, h, w = x.shape
        t = F.pad(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), (POOL_PAD,) * 4)
        pooled = self.pool(t, None if vis is None else F.pad(vis, (POOL_PAD,) * 4, value=1.0))
        win = self.partition(pooled, POOL_WINDOW).flatten(2).transpose(1, 2)
        q, k, v = (p.view(*p.shape[:2], HEADS, C // HEADS).transpose(1, 2) for p in self.qkv(win).chunk(3, -1))
        a = (q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5
        if vis is not None:  # keys at hidden image cells of the pooled grid removed; its padded cells stay keys
            cells = F.pad(vis[:, :, ::2, ::2], (POOL_PAD // 2,) * 4, value=1.0)
            keys = self.partition(cells, POOL_WINDOW).flatten(1)[:, None, None]
            a = a + torch.where(keys > 0, 0.0, NEG).to(x.dtype)
        y = self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(win.shape))
        y = self.unpartition(y.transpose(1, 2).reshape(-1, c, POOL_WINDOW, POOL_WINDOW), b)
        crop = POOL_PAD // 2
        return y[:, :, crop : crop + h // 2, crop : crop + w // 2]

    def forward(self, x):
        return self.attend(x)

    def reference(self, x, vis):
        return self.attend(x, vis)


class DropPath(nn.Module):
    """Stochastic depth of a token-wise branch, its keep mask drawn per sample and spelled three ways."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell, self.fc, self.keep = spell, nn.Conv2d(C, C, 1), 0.6

    def forward(self, x):
        y = self.fc(x)
        if not self.training:
            return y
        shape = (x.shape[0], 1, 1, 1)
        if self.spell == "bernoulli":
            mask = x.new_empty(shape).bernoulli_(self.keep)
        elif self.spell == "floor":
            mask = torch.floor(self.keep + torch.rand(shape, dtype=x.dtype, device=x.device))
        else:  # a comparison
            mask = (torch.rand(shape, dtype=x.dtype, device=x.device) < self.keep).to(x.dtype)
        return y.div(self.keep) * mask

    def reference(self, x, vis):
        return self.forward(x)


class CellMax(nn.Module):
    """A 2x2 max pooling of the grid written on views (Hiera's unrolled pooling); the residual is pooled too."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell, self.fc = spell, nn.Conv2d(C, C, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.fc(x).view(b, c, h // 2, 2, w // 2, 2)
        if self.spell == "amax":
            return t.amax((3, 5))
        if self.spell == "max-values":
            return t.max(5).values.max(3).values
        return t.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4).max(-1)[0]

    def reference(self, x, vis):
        return self.forward(x)  # a cell lies inside one mask unit: all of it visible or none


class StripeMax(nn.Module):
    """A max over rows a quarter of the grid apart, the pooled rows then read as a square grid (HieraBackbone's
    query pooling of raster tokens it never unrolled): its groups span the image, its mask unit is the image."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell, self.fc = spell, nn.Conv2d(C, C, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        if self.spell == "tokens":
            t = self.fc(x).flatten(2).transpose(1, 2).reshape(b, 4, h * w // 4, c).amax(1)
            return t.transpose(1, 2).reshape(b, c, h // 2, w // 2)
        t = self.fc(x).view(b, c, 4, h // 4, w)
        pooled = t.amax(2) if self.spell == "amax" else t.max(2).values
        return pooled.reshape(b, c, h // 2, w // 2)

    def reference(self, x, vis):
        return self.forward(x)  # every position of a sample shares its unit: all of it visible or none


class FoldedPool(nn.Module):
    """Queries pooled 2x2 inside 4x4 windows folded into the batch axis attend to their window's keys (SAM 2's
    query pooling); the pool of the folded windows is spelled ``spell``."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell, self.qkv, self.proj = spell, nn.Linear(C, 3 * C), nn.Linear(C, C)

    def pool(self, t):
        """(N, h, w, C) windows -> (N, h/2, w/2, C)."""
        n, h, w, c = t.shape
        if self.spell == "view-amax":
            return t.view(n, h // 2, 2, w // 2, 2, c).amax((2, 4))
        if self.spell == "view-max-values":
            return t.view(n, h // 2, 2, w // 2, 2, c).max(4).values.max(2).values
        nchw = t.permute(0, 3, 1, 2)
        if self.spell == "max_pool2d":
            pooled = F.max_pool2d(nchw, 2)
        elif self.spell == "avg_pool2d":
            pooled = F.avg_pool2d(nchw, 2, 2)
        else:  # adaptive average pooling to half the window
            pooled = F.adaptive_avg_pool2d(nchw, (h // 2, w // 2))
        return pooled.permute(0, 2, 3, 1)

    def attend(self, x, key_bias=None):
        b, c, h, w = x.shape
        nh, nw = h // WINDOW, w // WINDOW
        t = x.permute(0, 2, 3, 1).reshape(b, nh, WINDOW, nw, WINDOW, c).transpose(2, 3).reshape(-1, WINDOW, WINDOW, c)
        q, k, v = self.qkv(t).chunk(3, -1)
        q = self.pool(q).reshape(t.shape[0], -1, HEADS, C // HEADS).transpose(1, 2)
        k, v = (p.reshape(t.shape[0], -1, HEADS, C // HEADS).transpose(1, 2) for p in (k, v))
        a = (q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5
        if key_bias is not None:
            a = a + key_bias
        y = self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(t.shape[0], -1, c))
        half = WINDOW // 2
        y = y.view(b, nh, nw, half, half, c).transpose(2, 3).reshape(b, h // 2, w // 2, c)
        return y.permute(0, 3, 1, 2)

    def forward(self, x):
        return self.attend(x)

    def reference(self, x, vis):
        b, _, h, w = vis.shape
        keys = vis.view(b, h // WINDOW, WINDOW, w // WINDOW, WINDOW).transpose(2, 3).reshape(-1, 1, 1, WINDOW * WINDOW)
        return self.attend(x, torch.where(keys > 0, 0.0, NEG).to(x.dtype))


class SubsampledAttention(nn.Module):
    """Attention whose queries are every second position of the ``n x n`` grid from ``start`` on (LeViT's
    subsampling), keys every position, with a table bias gathered per (query, key) offset; queries and keys have 4
    columns per head, values 8. The output lives on the grid of the picked positions: ``ceil((n - start) / 2)`` a
    side, also where the step does not tile the grid (an odd ``n``). ``spell`` picks how the queries are
    subsampled; ``pad`` spellings pad an odd grid by a row and a column first, never picked."""

    def __init__(self, spell: str, n: int = 16):
        super().__init__()
        self.spell, self.start = spell, 1 if spell.endswith("odd") else 0
        self.kv = nn.Linear(C, HEADS * 12)
        self.q = nn.Linear(C, HEADS * 4)
        self.proj = nn.Linear(HEADS * 8, C)
        s = self.start
        rows = torch.arange(s, n, 2)
        dq = (rows[:, None] - torch.arange(n)).abs()  # (query row, key row) distances
        index = (dq[:, None, :, None] * n + dq[None, :, None, :]).reshape(len(rows) ** 2, n * n)
        self.table = nn.Parameter(torch.randn(HEADS, n * n) * 0.5)
        self.register_buffer("index", index)

    def subsample(self, x, spell):
        s = self.start
        if spell.startswith("pad"):
            x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2))
        b, c, h, w = x.shape
        if spell.startswith("strided-tokens"):
            t = x.flatten(2).transpose(1, 2)
            return t.view(b, h, w, c)[:, s::2, s::2].reshape(b, -1, c)
        if "select" in spell:
            q = x.view(b, c, h // 2, 2, w // 2, 2)[:, :, :, s, :, s]
        else:
            q = x[:, :, s::2, s::2]
        return q.flatten(2).transpose(1, 2)

    def attend(self, x, spell, key_bias=None):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        k, v = self.kv(t).view(b, h * w, HEADS, 12).split([4, 8], dim=3)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        q = self.q(self.subsample(x, spell)).view(b, -1, HEADS, 4).permute(0, 2, 1, 3)
        a = q @ k.transpose(-2, -1) * 0.5 + self.table[:, self.index]
        if key_bias is not None:
            a = a + key_bias
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, HEADS * 8)
        return self.proj(y).transpose(1, 2).reshape(b, c, len(range(self.start, h, 2)), len(range(self.start, w, 2)))

    def forward(self, x):
        return self.attend(x, self.spell)

    def picked(self, vis):
        """The visibility of the output grid: that of the positions it picks."""
        return vis[:, :, self.start :: 2, self.start :: 2]

    def reference(self, x, vis):
        keys = vis.flatten(1)[:, None, None, :]  # (B, 1, 1, HW)
        return self.attend(x, "strided", torch.where(keys > 0, 0.0, NEG).to(x.dtype))


PATCH = 2


class PatchAttention(nn.Module):
    """MobileViT's attention: the grid unfolded into PATCH x PATCH patches, attention among the positions that share
    an in-patch offset (the offset digits on the batch axis, tokens = patches), folded back. ``spell`` picks how it
    unfolds and folds; ``*-one`` spellings take the whole grid as one patch, so each position attends to itself."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        self.patch = 16 if spell.endswith("-one") else PATCH
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def unfold(self, x, spell):
        b, c, h, w = x.shape
        p = self.patch
        n = (h // p) * (w // p)
        if spell.startswith("reshape"):  # MobileViT's own
            t = x.reshape(b * c * (h // p), p, w // p, p).transpose(1, 2).reshape(b, c, n, p * p)
            return t.transpose(1, 3).reshape(b * p * p, n, c)
        if spell.startswith("unfold"):
            t = F.unfold(x, p, stride=p)
        else:
            t = F.pixel_unshuffle(x, p)
        return t.reshape(b, c, p * p, n).permute(0, 2, 3, 1).reshape(b * p * p, n, c)

    def fold(self, t, like, spell):
        b, c, h, w = like.shape
        p = self.patch
        n = (h // p) * (w // p)
        if spell.startswith("reshape"):
            y = t.contiguous().view(b, p * p, n, c).transpose(1, 3).reshape(b * c * (h // p), w // p, p, p)
            return y.transpose(1, 2).reshape(b, c, h, w)
        y = t.view(b, p * p, n, c).permute(0, 3, 1, 2)
        if spell.startswith("unfold"):
            return F.fold(y.reshape(b, c * p * p, n), (h, w), p, stride=p)
        return F.pixel_shuffle(y.reshape(b, c * p * p, h // p, w // p), p)

    def attend(self, x, spell, key_bias=None):
        t = self.unfold(x, spell)
        q, k, v = (u.view(t.shape[0], t.shape[1], HEADS, C // HEADS).transpose(1, 2) for u in self.qkv(t).chunk(3, -1))
        a = q @ k.transpose(-2, -1) * (C // HEADS) ** -0.5
        if key_bias is not None:
            a = a + key_bias
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(t.shape)
        return self.fold(self.proj(y), x, spell)

    def forward(self, x):
        return self.attend(x, self.spell)

    def reference(self, x, vis):
        keys = self.unfold(vis, "reshape")[:, None, None, :, 0]  # (B * offsets, 1, 1, patches)
        return self.attend(x, "reshape", torch.where(keys > 0, 0.0, NEG).to(x.dtype))


class PrefixAttention(nn.Module):
    """Global attention over prefix tokens (always visible) and the grid tokens, with a position embedding over
    both and (one prefix token) a rotary embedding of the grid part of q and k; prefix tokens and rotation spelled
    ``spell``."""

    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        n, self.count = IMG // 4, {"cls-reg": 3, "cls-dist": 2}.get(spell, 1)
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.more = nn.Parameter(torch.randn(1, self.count - 1, C)) if self.count > 1 else None
        self.pos = nn.Parameter(torch.randn(1, self.count + n * n, C) * 0.5)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        angle = torch.rand(n * n, C // HEADS // 2) * math.pi
        self.register_buffer("cos", angle.cos().repeat_interleave(2, -1))
        self.register_buffer("sin", angle.sin().repeat_interleave(2, -1))

    def tokens(self, t):
        b = t.shape[0]
        if self.spell == "pos-after":  # position embedding added to the grid, then to the class token, then cat
            return torch.cat([(self.cls + self.pos[:, :1]).expand(b, -1, -1), t + self.pos[:, 1:]], 1)
        if self.spell == "cls-dist":  # two single-token parts
            parts = [self.cls.expand(b, -1, -1), self.more.expand(b, -1, -1)]
        elif self.spell == "cls-reg":  # one token, then two more as one part
            parts = [self.cls.expand(b, -1, -1), self.more.expand(b, -1, -1)]
        else:
            parts = [self.cls.expand(b, -1, -1)]
        return torch.cat(parts + [t], 1) + self.pos

    def rotate(self, x):
        if self.spell == "rope-cat":
            r = torch.cat([-x[..., 1::2].unsqueeze(-1), x[..., ::2].unsqueeze(-1)], -1).flatten(-2)
        else:
            r = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
        return x * self.cos + r * self.sin

    def attend(self, x, key_bias=None):
        b, c, h, w = x.shape
        t = self.tokens(x.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).view(b, -1, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.count
        if p == 1:  # reading back several prefix tokens (``q[:, :, :p]``) is not converted yet
            q = torch.cat([q[:, :, :p], self.rotate(q[:, :, p:])], 2)
            k = torch.cat([k[:, :, :p], self.rotate(k[:, :, p:])], 2)
        a = (q @ k.transpose(-2, -1)) * (C // HEADS) ** -0.5
        if key_bias is not None:
            a = a + key_bias
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c)[:, p:]
        return self.proj(y).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x):
        return self.attend(x)

    def reference(self, x, vis):
        keys = torch.cat([vis.new_ones(vis.shape[0], self.count), vis.flatten(1)], 1)[:, None, None]
        return self.attend(x, torch.where(keys > 0, 0.0, NEG).to(x.dtype))


SPELLS: Dict[str, Tuple[Callable[[str], nn.Module], Tuple[str, ...]]] = {
    "grid-mean": (GridMean, ("mean23", "mean2-mean3", "mean3k-mean2k", "adaptive-pool", "flatten-mean")),
    "grid-max": (GridMax, ("amax", "max-values", "max-of-max")),
    "group-stats": (GroupStats, ("groupnorm1", "groupnorm2", "var", "mean-of-squares")),
    "attention": (
        WindowAttention,
        (
            "plain",
            "chunk",
            "split",
            "unbind",
            "narrow",
            "exp-amax",
            "exp",
            "max-values-exp",
            "term-expand",
            "term-repeat",
            "term-cat",
            "matmul-weight",
            "movedim",
            "swapaxes",
            "reshape_as",
        ),
    ),
    "padded-window": (
        PaddedWindowAttention,
        ("nhwc", "nchw", "both-sides", "constant-pad-nd", "value", "unfold", "shifted", "narrow"),
    ),
    "padded-pool": (PaddedPool, ("max", "view-max", "windows-max", "sliding-max", "avg", "sliding-avg")),
    "drop-path": (DropPath, ("bernoulli", "floor", "compare")),
    "cell-max": (CellMax, ("amax", "max-values", "getitem-max")),
    "stripe-max": (StripeMax, ("amax", "max-values", "tokens")),
    "folded-pool": (FoldedPool, ("max_pool2d", "view-amax", "view-max-values", "avg_pool2d", "adaptive-avg")),
    "subsampled-attention": (
        SubsampledAttention,
        ("strided", "strided-tokens", "select", "strided-odd", "strided-tokens-odd", "select-odd"),
    ),
    # a 15x15 grid (60 px): every second row and column of 15 from 0 is 8 of them, from 1 is 7
    "odd-subsampled-attention": (
        lambda spell: SubsampledAttention(spell, n=15),
        ("strided", "strided-tokens", "pad-select", "pad-strided", "strided-odd", "strided-tokens-odd"),
    ),
    "patch-attention": (
        PatchAttention,
        ("reshape", "unfold", "pixel-shuffle", "reshape-one", "unfold-one", "pixel-shuffle-one"),
    ),
    "prefix-attention": (PrefixAttention, ("cls", "pos-after", "cls-dist", "cls-reg", "rope-cat")),
}
CASES = [(rule, spell) for rule, (_, spells) in SPELLS.items() for spell in spells]
UNITS = {"stripe-max": IMG}  # rules whose groups span the image: whole samples visible or hidden
# rule -> (image side, mask unit) where not (IMG, UNIT): 15x15 cells at stride 4 in units of 3x3 cells
SIZES = {"odd-subsampled-attention": (60, 12)}


class Probe(nn.Module):
    """Patch embedding, then the spelled operation with a residual (pooled ops replace the map)."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, 4)
        self.op = op

    def forward(self, x):
        y = self.embed(x)
        z = self.op(y)
        return z if z.shape != y.shape else y + z

    def reference(self, x, visible):
        """The masked-dense output ``(B, C, h, w)``: the embedding sees one patch, so only the op changes."""
        y = self.embed(x)
        vis = _vis(visible, y.shape[-1])
        z = self.op.reference(y * vis, vis)
        return z if z.shape != y.shape else y + z

    def visibility(self, x, visible, side):
        """``(B, 1, side, side)`` visibility of the output grid: a picked grid's is that of the cells it picks."""
        picked = getattr(self.op, "picked", None)
        return picked(_vis(visible, x.shape[-1] // 4)) if picked is not None else _vis(visible, side)


def _probe(rule: str, spell: str, seed: int) -> Probe:
    torch.manual_seed(seed)
    cls, _ = SPELLS[rule]
    return Probe(cls(spell)).double().eval()


@pytest.mark.parametrize("rule,spell", CASES, ids=[f"{r}-{s}" for r, s in CASES])
def test_spelling_matches_reference(rule: str, spell: str, seed: int):
    model = _probe(rule, spell, seed)
    train = rule == "drop-path"
    size, unit = SIZES.get(rule, (IMG, UNITS.get(rule, UNIT)))
    green = gmc.convert(model, img_size=size, mask_unit=unit)
    model.train(train)
    green.train(train)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64)
    visible = random_mask(3, (size // unit, size // unit), 0.5, generator=gen)
    visible[0] = True  # one sample all visible: its output is the source model's
    if unit < size:
        visible[1, 0, 0], visible[1, 1, 1] = True, False
    else:
        visible[1] = False  # the image is the unit: one sample hidden

    torch.manual_seed(seed)
    out = green(images, visible).last
    dense = out.to_dense()
    torch.manual_seed(seed)
    ref = model.reference(images, visible)
    torch.manual_seed(seed)
    src = model(images)
    vis = model.visibility(images, visible, dense.shape[-1]).expand_as(dense) > 0
    assert rel_err(dense[vis], ref[vis]) <= 1e-10
    assert rel_err(dense[0], src[0]) <= 1e-10

    weights = torch.randn(int(vis.sum()), generator=gen, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad((dense[vis] * weights).sum(), params, allow_unused=True)
    torch.manual_seed(seed)
    want = torch.autograd.grad((model.reference(images, visible)[vis] * weights).sum(), params, allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        if w is None or not w.abs().max() > 0:
            continue
        assert g is not None, name
        assert rel_err(g, w) <= 1e-10, name


@pytest.mark.parametrize(
    "rule",
    [
        "grid-mean",
        "grid-max",
        "group-stats",
        "attention",
        "folded-pool",
        "padded-window",
        "padded-pool",
        "subsampled-attention",
        "odd-subsampled-attention",
        "patch-attention",
        "prefix-attention",
    ],
)
def test_reference_sees_the_mask(rule: str):
    """The references that mix positions are not the dense model: with units masked, visible outputs change.
    (Drop path and in-unit pooling change no visible output under masking, by definition.)"""
    model = _probe(rule, SPELLS[rule][1][0], 0)
    size, unit = SIZES.get(rule, (IMG, UNIT))
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    n = size // unit
    visible = ((torch.arange(n)[:, None] + torch.arange(n)) % 2 == 0).expand(2, n, n)  # a checkerboard of units
    ref, src = model.reference(images, visible), model(images)
    vis = model.visibility(images, visible, ref.shape[-1]).expand_as(ref) > 0
    assert rel_err(ref[vis], src[vis]) > 1e-6
