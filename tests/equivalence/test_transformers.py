"""transformers backbones passed to ``convert`` as they are (drop path 0.1, random weights, float64).

Every configuration of ``hf_models.CONFIGS`` and backbone is converted once per module (``converted``) and
checked all-visible against its own output in eval and in training mode (the same seed: the same drop-path
draws), and masked (per-sample masks) against the transformers oracle (``greenmim_convert/reference_hf.py``),
which shares no code with the compiler: every stage and the final features, and the parameter gradients of a
random weighted loss on them, in eval mode and in training mode (drop path drawn from one seed on both sides,
BatchNorm statistics over visible positions). A configuration that does not convert would join a refusal test
naming its operation, module and source line.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

import pytest
import torch
import torch.nn as nn
from conftest import check_against_reference, masks_with_unequal_counts, rel_err

import greenmim_convert as gmc
from greenmim_convert.oracle.verify import reference_kwargs

pytest.importorskip("transformers")
from hf_models import BACKBONES as HF_BACKBONES  # noqa: E402
from hf_models import CONFIGS, IMG, build_hf, clear_caches, image_size

pytestmark = pytest.mark.usefixtures("one_thread")

# maskformer-swin pads its last grid to a window; maskformer-swin-window3 pads every grid, shifted windows of the
# padded grids included; vitdet pads its 4x4 grid to windows of 3, with decomposed relative positions in them;
# sam2-padded-windows pads its third stage's 4x4 grid to windows of 3; sam2-pooled-padding pools queries of padded
# windows onto a padded coarser grid (SAM 2's default geometry); levit-224 subsamples a 7x7 grid to 4x4
CONVERTS = [
    "swin",
    "swinv2",
    "donut-swin",
    "maskformer-swin",
    "maskformer-swin-window3",
    "focalnet",
    "convnext",
    "convnextv2",
    "pvt",
    "pvt_v2",
    "segformer",
    "hiera",
    "poolformer",
    "resnet",
    "swiftformer",
    "sam2_hiera_det_model",
    "sam2-padded-windows",
    "sam2-pooled-padding",
    "cvt",
    "vitdet",
    "levit",
    "levit-224",
    "mobilevit",
]
# hiera's backbone runs its encoder on raster tokens it never unrolled: its groups span the image, which is its
# mask unit (whole samples visible or hidden; see compiler/whole_sample.py)
BACKBONES = [
    "swin",
    "swinv2",
    "maskformer-swin",
    "focalnet",
    "convnext",
    "convnextv2",
    "pvt_v2",
    "hiera",
    "resnet",
    "vitdet",
]
# a gradient is compared relative to its own size or to this fraction of the largest, whichever is larger: where
# the oracle's is rounding noise (analytically zero: a key bias shifts every logit of a softmax row, a conv bias
# precedes training-mode BatchNorm, PoolFormer reads its norm's bias as pool(x) - x) the converted model's must be
# noise of that size, and a small gradient formed by cancellation (q and k of MobileViT's nearly uniform
# attention, ~1e-8 of the largest) carries the rounding of the terms that cancel
GRAD_FLOOR = 1e-4  # 10 times the largest such noise seen (MobileViT's conv bias before training BatchNorm)

Case = Tuple[str, bool]
CASES = [(t, False) for t in CONVERTS] + [(t, True) for t in BACKBONES]
WHOLE_SAMPLE = {("hiera", True)}  # its groups span the image: converted with the image as its unit
IDS = [f"{t}-{'backbone' if b else 'model'}" for t, b in CASES]


@pytest.fixture(scope="module")
def converted() -> Iterator[Callable[[Case], Tuple[nn.Module, gmc.GreenModel]]]:
    """``get(case)``: the case's model (eval mode) and its conversion, built once per module."""
    cache: Dict[Case, Tuple[nn.Module, gmc.GreenModel]] = {}

    def get(case: Case) -> Tuple[nn.Module, gmc.GreenModel]:
        if case not in cache:
            model_type, backbone = case
            torch.manual_seed(sum(map(ord, model_type)) + backbone)
            model = build_hf(model_type, backbone=backbone)
            size = image_size(model_type)
            cache[case] = model, gmc.convert(model, img_size=size, mask_unit=size if case in WHOLE_SAMPLE else None)
        model, green = cache[case]
        clear_caches(model).eval()
        green.eval()
        return model, green

    yield get
    cache.clear()


def _last(out) -> torch.Tensor:
    """The final features of a transformers output: NCHW, NHWC or (B, N, C)."""
    if isinstance(out, torch.Tensor):
        return out
    if "feature_maps" in out:
        return out["feature_maps"][-1]
    return out["last_hidden_state"]


def _dense(tokens: gmc.VisibleTokens, like: torch.Tensor) -> torch.Tensor:
    """The converted model's final tokens as a dense map in the layout of ``like``."""
    dense = tokens.to_dense()
    if like.dim() == 3:
        return dense.flatten(2).transpose(1, 2)
    if like.shape != dense.shape:  # a channels-last map: SAM 2's (B, H, W, C)
        return dense.permute(0, 2, 3, 1)
    return dense


def _inputs(green: gmc.GreenModel, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Three random images and per-sample masks: one sample half visible, one all visible, one a single unit."""
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.5, gen)
    if green.mask_grid == (1, 1):  # the image is the unit: a hidden sample instead of a half visible one
        visible[0] = False
    return torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64), visible, gen


def _cell_visibility(visible: torch.Tensor, grid: Tuple[int, int], stride: int, unit: int) -> torch.Tensor:
    """``(B, H, W)`` visibility of a grid's cells: that of the mask unit holding a cell's first pixel (a cell of a
    grid that the step of its pick does not tile, LeViT's 4x4 of 7x7, is visible when the cell it picks is)."""
    rows, cols = (torch.arange(n) * stride // unit for n in grid)
    return visible[:, rows][:, :, cols]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_converts_and_matches_all_visible(case, converted, seed):
    """Every unit visible: the final features are the model's own, in eval and in training mode (same seed)."""
    model, green = converted(case)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *green.img_size, generator=gen, dtype=torch.float64)
    visible = torch.ones(2, *green.mask_grid, dtype=torch.bool)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for train in (False, True):
            model.train(train)
            green.train(train)
            torch.manual_seed(seed)
            want = _last(model(images))
            torch.manual_seed(seed)
            got = _dense(green(images, visible).last, want)
            want = want[:, want.shape[1] - got.shape[1] :] if want.dim() == 3 else want  # past a class token (PVT)
            assert rel_err(got, want) <= 1e-10, "train" if train else "eval"
    finally:
        with torch.no_grad():  # both training forwards moved the BatchNorm statistics
            for k, v in model.state_dict().items():
                v.copy_(state[k])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_masked_matches_oracle(case, converted, seed):
    """Per-sample masks, eval mode: every stage, the final features and the parameter gradients match the oracle."""
    model, green = converted(case)
    images, visible, gen = _inputs(green, seed)
    out = check_against_reference(
        model, green, images, visible, gen=gen, grad_floor=GRAD_FLOOR, **reference_kwargs(model, green)
    )
    grids = [t.grid for t in out.stages]
    assert grids == sorted(grids, reverse=True) and grids[-1] == out.last.grid
    if case[1]:
        assert len(grids) == len(model.config.out_features)  # a backbone's stages: its feature maps
    else:
        assert len(set(grids)) == len(grids)  # a model's: one per feature grid
    size = green.img_size
    for t in out.stages + [out.last]:  # no padded grid: a cell per stride of the image, the last one partly in it
        assert all(g == -(-n // t.stride) for g, n in zip(t.grid, size))
    want = _cell_visibility(visible, out.last.grid, out.last.stride, green.mask_unit).sum((1, 2))
    assert out.last.counts().tolist() == want.tolist()  # visible positions only


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_masked_training_matches_oracle(case, converted, seed):
    """Per-sample masks, training mode (drop path 0.1 drawn from one seed on both sides, BatchNorm batch
    statistics over visible positions): stages, final features, gradients and running statistics match."""
    model, green = converted(case)
    images, visible, gen = _inputs(green, seed)
    model.train()
    green.train()
    check_against_reference(
        model, green, images, visible, gen=gen, rng_seed=seed, grad_floor=GRAD_FLOOR, **reference_kwargs(model, green)
    )


def test_every_config_is_checked():
    """Each tiny configuration and backbone is a case of the harness above."""
    assert set(CONFIGS) == set(CONVERTS)
    assert set(HF_BACKBONES) == set(BACKBONES)


def test_hiera_backbone_converts_with_the_image_as_unit():
    """HieraBackbone's query pooling maxes raster rows a quarter of the grid apart: without a mask unit it is refused
    with the op and the way out; with the image as its unit it converts; a finer unit is refused naming that op."""
    model = build_hf("hiera", backbone=True)
    with pytest.raises(gmc.UnsupportedOperationError, match=rf"amax.*HieraLayer.*rows 4 apart.*mask_unit={IMG}"):
        gmc.convert(model, img_size=IMG)
    green = gmc.convert(model, img_size=IMG, mask_unit=IMG)
    assert green.mask_grid == (1, 1) and green.report.min_mask_unit == IMG
    with pytest.raises(gmc.MaskUnitError, match=r"amax.*HieraLayer.*rows 4 apart"):
        gmc.convert(model, img_size=IMG, mask_unit=IMG // 2)
