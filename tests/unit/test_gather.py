"""RowMap (partial permutations of rows) against plain PyTorch indexing: outputs and gradients, float64."""

from __future__ import annotations

import pytest
import torch

from greenmim_convert.runtime.gather import RowMap


def _random_partial_permutation(num_src: int, num_out: int, hits: int, gen: torch.Generator) -> torch.Tensor:
    """``(num_out,)`` source rows, distinct where valid, -1 on ``num_out - hits`` random rows."""
    index = torch.full((num_out,), -1, dtype=torch.long)
    where = torch.randperm(num_out, generator=gen)[:hits]
    index[where] = torch.randperm(num_src, generator=gen)[:hits]
    return index


def _plain(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The same gather with PyTorch's own indexing: a zero row appended for the -1 entries."""
    padded = torch.cat([src, src.new_zeros(1, *src.shape[1:])])
    return padded[torch.where(index < 0, src.shape[0], index)]


@pytest.mark.parametrize("num_src, num_out, hits", [(7, 7, 7), (9, 12, 9), (12, 9, 9), (10, 15, 6), (5, 4, 0)])
def test_matches_plain_indexing(num_src, num_out, hits, seed):
    gen = torch.Generator().manual_seed(seed)
    index = _random_partial_permutation(num_src, num_out, hits, gen)
    rows = RowMap.from_index(index, num_src)
    src = torch.randn(num_src, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(num_out, 3, 2, generator=gen, dtype=torch.float64)
    got = rows(src)
    want = _plain(src, index)
    assert torch.equal(got, want)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), src)
    (grad_want,) = torch.autograd.grad((want * weight).sum(), src)
    assert torch.equal(grad_got, grad_want)


def test_transpose_is_the_inverse_on_used_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    index = _random_partial_permutation(8, 11, 6, gen)
    rows = RowMap.from_index(index, 8)
    src = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    back = rows.t()(rows(src))
    used = torch.zeros(8, dtype=torch.bool)
    used[index[index >= 0]] = True
    assert torch.equal(back[used], src[used]) and not back[~used].any()
    assert (rows.num_src, rows.num_out) == (8, 11) and (rows.t().num_src, rows.t().num_out) == (11, 8)


def test_gradcheck_and_double_backward(seed):
    gen = torch.Generator().manual_seed(seed)
    index = _random_partial_permutation(6, 8, 5, gen)
    rows = RowMap.from_index(index, 6)
    src = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rows, (src,))
    assert torch.autograd.gradgradcheck(rows, (src,))


def test_empty_source_reads_zeros():
    rows = RowMap.from_index(torch.full((3,), -1, dtype=torch.long), 0)
    src = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    out = rows(src)
    assert out.shape == (3, 5) and not out.any()
    out.sum().backward()
    assert src.grad.shape == (0, 5)


def test_split_matches_split_of_the_gather(seed):
    gen = torch.Generator().manual_seed(seed)
    index = _random_partial_permutation(9, 14, 7, gen)
    rows = RowMap.from_index(index, 9)
    sizes = [5, 2, 7]
    src = torch.randn(9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in sizes]
    got = rows.split(src, sizes)
    want = _plain(src, index).split(sizes)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    loss = lambda blocks: sum((blk * w).sum() for blk, w in zip(blocks, weights))  # noqa: E731
    (grad_got,) = torch.autograd.grad(loss(got), src)
    (grad_want,) = torch.autograd.grad(loss(want), src)
    assert torch.equal(grad_got, grad_want)
    # a block left out of the loss gets a zero gradient
    (grad_part,) = torch.autograd.grad(rows.split(src, sizes)[1].sum(), src)
    (grad_part_want,) = torch.autograd.grad(_plain(src, index)[5:7].sum(), src)
    assert torch.equal(grad_part, grad_part_want)


@pytest.mark.parametrize("grid, shift", [((16, 16), (0, 0)), ((16, 16), (2, 2)), ((8, 8), (2, 2))])
def test_grouping_slot_rows_closed_form(grid, shift, seed):
    """``Grouping.slot_rows`` equals the map from its definition: lane l of slot s reads row index[s] * width + l."""
    from greenmim_convert.api.masking import random_mask
    from greenmim_convert.runtime import plan as planner

    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(3, (4, 4), 0.6, generator=gen)
    sites = planner.visible_sites(visible, grid, 4)
    grouping = planner.window_grouping(sites, (4, 4), shift, shift != (0, 0), "dp")
    for heads, parts in ((1, 1), (2, 3), (3, 1)):
        width = heads * parts
        lanes = torch.arange(width)[:, None]
        index = torch.cat(
            [
                torch.where(b.segment.reshape(1, -1) >= 0, b.index[None, :] * width + lanes, -1).reshape(-1)
                for b in grouping.buckets
            ]
        )
        got = grouping.slot_rows(heads, parts)
        want = RowMap.from_index(index, grouping.num_tokens * width)
        real = index >= 0
        assert torch.equal(got.index[real], want.index[real]) and torch.equal(got.inverse, want.inverse)
        assert got.unused is None and want.unused is None
        none = torch.zeros(0, dtype=torch.long)
        got_empty = none if got.empty is None else got.empty.sort().values
        assert torch.equal(got_empty, none if want.empty is None else want.empty)
