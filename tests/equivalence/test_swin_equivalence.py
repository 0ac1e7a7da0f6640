"""Converted Swin == timm (all visible) and == the dense masked reference (masked), outputs and gradients."""

from __future__ import annotations

import torch
from conftest import SWIN_T, TINY_SWIN, make_swin, masks_with_unequal_counts, rel_err

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.oracle.reference import dense_masked_reference


def _stages_nhwc(out):
    return [t.to_dense() for t in out.stages]


def _check_all_visible(model, green, images, tol):
    visible = torch.ones(images.shape[0], *green.mask_grid, dtype=torch.bool)
    out = green(images, visible)
    dense = model.forward_features(images)
    assert rel_err(out.last.to_dense().permute(0, 2, 3, 1), dense) <= tol
    _, inter = model.forward_intermediates(images)
    assert len(inter) == len(out.stages)
    for got, want in zip(_stages_nhwc(out), inter):
        assert got.shape == want.shape
        assert rel_err(got, want) <= tol


def test_all_visible_tiny_float64(tiny_swin64, seed):
    model, green = tiny_swin64
    gen = torch.Generator().manual_seed(seed)
    _check_all_visible(model, green, torch.randn(3, 3, 128, 128, generator=gen, dtype=torch.float64), 1e-10)


def test_all_visible_swin_tiny_float32(seed):
    torch.manual_seed(seed)
    model = make_swin(SWIN_T, torch.float32)
    green = gmc.convert(model)
    assert green.mask_grid == (7, 7)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _check_all_visible(model, green, images, 1e-5)


def _check_masked(model, green, images, visible, tol):
    out = green(images, visible)
    ref = dense_masked_reference(model, images, visible)
    for got, want in zip(out.stages + [out.last], ref.stages + [ref.last]):
        assert torch.equal(got.batch, want.batch) and torch.equal(got.coords, want.coords)
        assert torch.isfinite(got.feats).all()
        if want.feats.numel():
            assert rel_err(got.feats, want.feats) <= tol
    return out, ref


def test_masked_per_sample_float64(tiny_swin64, seed):
    model, green = tiny_swin64
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(4, green.mask_grid, 0.75, gen)
    counts = visible.flatten(1).sum(1)
    assert len(set(counts.tolist())) > 1
    images = torch.randn(4, 3, 128, 128, generator=gen, dtype=torch.float64)
    _check_masked(model, green, images, visible, 1e-10)


def test_masked_swin_tiny_float64(seed):
    torch.manual_seed(seed)
    model = make_swin(SWIN_T, torch.float64)
    green = gmc.convert(model)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.75, gen)
    images = torch.randn(3, 3, 224, 224, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _check_masked(model, green, images, visible, 1e-10)


def test_masked_swin_base_window12_384_batch1(seed):
    torch.manual_seed(seed)
    model = make_swin("swin_base_patch4_window12_384", torch.float64)
    green = gmc.convert(model)
    assert green.mask_grid == (12, 12)
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(1, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(1, 3, 384, 384, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _check_masked(model, green, images, visible, 1e-10)


def test_gradients_match_reference_float64(tiny_swin64, seed):
    model, green = tiny_swin64
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.75, gen)
    images = torch.randn(3, 3, 128, 128, generator=gen, dtype=torch.float64)
    weights = None

    def grads(run):
        nonlocal weights
        model.zero_grad(set_to_none=True)
        x = images.clone().requires_grad_(True)
        out = run(x)
        if weights is None:
            weights = [torch.randn(t.feats.shape, generator=gen, dtype=torch.float64) for t in out.stages + [out.last]]
        loss = sum((w * t.feats).sum() for w, t in zip(weights, out.stages + [out.last]))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, x.grad

    ref_grads, ref_x = grads(lambda x: dense_masked_reference(model, x, visible))
    got_grads, got_x = grads(lambda x: green(x, visible))
    backbone = [n for n, _ in model.named_parameters() if not n.startswith("head.")]
    assert set(got_grads) == set(ref_grads) == set(backbone)
    for name, g in ref_grads.items():
        assert rel_err(got_grads[name], g) <= 1e-10, name
    vis_px = visible.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand_as(ref_x)
    assert rel_err(got_x[vis_px], ref_x[vis_px]) <= 1e-10
    assert torch.all(got_x[~vis_px] == 0)


def test_masked_pixels_do_not_matter(tiny_swin64, seed):
    model, green = tiny_swin64
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(2, green.mask_grid, 0.75, generator=gen)
    images = torch.randn(2, 3, 128, 128, generator=gen, dtype=torch.float64)
    hidden = ~visible.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand_as(images)
    other = images.clone()
    other[hidden] = torch.randn(int(hidden.sum()), generator=gen, dtype=torch.float64) * 100
    a, b = green(images, visible), green(other, visible)
    for x, y in zip(a.stages + [a.last], b.stages + [b.last]):
        assert torch.equal(x.feats, y.feats)


def test_training_mode_drop_path_matches_reference(seed):
    torch.manual_seed(seed)
    model = make_swin(dtype=torch.float64, drop_path_rate=0.5, **TINY_SWIN).train()
    green = gmc.convert(model)
    assert green.training
    gen = torch.Generator().manual_seed(seed)
    visible = random_mask(4, green.mask_grid, 0.5, generator=gen)
    images = torch.randn(4, 3, 128, 128, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed + 1)
    ref = dense_masked_reference(model, images, visible)
    torch.manual_seed(seed + 1)
    out = green(images, visible)
    assert rel_err(out.last.feats, ref.last.feats) <= 1e-10
    torch.manual_seed(seed + 2)
    other = green(images, visible)
    assert rel_err(other.last.feats, out.last.feats) > 1e-6  # drop-path really is active


def test_state_dict_is_timms(tiny_swin64):
    model, green = tiny_swin64
    ours, theirs = green.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].data_ptr() == theirs[k].data_ptr()
    params = dict(green.named_parameters())
    assert all(params[n] is p for n, p in model.named_parameters())


def test_graph_code_shows_sparse_ops(tiny_swin64):
    _, green = tiny_swin64
    program = green.program
    plan, compute = program.plan_gm.code, program.compute_gm.code
    calls = [c.fn.__name__ for c in program.calls]
    for op in ("patch_embed", "window_attention", "space_to_depth", "sample_attention"):
        assert op in calls or op in compute
    for dense in ("torch.roll", ".view(", ".permute(", "attn_mask"):
        assert dense not in compute
    assert plan.count("digit_grouping(") == 6  # once per (stage, shift) of stages 0-2, shared by the blocks
    assert "digit_grouping(" not in compute and "visible_sites(" not in compute
    assert calls.count("window_attention") == 6
    assert calls.count("sample_attention") == 2  # the last stage's 4x4 grid is one window 4: whole-sample attention
    assert "window_attention" in program.code
    counts = {p.name: p.counts for p in green.report.passes}["attention"]
    assert counts["block mask -> window regions"] == 3  # one shifted seam mask per windowed stage


def test_forward_head_mean_over_visible(tiny_swin64, seed):
    model, green = tiny_swin64
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 128, 128, generator=gen, dtype=torch.float64)
    full = torch.ones(2, *green.mask_grid, dtype=torch.bool)
    assert rel_err(green.forward_head(green(images, full)), model.forward_head(model.forward_features(images))) <= 1e-10
    visible = random_mask(2, green.mask_grid, 0.75, generator=gen)
    ref = dense_masked_reference(model, images, visible)
    pooled = torch.stack([ref.last.feats[ref.last.batch == b].mean(0) for b in range(2)])
    assert rel_err(green.forward_head(green(images, visible)), model.head.fc(pooled)) <= 1e-10


def test_grouping_strategies_give_identical_outputs(seed):
    torch.manual_seed(seed)
    model = make_swin(dtype=torch.float64, **TINY_SWIN)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(4, (4, 4), 0.75, gen)
    images = torch.randn(4, 3, 128, 128, generator=gen, dtype=torch.float64)
    outs = {s: gmc.convert(model, grouping=s)(images, visible) for s in ("dp", "max", "window")}
    ref = dense_masked_reference(model, images, visible)
    for s, out in outs.items():
        for got, want in zip(out.stages + [out.last], ref.stages + [ref.last]):
            assert rel_err(got.feats, want.feats) <= 1e-10, s
        assert rel_err(out.last.feats, outs["window"].last.feats) <= 1e-12
