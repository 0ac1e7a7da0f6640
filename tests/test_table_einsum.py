"""A per-token einsum with a gathered table equals einsum on the gathered table, without keeping that table."""
from __future__ import annotations

import pytest
import torch

from greenmim_convert import table_einsum as te


@pytest.mark.parametrize("chunk_bytes", [64, te.CHUNK_BYTES])
def test_matches_einsum_of_gathered_table(monkeypatch, chunk_bytes):
    monkeypatch.setattr(te, "CHUNK_BYTES", chunk_bytes)  # 64 bytes: many chunks of one token or two
    gen = torch.Generator().manual_seed(5)
    tokens, heads, chans, rows, cols, keys = 37, 2, 5, 6, 4, 3
    x = torch.randn(tokens, heads, chans, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(rows, cols, keys, chans, generator=gen, dtype=torch.float64, requires_grad=True)
    index = (torch.randint(0, rows, (tokens,), generator=gen), torch.randint(0, cols, (tokens,), generator=gen))
    weight = torch.randn(tokens, heads, keys, generator=gen, dtype=torch.float64)
    got = te.table_einsum("tyc,tkc->tyk", x, table, index)
    got_grads = torch.autograd.grad((got * weight).sum(), (x, table))
    want = torch.einsum("tyc,tkc->tyk", x, table[index])
    want_grads = torch.autograd.grad((want * weight).sum(), (x, table))
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)


def test_keeps_only_its_inputs():
    x = torch.randn(50, 1, 8, requires_grad=True)
    table = torch.randn(7, 9, 8, requires_grad=True)
    index = (torch.randint(0, 7, (50,)),)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        te.table_einsum("tyc,tkc->tyk", x, table, index)
    assert sum(saved) == x.numel() + table.numel() + 50
    with pytest.raises(ValueError, match="every index"):
        te.table_einsum("tyc,tkc->tyk", x, table, (index[0][:3],))
