"""The symbolic layout algebra against real tensors: follow ops on an index tensor and compare."""

from __future__ import annotations

import pytest
import torch

from greenmim_convert.compiler.layout import Layout, LayoutError, space_to_depth_plan


def _coords_tensor(b, h, w, c):
    """Dense (B, H, W, C) tensor whose entries encode (b, h, w, c) as one integer."""
    bb, hh, ww, cc = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), torch.arange(c), indexing="ij")
    return ((bb * 1000 + hh) * 1000 + ww) * 1000 + cc


def _decode(layout: Layout, index):
    """(b, h, w, c) that the layout says sits at a dense index tuple."""
    digits = {"b": 0, "h": 0, "w": 0, "c": 0}
    for ax, i in zip(layout.axes, index):
        rem = i
        for a in reversed(ax):
            digits[a.kind] += (rem % a.size) * a.inner
            rem //= a.size
    h = (digits["h"] + layout.offset[0]) % layout.grid[0]
    w = (digits["w"] + layout.offset[1]) % layout.grid[1]
    return ((digits["b"] * 1000 + h) * 1000 + w) * 1000 + digits["c"]


def _assert_matches(layout: Layout, t: torch.Tensor):
    assert layout.shape == tuple(t.shape)
    flat = t.reshape(-1)
    for k in torch.randint(0, flat.numel(), (200,)).tolist():
        idx = []
        rem = k
        for s in reversed(t.shape):
            idx.append(rem % s)
            rem //= s
        assert _decode(layout, list(reversed(idx))) == int(flat[k])


def test_swin_shifted_window_round_trip():
    b, h, w, c, ws, s = 2, 8, 8, 3, 4, 2
    t = _coords_tensor(b, h, w, c)
    lay = Layout.nhwc(b, (h, w), c, 4)
    t1 = torch.roll(t, (-s, -s), (1, 2))
    l1 = lay.roll((-s, -s), (1, 2))
    t2 = t1.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    l2 = l1.view((b, h // ws, ws, w // ws, ws, c)).permute((0, 1, 3, 2, 4, 5)).view((-1, ws * ws, c))
    _assert_matches(l2, t2)
    t3 = t2.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c).roll((s, s), (1, 2))
    l3 = l2.view((b, h // ws, w // ws, ws, ws, c)).permute((0, 1, 3, 2, 4, 5)).view((b, h, w, c)).roll((s, s), (1, 2))
    _assert_matches(l3, t3)
    assert l3 == lay and l3.is_canonical_tokens()


def test_patch_merging_plan_matches_dense():
    b, h, w, c = 2, 4, 6, 3
    t = _coords_tensor(b, h, w, c)
    lay = Layout.nhwc(b, (h, w), c, 4).view((b, h // 2, 2, w // 2, 2, c)).permute((0, 1, 3, 4, 2, 5)).flatten(3)
    merged = t.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
    _assert_matches(lay, merged)
    new, factor, plan = space_to_depth_plan(lay)
    assert factor == (2, 2) and new.grid == (2, 3) and new.stride == 8 and new.channels == 4 * c
    for f, (dh, dw, ch) in enumerate(plan):
        want = merged[1, 1, 2, f]
        assert int(want) == ((1 * 1000 + 2 + dh) * 1000 + 4 + dw) * 1000 + ch


def test_nchw_to_tokens():
    lay = Layout.nchw(2, (4, 4), 5, 4)
    assert lay.permute((0, 2, 3, 1)).is_canonical_tokens()
    assert lay.flatten(2).transpose(1, 2).channel_last()


@pytest.mark.parametrize(
    "bad",
    [
        lambda l: l.view((2, 3, 16, 5)),  # 3 does not divide a digit
        lambda l: l.view((2, 16, 4, 5)).roll((1,), (1,)),  # roll across a split dimension
    ],
)
def test_layout_errors(bad):
    with pytest.raises(LayoutError):
        bad(Layout.nhwc(2, (8, 8), 5, 4))


def test_prefix_tokens_stay_on_their_axis():
    """A class token before the grid tokens: views keep that axis whole, the grid part drops the prefix."""
    tokens = Layout.nhwc(2, (4, 4), 12, 4).view((2, 16, 12))
    lay = Layout(tokens.axes, tokens.grid, tokens.stride, prefix=1)
    assert lay.shape == (2, 17, 12)
    heads = lay.view((2, 17, 3, 4)).permute((0, 2, 1, 3))
    assert heads.shape == (2, 3, 17, 4) and heads.prefixed_axes() == {2: 1}
    assert heads.transpose(1, 2).view((2, 17, 12)) == lay
    assert heads.without_prefix(2).shape == (2, 3, 16, 4)
    for bad in (lambda: lay.view((2, 17 * 12)), lambda: lay.view((34, 12)), lambda: lay.flatten(0, 1)):
        with pytest.raises(LayoutError):
            bad()
