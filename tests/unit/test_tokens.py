"""VisibleTokens views and random masks."""

from __future__ import annotations

import pytest
import torch

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.runtime.plan.sites import Sites


def _tokens(visible, grid=(8, 8), channels=5, gen=None):
    sites = Sites.from_mask(visible, grid, 4)
    return gmc.VisibleTokens(torch.randn(sites.num_tokens, channels, generator=gen, dtype=torch.float64), sites)


def test_to_dense_and_padded(seed):
    gen = torch.Generator().manual_seed(seed)
    visible = torch.rand(3, 4, 4, generator=gen) > 0.5
    visible[0] = True
    t = _tokens(visible, gen=gen)
    dense = t.to_dense()
    assert dense.shape == (3, 5, 8, 8)
    cells = visible.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.all(dense.permute(0, 2, 3, 1)[~cells] == 0)
    assert torch.equal(dense.permute(0, 2, 3, 1)[cells], t.feats)
    padded, valid = t.to_padded()
    assert padded.shape[:2] == valid.shape == (3, int(t.counts().max()))
    assert torch.equal(padded[valid], t.feats)
    assert torch.all(padded[~valid] == 0)


def test_as_batched_zero_copy_and_mean(seed):
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(4, (4, 4), 0.5, generator=gen)
    t = _tokens(visible, gen=gen)
    view = t.as_batched()
    assert view.shape == (4, 32, 5) and view.data_ptr() == t.feats.data_ptr()
    assert torch.allclose(t.mean(), view.mean(1))
    visible[0, 0, 0] = not visible[0, 0, 0]
    with pytest.raises(ValueError):
        _tokens(visible).as_batched()


def test_pad_is_a_view_when_counts_are_equal(seed):
    """Equal counts: pad is a reshape of the packed rows (no copy) and unpad its inverse; both agree with the
    padded copy built for unequal counts, gradients included."""
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(3, (4, 4), 0.5, generator=gen)
    t = _tokens(visible, gen=gen)
    feats = t.feats.clone().requires_grad_()
    padded, valid = t.sites.pad(feats)
    assert t.sites.equal_counts() and valid.all() and padded.data_ptr() == feats.data_ptr()
    expected = torch.zeros(3, 32, 5, dtype=feats.dtype).index_put((t.sites.batch, t.sites.rank()), t.feats)
    assert torch.equal(padded, expected)
    back = t.sites.unpad(padded * 2)
    assert torch.equal(back, 2 * t.feats)
    back.sum().backward()
    assert torch.equal(feats.grad, torch.full_like(feats, 2.0))
    visible[0, 0, 0] = not visible[0, 0, 0]
    uneven = _tokens(visible, gen=gen)
    assert not uneven.sites.equal_counts()
    padded, valid = uneven.sites.pad(uneven.feats)
    assert padded.data_ptr() != uneven.feats.data_ptr() and torch.equal(uneven.sites.unpad(padded), uneven.feats)


def test_random_mask_counts_and_determinism():
    m1 = random_mask(6, (7, 7), 0.75, generator=torch.Generator().manual_seed(3))
    m2 = random_mask(6, (7, 7), 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)
    assert m1.dtype == torch.bool and m1.shape == (6, 7, 7)
    assert (m1.flatten(1).sum(1) == 49 - round(0.75 * 49)).all()
    assert len({tuple(m.flatten().tolist()) for m in m1}) > 1  # every sample its own mask
    assert random_mask(2, 4, 0.0).all() and not random_mask(2, 4, 1.0).any()
    with pytest.raises(gmc.InvalidInputError):
        random_mask(2, (4, 4), 1.5)
