"""transformers backbones passed to ``convert`` as they are (drop path 0.1, random weights, float64).

Each model is checked all-visible against its own output in eval mode and in training mode (the same seed: the
same drop-path draws), and masked (per-sample masks) against the transformers oracle
(``greenmim_convert/reference_hf.py``), which shares no code with the compiler, in eval mode and in training mode
(BatchNorm statistics over the visible positions, the same drop-path draws): the final features and the parameter
gradients of a random weighting of them. Every configuration of ``hf_models.CONFIGS`` converts; one that does not
yet would join a refusal test naming its operation, module and source line.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch

import greenmim_convert as gmc
from greenmim_convert.masking import random_mask
from greenmim_convert.reference import dense_masked_reference

from conftest import rel_err

pytest.importorskip("transformers")
from hf_models import CONFIGS, IMG, build_hf  # noqa: E402  (after the optional import)

# maskformer-swin pads its last grid to a window; maskformer-swin-window3 pads every grid, shifted windows of the
# padded grids included; vitdet pads its 4x4 grid to windows of 3, with decomposed relative positions in them;
# sam2-padded-windows pads its third stage's 4x4 grid to windows of 3
CONVERTS = ["swin", "swinv2", "donut-swin", "maskformer-swin", "maskformer-swin-window3", "focalnet", "convnext",
            "convnextv2", "pvt", "pvt_v2", "segformer", "hiera", "poolformer", "resnet", "swiftformer",
            "sam2_hiera_det_model", "sam2-padded-windows", "cvt", "vitdet", "levit", "mobilevit"]
BACKBONES = ["swin", "swinv2", "maskformer-swin", "convnext", "resnet", "vitdet"]


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


CASES = [(t, False) for t in CONVERTS] + [(t, True) for t in BACKBONES]


@pytest.mark.parametrize("model_type,backbone", CASES, ids=[f"{t}-{'backbone' if b else 'model'}" for t, b in CASES])
def test_converts_and_matches_all_visible(model_type: str, backbone: bool):
    model = build_hf(model_type, backbone=backbone)
    green = gmc.convert(model, img_size=IMG)
    images = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    grid = green.mask_grid
    visible = torch.ones(2, *grid, dtype=torch.bool)
    for train in (False, True):
        model.train(train)
        green.train(train)
        torch.manual_seed(7)
        want = _last(model(images))
        torch.manual_seed(7)
        got = _dense(green(images, visible).last, want)
        want = want[:, want.shape[1] - got.shape[1]:] if want.dim() == 3 else want  # past a class token (PVT)
        assert rel_err(got, want) <= 1e-10, ("train" if train else "eval")
    mask = random_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(1))
    mask[0] = True  # one sample all visible, one with half its units
    for train in (True, False):
        model.train(train)
        green.train(train)
        last, got = _with_gradients(model, lambda: green(images, mask).last)
        ref, want = _with_gradients(model, lambda: dense_masked_reference(model, images, mask, stages=[]).last)
        assert torch.equal(last.batch, ref.batch) and torch.equal(last.coords, ref.coords)
        assert rel_err(last.feats, ref.feats) <= 1e-10, ("train" if train else "eval")
        _check_gradients(got, want)
    with torch.no_grad():
        maps = green(images, mask).stages + [last]
    assert all(t.grid[0] * t.stride == IMG == t.grid[1] * t.stride for t in maps)  # images' maps, no padded grid
    cells = (last.grid[0] // grid[0]) * (last.grid[1] // grid[1])
    assert last.counts().tolist() == (mask.sum((1, 2)) * cells).tolist()  # visible positions only


def _with_gradients(model: torch.nn.Module, run: Callable[[], gmc.VisibleTokens]
                    ) -> Tuple[gmc.VisibleTokens, Dict[str, torch.Tensor]]:
    """``run()``'s visible tokens and the parameter gradients of one fixed random weighting of their features;
    ``run`` starts from one seed, so that in training mode both runs draw the same drop path."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    tokens = run()
    weights = torch.randn(tokens.feats.shape, generator=torch.Generator().manual_seed(5), dtype=tokens.feats.dtype)
    (weights * tokens.feats).sum().backward()
    return tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_gradients(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], tol: float = 1e-10,
                     floor: float = 1e-4) -> None:
    """Gradients equal the oracle's, each within ``tol`` of its own size or of ``floor`` times the largest gradient,
    whichever is larger. A gradient the oracle finds analytically zero (a bias added to every key of a softmax, or
    before a normalisation over the visible positions in training mode) is rounding noise of the largest one, and a
    small gradient formed by cancellation (q and k of MobileViT's nearly uniform attention, ~1e-8 of the largest)
    carries the rounding of the terms that cancel: both are checked to 1e-14 of the largest gradient."""
    assert got.keys() == want.keys() and want
    scale = max(float(g.abs().max()) for g in want.values())
    for name, g in want.items():
        size = max(float(g.abs().max()), floor * scale)
        assert float((got[name] - g).abs().max()) <= tol * size, name


def test_every_config_is_checked():
    """Each tiny configuration is a case of the harness above."""
    assert set(CONFIGS) == set(CONVERTS)
