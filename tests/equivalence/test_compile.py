"""``torch.compile`` of converted models: compiled (inductor, CPU) equals eager, and new masks do not recompile."""

from __future__ import annotations

from typing import List

import pytest
import timm
import torch
from conftest import TINY_SWIN, make_swin, masks_with_unequal_counts, rel_err
from test_families import CASES, build
from torch._inductor.compile_fx import compile_fx

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.errors import UnsupportedOperationError
from greenmim_convert.runtime.program import through_custom_ops

MODELS = {
    "swin": lambda: make_swin(dtype=torch.float32, **TINY_SWIN),
    # global attention with keys on a conv-reduced grid, overlapping (sparse) patch-embedding convs
    "pvt_v2_b0": lambda: timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1)).eval(),
    # prefixed sites: a class token always visible, a position embedding read per visible token
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=64).eval(),
}
IMG = {"swin": None, "pvt_v2_b0": 128, "vit": 64}


class CountingInductor:
    """The inductor backend, counting the graphs it is handed (a recompile hands it one more)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return compile_fx(gm, example_inputs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MODELS[request.param]()
    green = gmc.convert(model, img_size=IMG[request.param])
    backend = CountingInductor()
    return green, torch.compile(green, backend=backend, dynamic=None), backend


def _outputs_and_grads(fn, green, images, visible, weights) -> List[torch.Tensor]:
    out = fn(images, visible)
    feats = [out.last.feats] + [s.feats for s in out.stages]
    loss = sum((f * w).sum() for f, w in zip(feats, weights))
    params = [p for p in green.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [f.detach() for f in feats] + [g for g in grads if g is not None]


def test_compiled_matches_eager(compiled, seed):
    green, compiled_green, _ = compiled
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, *green.img_size, generator=gen)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.75, gen)
    eager_out = green(images, visible)
    weights = [
        torch.randn(f.shape, generator=gen) for f in [eager_out.last.feats] + [s.feats for s in eager_out.stages]
    ]
    want = _outputs_and_grads(green, green, images, visible, weights)
    got = _outputs_and_grads(compiled_green, green, images, visible, weights)
    assert len(got) == len(want) > len(weights)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= 1e-4


def test_new_masks_do_not_recompile(compiled, seed):
    green, compiled_green, backend = compiled
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen)
    compiled_green(images, random_mask(2, green.mask_grid, 0.75, generator=gen))
    before = backend.graphs
    sizes = set()
    for ratio in (
        0.75,
        0.5,
        0.625,
        0.8125,
        0.6875,
    ):  # same-ratio masks change only slots; these change token counts too
        visible = random_mask(2, green.mask_grid, ratio, generator=gen)
        compiled_green(images, visible)
        sizes.add(tuple(t.shape[0] for t in green.program.plan(visible)))
    assert len(sizes) == 5
    assert backend.graphs - before <= 1


@pytest.mark.parametrize(
    "case", ["swin", "pvt_v2_b0", "vit_tiny_patch16_224", pytest.param("twins_pcpvt_small", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("training", [False, True])
def test_custom_op_path_matches_eager(case, training, seed):
    """The program with its runtime calls through the custom ops (what the compiled graph runs), eagerly in float64:
    the custom ops and their recomputing backward are exact."""
    model, green = build(case, seed)
    green.train(training)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(3, green.mask_grid, CASES[case].ratio, gen)
    eager_out = green(images, visible)
    weights = [
        torch.randn(f.shape, generator=gen, dtype=torch.float64)
        for f in [eager_out.last.feats] + [s.feats for s in eager_out.stages]
    ]
    torch.manual_seed(seed)
    want = _outputs_and_grads(green, green, images, visible, weights)
    torch.manual_seed(seed)
    with through_custom_ops():
        got = _outputs_and_grads(green, green, images, visible, weights)
    assert len(got) == len(want) > len(weights)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-10


def test_attention_dropout_is_refused():
    """The recomputing backward would draw other dropout numbers than the forward: compiling says so."""
    torch.manual_seed(0)
    model = make_swin(dtype=torch.float32, attn_drop_rate=0.1, **TINY_SWIN)
    green = gmc.convert(model).train()
    images = torch.randn(2, 3, *green.img_size)
    visible = random_mask(2, green.mask_grid, 0.75)
    with pytest.raises(UnsupportedOperationError, match="attention dropout"):
        green.program.prepare_compile(images, visible)
    green(images, visible)  # eagerly it runs


@pytest.mark.slow
def test_run_bench_compiled():
    """``bench --compile``: compiled step times of both sides, compile time apart, ratios against eager."""
    from test_bench import TinyNet

    from greenmim_convert.tools.bench import run_bench

    torch.manual_seed(0)
    model = TinyNet().train()
    green = gmc.convert(model, img_size=32)
    res = run_bench(model, green, batch_size=2, mask_ratio=0.5, steps=1, compile=True)
    c = res.compiled
    assert c is not None and c.dense_time_median_s > 0 and c.green_time_median_s > 0
    assert c.dense_compile_s > 0 and c.green_compile_s > 0
    assert c.speedup == pytest.approx(c.dense_time_median_s / c.green_time_median_s)
    assert c.green_vs_eager == pytest.approx(res.green.time_median_s / c.green_time_median_s)
    assert res.to_dict()["compiled"]["speedup"] == c.speedup
