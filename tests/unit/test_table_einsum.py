"""A per-token einsum with a table read at each token's position equals einsum on the gathered table."""

from __future__ import annotations

import pytest
import torch

from greenmim_convert.runtime.table_einsum import PositionBuckets, table_einsum


@pytest.mark.parametrize("axes", [1, 2])
def test_matches_einsum_of_gathered_table(axes):
    """Float64 outputs and gradients of x and the table, tokens sharing entries, some entries read by no token."""
    gen = torch.Generator().manual_seed(5 + axes)
    tokens, heads, chans, rows, cols, keys = 37, 2, 5, 6, 4, 3
    x = torch.randn(tokens, heads, chans, generator=gen, dtype=torch.float64, requires_grad=True)
    shape = (rows, cols, keys, chans) if axes == 2 else (rows, keys, chans)
    table = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    index = (torch.randint(0, rows - 1, (tokens,), generator=gen),)  # the last row is read by no token
    if axes == 2:
        index += (torch.randint(0, cols, (tokens,), generator=gen),)
    weight = torch.randn(tokens, heads, keys, generator=gen, dtype=torch.float64)
    got = table_einsum("tyc,tkc->tyk", x, table, index)
    got_grads = torch.autograd.grad((got * weight).sum(), (x, table))
    want = torch.einsum("tyc,tkc->tyk", x, table[index])
    want_grads = torch.autograd.grad((want * weight).sum(), (x, table))
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)


def test_buckets_and_what_is_kept():
    key = torch.tensor([2, 0, 2, 2, 1, 0])
    b = PositionBuckets.from_keys(key, 4)
    assert (b.entries, b.width) == (4, 3)
    slots = b.into(torch.arange(6.0)[:, None]).view(4, 3)
    assert slots[:, 0].tolist() == [1.0, 4.0, 0.0, 0.0] and slots[2].tolist() == [0.0, 2.0, 3.0]
    assert torch.equal(b.back(b.into(torch.arange(6.0)[:, None])).squeeze(1), torch.arange(6.0))
    x = torch.randn(50, 1, 8, requires_grad=True)
    table = torch.randn(7, 9, 8, requires_grad=True)
    index = (torch.randint(0, 7, (50,)),)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        table_einsum("tyc,tkc->tyk", x, table, index)
    assert sum(saved) == x.numel() + table.numel()
    with pytest.raises(ValueError, match="every index"):
        table_einsum("tyc,tkc->tyk", x, table, (index[0][:3],))
