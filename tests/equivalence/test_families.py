"""One equivalence harness for every family: all visible == timm at every stage, masked == oracle (float64,
gradients)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import pytest
import timm
import torch
from conftest import TINY_SWIN, check_against_reference, check_all_visible, masks_with_unequal_counts
from timm.models import mvitv2
from timm.models._builder import build_model_with_cfg
from timm.models.focalnet import _create_focalnet
from timm.models.gcvit import _create_gcvit
from timm.models.nest import _create_nest

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask


class Case(NamedTuple):
    """A family member: how to build it, its small configuration, the image size to convert at and the mask ratio."""

    builder: Callable[..., torch.nn.Module]
    name: str
    kwargs: Dict[str, Any]
    img_size: Optional[int] = None  # None: the size the model states
    ratio: float = 0.75
    zero_grads: Tuple[str, ...] = ()  # name endings of parameters whose gradient is analytically zero
    train_zero_grads: Tuple[str, ...] = ()  # more of them in training mode: biases a batch-statistics BatchNorm cancels


SMALL_DAVIT = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))
SMALL_FOCAL = dict(depths=(1, 1, 2, 1), embed_dim=32, layerscale_value=0.5)
FOCAL_IMG = 96  # small grids: float64 depthwise convolutions take PyTorch's slow per-group path on the CPU
SMALL_TWINS = dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))
SMALL_SWINV2 = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))
SMALL_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
SMALL_MAXVIT = dict(depths=(1, 1, 1, 1), embed_dim=(32, 64, 128, 256))
GCVIT_IMG = 96  # windows of 3 positions at the two finest grids; two dense-island levels each
CONVNEXT_IMG = 64  # float64 depthwise 7x7 convolutions take PyTorch's slow per-group path on the CPU

SMALL_MVIT = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1)
MVIT_IMG = 96  # grids 24, 12, 6, 3: keys pooled to 6x6 in the first stage


SMALL_VIT = dict(depth=2, drop_path_rate=0.1)
VIT_IMG = 64  # a 4x4 grid of 16-pixel patches


def _mvitv2(
    name: str, pretrained: bool = False, img_size: int = MVIT_IMG, drop_path_rate: float = 0.0, **cfg
) -> torch.nn.Module:
    """timm's MViTv2 ``name`` with fields of its configuration dataclass replaced (its builder takes no ``depths=``)."""
    return build_model_with_cfg(
        mvitv2.MultiScaleVit,
        name,
        pretrained,
        model_cfg=replace(mvitv2.model_cfgs[name], **cfg),
        img_size=img_size,
        drop_path_rate=drop_path_rate,
    )


CASES: Dict[str, Case] = {
    "swin": Case(timm.create_model, "swin_tiny_patch4_window7_224", TINY_SWIN),
    "swinv2_tiny_window8_256": Case(timm.create_model, "swinv2_tiny_window8_256", SMALL_SWINV2),
    "swinv2_small_window16_256": Case(timm.create_model, "swinv2_small_window16_256", SMALL_SWINV2),
    # the meta MLP's output bias adds one constant to every logit of a head: softmax cancels it
    "swinv2_cr_tiny_224": Case(
        timm.create_model, "swinv2_cr_tiny_224", SMALL_SWINV2, zero_grads=("meta_mlp.fc2.bias",)
    ),
    "davit_tiny": Case(timm.create_model, "davit_tiny", SMALL_DAVIT, 224, 0.6),
    "davit_base_fl": Case(timm.create_model, "davit_base_fl", SMALL_DAVIT, 384, 0.6),
    # the small-receptive-field model, and three focal levels with the post-norm options
    "focalnet_tiny_srf": Case(
        _create_focalnet, "focalnet_tiny_srf", dict(SMALL_FOCAL, focal_levels=(2, 2, 2, 2)), FOCAL_IMG, 0.6
    ),
    "focalnet_tiny_lrf": Case(
        _create_focalnet,
        "focalnet_tiny_lrf",
        dict(SMALL_FOCAL, focal_levels=(3, 3, 3, 3), use_post_norm_in_modulation=True, normalize_modulator=True),
        FOCAL_IMG,
        0.6,
    ),
    # depthwise 7x7 convs on visible positions; V2 adds GRN, a per-sample norm over visible positions
    "convnext_atto": Case(timm.create_model, "convnext_atto", SMALL_CONVNEXT, CONVNEXT_IMG),
    "convnextv2_atto": Case(timm.create_model, "convnextv2_atto", SMALL_CONVNEXT, CONVNEXT_IMG),
    # block and grid attention, MBConv with BatchNorm, strided depthwise convs and squeeze-excite; the
    # rw model's relative-position MLP ends in a bias added to every logit of a head (softmax cancels it),
    # the tf model pads TensorFlow-style (Conv2dSame) before its strided convs
    "maxvit_rmlp_pico_rw_256": Case(
        timm.create_model,
        "maxvit_rmlp_pico_rw_256",
        SMALL_MAXVIT,
        zero_grads=("rel_pos.mlp.fc2.bias",),
        train_zero_grads=("pre_norm.bias",),
    ),
    "maxvit_tiny_tf_224": Case(
        timm.create_model, "maxvit_tiny_tf_224", SMALL_MAXVIT, train_zero_grads=("pre_norm.bias", "stem.conv1.bias")
    ),
    # attention inside nested blocks; block aggregation by conv, LayerNorm and max pooling over visible positions
    "nest_tiny": Case(_create_nest, "nest_tiny", dict(embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 1, 2))),
    # the jx models pad TensorFlow-style: zeros before Conv2dSame, -inf before MaxPool2dSame
    "nest_tiny_jx": Case(
        _create_nest, "nest_tiny_jx", dict(embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 1, 1))
    ),
    # mask-unit attention with queries max-pooled to a coarser grid, global attention, unrolled token order;
    # checked against Hiera's own masked (MAE-style) forward
    "hiera_tiny_224": Case(timm.create_model, "hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 1, 2, 1))),
    # global queries: a per-sample map made densely from the whole stage map (MbConv blocks, max pools) and read by
    # every window at its in-window positions; 3x3 windows at stride 4 and 8 straddle the 32-pixel mask units
    "gcvit_xxtiny": Case(
        _create_gcvit,
        "gcvit_xxtiny",
        dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), img_size=GCVIT_IMG),
        GCVIT_IMG,
        0.6,
    ),
    # pooling attention: q, k, v pooled by depthwise convs with heads folded into the batch, keys on coarser
    # grids, decomposed relative positions that depend on the query, residual pooling, max-pooled shortcuts;
    # norm_k's bias adds q·b to every logit of a query (softmax cancels it). large: dims change in the MLP
    "mvitv2_tiny": Case(_mvitv2, "mvitv2_tiny", SMALL_MVIT, MVIT_IMG, zero_grads=("norm_k.bias",)),
    "mvitv2_large": Case(
        _mvitv2, "mvitv2_large", dict(SMALL_MVIT, embed_dim=12), MVIT_IMG, zero_grads=("norm_k.bias",)
    ),
    # a class token: always visible, a query and a key of every attention, kept out of the pooling convs, the
    # relative positions and the max-pooled shortcut; the stage outputs leave it out; drop-path scales it per sample
    "mvitv2_small_cls": Case(
        _mvitv2, "mvitv2_small_cls", dict(SMALL_MVIT, drop_path_rate=0.3), MVIT_IMG, zero_grads=("norm_k.bias",)
    ),
    # plain ViTs: prefix tokens (class, distillation, register) are always visible; absolute position embeddings
    # (over the prefix and grid tokens, or the grid only) and EVA's rotary embedding are read per visible token
    "vit_tiny_patch16_224": Case(timm.create_model, "vit_tiny_patch16_224", dict(SMALL_VIT, img_size=VIT_IMG), VIT_IMG),
    "deit_tiny_distilled_patch16_224": Case(
        timm.create_model, "deit_tiny_distilled_patch16_224", dict(SMALL_VIT, img_size=VIT_IMG), VIT_IMG
    ),
    "vit_little_patch16_reg4_gap_256": Case(
        timm.create_model,
        "vit_little_patch16_reg4_gap_256",
        dict(SMALL_VIT, embed_dim=64, num_heads=4, img_size=VIT_IMG),
        VIT_IMG,
    ),
    "eva02_tiny_patch14_224": Case(timm.create_model, "eva02_tiny_patch14_224", dict(SMALL_VIT, img_size=56), 56),
    "pvt_v2_b0": Case(timm.create_model, "pvt_v2_b0", {}),
    "pvt_v2_b2": Case(timm.create_model, "pvt_v2_b2", dict(depths=(1, 1, 1, 1))),
    "pvt_v2_b2_li": Case(timm.create_model, "pvt_v2_b2_li", dict(depths=(1, 1, 1, 1))),
    # depth 2: the PEG follows a stage's first block, so at depth 1 feature_info's module (blocks.i) ends before it
    "twins_pcpvt_small": Case(timm.create_model, "twins_pcpvt_small", dict(SMALL_TWINS, depths=(2, 2, 2, 2))),
    "twins_svt_small": Case(timm.create_model, "twins_svt_small", dict(SMALL_TWINS, depths=(2, 2, 2, 2))),
}


def build(case: str, seed: int, dtype: torch.dtype = torch.float64):
    """``(model, green)`` of a case with random weights, its 1-D parameters and relative-position tables randomised
    too."""
    c = CASES[case]
    torch.manual_seed(seed)
    model = c.builder(c.name, pretrained=False, **c.kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or n.endswith(("rel_pos_h", "rel_pos_w", "_token", "pos_embed")):
                p.normal_(0.0, 0.5)
            elif p.dim() == 1 and n.endswith("bias"):
                p.normal_(
                    0.0, 0.1
                )  # larger biases would dominate q and k: near-uniform attention, ill-conditioned grads
            elif p.dim() == 1 and not n.endswith("logit_scale"):  # norm weights, layer scales; not temperatures
                p.normal_(1.0, 0.5)
        for n, b in model.named_buffers():  # BatchNorm statistics start at 0 and 1
            if n.endswith("running_mean"):
                b.normal_(0.0, 0.2)
            elif n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    return model, gmc.convert(model, img_size=c.img_size)


class Built(NamedTuple):
    """A built case and the seed it was built from."""

    case: str
    seed: int
    model: torch.nn.Module
    green: Any


# the smallest case of every family: make test-fast checks these (masked, against the oracle)
SMALLEST = {
    "swin",
    "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224",
    "davit_tiny",
    "focalnet_tiny_srf",
    "convnext_atto",
    "convnextv2_atto",
    "maxvit_rmlp_pico_rw_256",
    "nest_tiny",
    "hiera_tiny_224",
    "gcvit_xxtiny",
    "mvitv2_tiny",
    "vit_tiny_patch16_224",
    "eva02_tiny_patch14_224",
    "pvt_v2_b0",
    "twins_pcpvt_small",
    "twins_svt_small",
}


@pytest.fixture(
    scope="module", params=[pytest.param(c, marks=pytest.mark.smallest) if c in SMALLEST else c for c in sorted(CASES)]
)
def family(request) -> Built:
    """One case built once for both checks, from a fresh seed (shown by pytest's -l)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return Built(request.param, seed, *build(request.param, seed))


def test_all_visible_matches_timm(family):
    case, seed, model, green = family
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    check_all_visible(model, green, images)


@pytest.mark.fast
def test_masked_matches_reference(family):
    case, seed, model, green = family
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(3, green.mask_grid, CASES[case].ratio, gen)
    assert len(set(visible.flatten(1).sum(1).tolist())) > 1
    zero = [n for n, _ in model.named_parameters() if n.endswith(CASES[case].zero_grads)]
    assert bool(zero) == bool(CASES[case].zero_grads)
    check_against_reference(model, green, images, visible, gen=gen, zero_grads=zero)


def test_smallest_cases_exist():
    assert SMALLEST <= set(CASES)


def test_masked_equal_counts_matches_reference(family):
    """Every sample with the same number of visible units (as ``random_mask`` draws them): per-sample padding
    is then a reshape of the packed tokens, not a copy."""
    case, seed, model, green = family
    gen = torch.Generator().manual_seed(seed + 3)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = random_mask(2, green.mask_grid, CASES[case].ratio, generator=gen)
    assert len(set(visible.flatten(1).sum(1).tolist())) == 1
    zero = [n for n, _ in model.named_parameters() if n.endswith(CASES[case].zero_grads)]
    check_against_reference(model, green, images, visible, gen=gen, zero_grads=zero)


def test_masked_train_mode_matches_reference(family):
    """Training mode: drop-path per sample (same draws from the same seed), BatchNorm statistics over visible
    positions with the running statistics updated alike."""
    case, seed, model, green = family
    gen = torch.Generator().manual_seed(seed + 2)
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(3, green.mask_grid, CASES[case].ratio, gen)
    ends = CASES[case].zero_grads + CASES[case].train_zero_grads
    zero = [n for n, _ in model.named_parameters() if n.endswith(ends)]
    assert bool(zero) == bool(ends)
    green.train()
    assert model.training
    try:
        check_against_reference(model, green, images, visible, gen=gen, zero_grads=zero, rng_seed=seed)
    finally:
        green.eval()
