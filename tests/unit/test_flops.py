"""The FLOP counter against hand counts (grouped and depthwise convolutions, CPU attention, addcmul, the sparse
depthwise gather), and the
visible-only ideal against hand counts of visible (query, key) pairs."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.mim.dense import SimMIMDense
from greenmim_convert.tools.bench import exact_attention_fraction
from greenmim_convert.tools.flops import (
    attention_pair_fraction,
    count_flops,
    split_counts,
    visible_fraction,
    visible_only_ideal,
)

aten = torch.ops.aten
N, H, W = 2, 10, 12


def conv_counts(conv: nn.Conv2d, x_grad: bool) -> Tuple[int, int, int]:
    """(forward, backward, forward-only) FLOPs our counter gives for one conv: convolution, convolution_backward."""
    x = torch.randn(N, conv.in_channels, H, W, requires_grad=x_grad)
    counts = count_flops(lambda: conv(x).sum().backward())
    with torch.no_grad():
        fwd_only = count_flops(lambda: conv(x))
    return counts[aten.convolution], counts[aten.convolution_backward], fwd_only[aten.convolution]


def hand_forward(conv: nn.Conv2d) -> int:
    """2 * N * Cout * Hout * Wout * (Cin / groups) * kh * kw."""
    kh, kw = conv.kernel_size
    hout = (H + 2 * conv.padding[0] - kh) // conv.stride[0] + 1
    wout = (W + 2 * conv.padding[1] - kw) // conv.stride[1] + 1
    return 2 * N * conv.out_channels * hout * wout * (conv.in_channels // conv.groups) * kh * kw


CONVS: Dict[str, nn.Conv2d] = {
    "dense 3x3": nn.Conv2d(8, 16, 3, padding=1),
    "grouped 3x3, 4 groups, stride 2": nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4),
    "depthwise 7x7": nn.Conv2d(32, 32, 7, padding=3, groups=32),
    "depthwise 3x3, channel multiplier 2": nn.Conv2d(16, 32, 3, padding=1, groups=16),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_forward_and_backward_match_hand_counts(name):
    conv = CONVS[name]
    fwd, bwd, fwd_only = conv_counts(conv, x_grad=True)
    assert fwd == fwd_only == hand_forward(conv)
    assert bwd == 2 * hand_forward(conv)  # grad input + grad weight, each a forward's multiply-adds
    fwd, bwd, _ = conv_counts(conv, x_grad=False)  # an image: the weight gradient only
    assert fwd == bwd == hand_forward(conv)


def test_depthwise_backward_is_twice_the_forward_not_channels_fold():
    """torch's own formula counts the weight gradient of a depthwise conv as a dense conv over all channels."""
    c = 64
    conv = nn.Conv2d(c, c, 7, padding=3, groups=c)
    fwd, bwd, _ = conv_counts(conv, x_grad=True)
    assert bwd == 2 * fwd
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(N, c, H, W, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        conv(x).sum().backward()
    torch_bwd = fc.get_flop_counts()["Global"][aten.convolution_backward]
    assert torch_bwd in (bwd, fwd + c * fwd)  # fixed upstream, or grad input + a C-fold grad weight


def test_transposed_grouped_conv():
    conv = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, groups=2)
    x = torch.randn(N, 8, H, W, requires_grad=True)
    counts = count_flops(lambda: conv(x).sum().backward())
    hand = 2 * N * 8 * H * W * (12 // 2) * 3 * 3  # every input element meets C_out / groups kernels
    assert counts[aten.convolution] == hand and counts[aten.convolution_backward] == 2 * hand


def test_cpu_fused_attention_is_counted():
    b, h, lq, lk, d, dv = 2, 3, 5, 7, 8, 8  # equal head dims: the CPU flash kernel (else the math path, bmm)
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k = torch.randn(b, h, lk, d, requires_grad=True)
    v = torch.randn(b, h, lk, dv, requires_grad=True)
    counts = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    fwd = 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv
    assert counts[aten._scaled_dot_product_flash_attention_for_cpu] == fwd
    assert counts[aten._scaled_dot_product_flash_attention_for_cpu_backward] == 2 * fwd


def test_addcmul_counts_its_gradients_at_the_forward():
    a = torch.randn(6, 5)
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, requires_grad=True)
    assert count_flops(lambda: torch.addcmul(a, x, w).sum().backward())[aten.addcmul] == 3 * 2 * 30
    with torch.no_grad():
        assert count_flops(lambda: torch.addcmul(a, x, w))[aten.addcmul] == 2 * 30
    i = torch.arange(6)
    assert count_flops(lambda: torch.addcmul(i, i, i)).get(aten.addcmul, 0) == 0  # index arithmetic


def test_depthwise_gather_counts_a_multiply_add_per_tap_and_gradient():
    """The sparse depthwise conv's gather path: 2 FLOPs per tap, output row and channel forward, the same per input
    row for each gradient asked for (the reference's addcmul count: input and weight gradients)."""
    from greenmim_convert.kernels.sparse_conv import sparse_conv2d
    from greenmim_convert.runtime.plan.sites import Sites

    sites = Sites.from_mask(random_mask(2, (3, 3), 0.5, generator=torch.Generator().manual_seed(0)), (6, 6), 1)
    t, c = sites.num_tokens, 4
    x = torch.randn(t, c, requires_grad=True)
    w = torch.randn(c, 1, 3, 3, requires_grad=True)
    run = lambda backend: sparse_conv2d(x, sites, sites, w, None, 1, 1, 1, c, backend=backend)  # noqa: E731
    ops = torch.ops.greenmim_kernels
    counts = count_flops(lambda: run("gather").sum().backward())
    assert counts[ops.depthwise_taps] == 2 * 9 * t * c and counts[ops.depthwise_taps_backward] == 2 * 2 * 9 * t * c
    assert sum(counts.values()) == count_flops(lambda: run("torch").sum().backward())[aten.addcmul]
    x.requires_grad_(False)
    assert count_flops(lambda: run("gather").sum().backward())[ops.depthwise_taps_backward] == 2 * 9 * t * c


def test_visible_only_ideal_scales_token_work_and_pairs():
    counts = {
        aten.mm: 1000,
        aten.convolution_backward: 600,
        aten.bmm: 400,
        aten._scaled_dot_product_flash_attention_for_cpu: 100,
    }
    assert split_counts(counts) == {"tokenwise": 1600, "pairs": 500}
    assert visible_only_ideal(counts, 0.25, 0.1) == 0.25 * 1600 + 0.1 * 500


# ------------------------------------------------------------------------------- attention pairs, by hand


def swin_needed_pairs(vis: torch.Tensor, window: int, shift: int) -> Tuple[int, int]:
    """(visible pairs, all pairs) of one Swin window attention, per head: the visibility map rolled by the shift,
    cut into windows, and inside a shifted window into timm's seam regions (slices :-window, -window:-shift,
    -shift:)."""
    b, g, _ = vis.shape
    if shift:
        vis = torch.roll(vis, (-shift, -shift), (1, 2))
    lab = torch.zeros(g, dtype=torch.long)
    if shift:
        lab[g - window : g - shift], lab[g - shift :] = 1, 2
    region = lab[:, None] * 3 + lab[None, :]
    nw = g // window
    wins = vis.reshape(b, nw, window, nw, window).transpose(2, 3).reshape(b, nw * nw, window * window)
    regs = region.reshape(nw, window, nw, window).transpose(1, 2).reshape(nw * nw, window * window)
    needed = sum(int((((regs == r)[None] & wins).sum(-1) ** 2).sum()) for r in range(9))
    return needed, b * nw * nw * (window * window) ** 2


def test_swin_pair_fraction_matches_a_hand_count_of_windows():
    """Tiny Swin at 128 px: grids 32, 16, 8, 4, windows of 4 (the last grid is one window, no shift), heads 1, 2, 4, 8
    (head dim 32 everywhere), two blocks a stage, the second shifted by 2."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        img_size=128,
    ).train()
    images = torch.randn(2, 3, 128, 128)
    visible = random_mask(2, (4, 4), 0.75, generator=torch.Generator().manual_seed(3))
    got = attention_pair_fraction(model, images, visible, lambda: model.forward_features(images), (128, 128))
    needed = total = 0
    for grid, heads in ((32, 1), (16, 2), (8, 4), (4, 8)):
        vis = visible.repeat_interleave(grid // 4, 1).repeat_interleave(grid // 4, 2)
        for shift in (0, 2) if grid > 4 else (0, 0):
            n, t = swin_needed_pairs(vis, 4, shift)
            needed, total = needed + heads * n, total + heads * t
    assert got == pytest.approx(needed / total, rel=1e-12)


def test_reduced_key_attention_pair_fraction_is_per_sample():
    """PVT v2 b0 at 224: every stage's keys lie on the 7x7 unit grid (spatial reduction 8, 4, 2, 1), so a sample with
    v of 49 units visible has (v/49 * N queries) x (v keys) of N x 49 pairs: the fraction is the mean of (v/49)^2."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0").eval()
    images = torch.randn(2, 3, 224, 224)
    gen = torch.Generator().manual_seed(1)
    visible = torch.stack([random_mask(1, (7, 7), ratio, generator=gen)[0] for ratio in (0.5, 0.8)])
    v = visible.flatten(1).sum(1).double() / 49
    assert v[0] != v[1]
    got = attention_pair_fraction(model, images, visible, lambda: model.forward_features(images), (224, 224))
    assert got == pytest.approx(float((v**2).mean()), rel=1e-12)


def test_swin_ideal_equals_the_converted_graphs_census():
    """Two independent routes to Swin's ideal agree: the dense model's FLOPs scaled by the probe, and the converted
    model's token-wise FLOPs plus its attention FLOPs times needed / computed logits."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        img_size=128,
    ).train()
    green = gmc.convert(model)
    images = torch.randn(2, 3, 128, 128)
    visible = random_mask(2, green.mask_grid, 0.75, generator=torch.Generator().manual_seed(4))
    dense = SimMIMDense(model, green.mask_unit)
    dense_counts = count_flops(lambda: dense(images, visible).pow(2).mean().backward())
    green_counts = split_counts(count_flops(lambda: green(images, visible).last.feats.pow(2).mean().backward()))
    rho = visible_fraction(visible)
    pairs = attention_pair_fraction(model, images, visible, lambda: model.forward_features(images), (128, 128))
    census = green_counts["tokenwise"] + green_counts["pairs"] * exact_attention_fraction(green, visible, images)
    assert green_counts["tokenwise"] == rho * split_counts(dense_counts)["tokenwise"]
    assert visible_only_ideal(dense_counts, rho, pairs) == pytest.approx(census, rel=1e-9)


def test_probe_leaves_no_trace_on_the_model():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    visible = random_mask(2, (2, 2), 0.5)
    rng = torch.get_rng_state()
    assert attention_pair_fraction(model, images, visible, lambda: model.forward_features(images), (64, 64)) == 0.5
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and not hasattr(v, "_greenmim_pair_tags"), k
