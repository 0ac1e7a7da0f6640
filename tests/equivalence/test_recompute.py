"""Image-independent subgraphs with large intermediates are recomputed in backward, not saved."""

from __future__ import annotations

import timm
import torch

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.runtime import ops
from greenmim_convert.tools.bench import SavedTensorCounter

SMALL_SWINV2_CR = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 2, 2, 4), img_size=128, window_size=4)


def _saved_census(green, images, visible):
    counter = SavedTensorCounter(exclude=list(green.parameters()))
    with counter():
        loss = green(images, visible).last.feats.pow(2).sum()
    census = counter.census(loss)
    loss.backward()
    return census


def _recompute_calls(green) -> list:
    """Where the compute graph runs ``ops.recompute``: its nodes, and its runtime calls (a subgraph reading plan
    objects, such as a dense island's scatter)."""
    program = green.program
    return [
        program.call_of(n) or n
        for n in program.compute_gm.graph.nodes
        if getattr(program.call_of(n), "fn", None) is ops.recompute
        or (n.op == "call_function" and n.target is ops.recompute)
    ]


def _inline(green, recomputes: list) -> None:
    """Run the recomputed subgraphs directly: their intermediates saved as usual."""
    for r in recomputes:
        if isinstance(r, torch.fx.Node):
            r.target = lambda sub, *args: sub(*args)
        else:
            r.fn = lambda sub, *args: sub(*args)
    green.program.compute_gm.recompile()


def test_position_mlp_is_recomputed_and_keeps_its_gradients():
    """Swin V2 CR's position MLP (pairs x hidden units, with dropout in training) reads parameters and a buffer only:
    each block's MLP becomes one recomputed subgraph, its ReLU and dropout save nothing, and the gradients of its
    weights equal those of the same graph with the subgraph inlined, dropout draws included."""
    torch.manual_seed(0)
    model = timm.create_model("swinv2_cr_tiny_224", pretrained=False, **SMALL_SWINV2_CR).train()
    green = gmc.convert(model).train()
    calls = _recompute_calls(green)
    counts = {r.name: r.counts for r in green.report.passes}
    assert len(calls) == 4 and counts["recompute"] == {"subgraph recomputed in backward": 4}
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 128, 128, generator=gen)
    visible = random_mask(2, green.mask_grid, 0.5, generator=gen)

    torch.manual_seed(7)
    census = _saved_census(green, images, visible)
    assert "ReluBackward0" not in census
    recomputed = {n: p.grad.clone() for n, p in model.named_parameters() if "meta_mlp" in n}
    model.zero_grad()
    _inline(green, calls)  # the same subgraph, run directly, its intermediates saved as usual
    torch.manual_seed(7)
    assert "ReluBackward0" in _saved_census(green, images, visible)
    for name, p in model.named_parameters():
        if "meta_mlp" in name:
            assert p.grad is not None and torch.equal(p.grad, recomputed[name]), name


def test_dense_island_is_recomputed_and_keeps_its_gradients():
    """GC ViT's global-query generator runs densely on a scattered map: outlined with its scatter, it keeps only the
    visible tokens for backward (fewer saved bytes than inlined), with the same outputs and gradients."""
    from timm.models.gcvit import _create_gcvit

    torch.manual_seed(0)
    model = _create_gcvit("gcvit_xxtiny", embed_dim=32, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8), img_size=96)
    green = gmc.convert(model.eval(), img_size=96)
    counts = {r.name: r.counts for r in green.report.passes}
    islands = counts["recompute"]["dense island recomputed in backward"]
    assert islands == counts["dense-island"]["token map -> dense map"] >= 2
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 96, 96, generator=gen)
    visible = random_mask(2, green.mask_grid, 0.6, generator=gen)
    recomputed = sum(_saved_census(green, images, visible).values())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _inline(green, _recompute_calls(green))
    inlined = sum(_saved_census(green, images, visible).values())
    assert recomputed < 0.9 * inlined
    assert grads and all(
        torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-6) for n, p in model.named_parameters() if n in grads
    )


class _IndexedMLP(torch.nn.Module):
    """A position MLP whose subgraph's first input is an integer buffer (the index into a coordinate table)."""

    def __init__(self):
        super().__init__()
        self.index = torch.nn.Parameter(torch.randint(0, 5, (40,)), requires_grad=False)  # traced as get_attr
        self.coords = torch.nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
        self.w1 = torch.nn.Parameter(torch.randn(64, 2, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(1, 64, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aten = torch.ops.aten
        rows = aten.remainder.Scalar(self.index, 5)
        hidden = aten.relu.default(aten.linear.default(aten.index.Tensor(self.coords, [rows]), self.w1))
        bias = aten.linear.default(aten.dropout.default(hidden, 0.25, True), self.w2)
        return x + aten.view.default(bias, [40])


def test_dropout_noise_takes_a_floating_input_as_its_dtype():
    """The dropout's noise is drawn in the dtype of a floating input of the subgraph, not of whichever input comes
    first (here an integer index buffer), and equals the inlined dropout's draw."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from greenmim_convert.passes import RecomputePass

    module = _IndexedMLP()
    x = torch.randn(40, dtype=torch.float64)
    gm = torch.fx.symbolic_trace(module)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    torch.manual_seed(5)
    want = gm(x)
    RecomputePass().call(gm)
    gm.recompile()
    call = next(n for n in gm.graph.nodes if n.target is ops.recompute)
    assert call.args[1].target == "index"  # the subgraph's first input is the integer buffer
    noise = next(n for n in gm.graph.nodes if n.target is ops.dropout_noise)
    assert noise.args[0].target == "coords"
    torch.manual_seed(5)
    assert torch.equal(gm(x), want)
