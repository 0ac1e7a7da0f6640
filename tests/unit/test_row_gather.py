"""The row-gather pass: image-independent ``table[index]`` becomes ``index_select`` with the same values and
gradients."""

from __future__ import annotations

import torch
import torch.nn as nn

from greenmim_convert.passes import RowGatherPass

aten = torch.ops.aten


class Tables(nn.Module):
    """Two bias tables read through constant indices (one with entries counted from the end), and an image gather."""

    def __init__(self):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(7, 3, dtype=torch.float64))
        self.cols = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
        self.register_buffer("pair_index", torch.randint(0, 7, (4, 4)))
        self.register_buffer("col_index", torch.tensor([[0, -1], [2, -5]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.rows[self.pair_index.view(-1)].view(4, 4, 3).permute(2, 0, 1)  # as a relative-position bias
        cols = self.cols[:, self.col_index]  # (3, 2, 2)
        picked = x[:, self.col_index[0].abs()]  # an image gather: not rewritten
        return (x * bias.sum()).sum((1, 2, 3)) + cols.sum() * picked.sum((1, 2, 3))


def _run(gm, x):
    for p in gm.parameters():
        p.grad = None
    out = gm(x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in gm.parameters()]


def test_row_gather_keeps_values_and_gradients():
    torch.manual_seed(0)
    module = Tables()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gm = torch.export.export(module, (x,), strict=False).module()
    before = _run(gm, x)
    result = RowGatherPass()(gm)
    assert result.modified
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.index.Tensor]
    assert len(left) == 1, "the gather of image values stays"
    selects = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.index_select.default]
    assert [n.args[1] for n in selects] == [0, 1]
    gm.recompile()
    after = _run(gm, x)
    torch.testing.assert_close(after[0], before[0], rtol=1e-12, atol=0)
    for a, b in zip(after[1], before[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_negative_entries_are_wrapped_only_when_needed():
    """An index computed from buffers whose entries are all non-negative (here a view of one) is read as it is; one
    with negative entries is wrapped into range first."""
    torch.manual_seed(1)
    module = Tables()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    gm = torch.export.export(module, (x,), strict=False).module()
    RowGatherPass()(gm)
    wraps = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.where.self]
    assert len(wraps) == 1


def test_bias_gathers_are_not_recomputed(tiny_swin64):
    """Swin's bias-table gathers become index_select and stay in the graph: their intermediates are no larger than
    their outputs, so the recompute pass leaves them (a wrap of an index known to be in range would tip it)."""
    _, green = tiny_swin64
    counts = {r.name: r.counts for r in green.report.passes}
    assert counts["row-gather"] == {"table[index] -> index_select": 8}
    assert counts["recompute"] == {}
