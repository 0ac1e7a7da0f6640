"""One harness for models that are not timm's: torchvision Swin V1/V2 and a from-scratch hierarchical ViT.

Compiler tests (``convert(model, img_size=, stages=)``) check all-visible equality with the source
model and masked equality with the dense masked oracle, outputs and gradients. Oracle self-checks
(all visible == the plain model; masked pixels and masked tokens do not reach visible outputs;
masking does change them) keep the oracle honest on its own. Full-size torchvision models are
``slow`` except for the all-visible conversion test.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_same_grads, check_against_reference, masks_with_unequal_counts, rel_err, weighted_loss_grads
from scratch_models import Block, ConvMerge, PoolMerge, ScratchViT, scratch_key_mask_for, scratch_masked_reference
from torchvision.models import maxvit as tv_maxvit
from torchvision.models import swin_transformer as tv_swin

import greenmim_convert as gmc
from greenmim_convert.oracle.reference import dense_masked_reference, dense_to_tokens, feature_layout, visibility_map
from greenmim_convert.runtime.tokens import GreenOutput

UNIT = 32  # mask unit in pixels for every model here (the scratch model's own total stride is 16)
TV_STAGES = ["features.1", "features.3", "features.5", "features.7"]
TV_MAXVIT_STAGES = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


@dataclass
class Case:
    """A model to check: how to build it, its image size, stage modules and final-features module."""

    build: Callable[[], nn.Module]
    img: int
    stages: List[str]
    last: Optional[str] = None  # module whose output is the final features; None: the model's output
    oracle: Callable[[nn.Module], dict] = field(default=lambda model: {})  # extra dense_masked_reference kwargs
    # modules whose input (a feature map) the masked-content test perturbs at masked positions
    blocks: Tuple[type, ...] = (tv_swin.SwinTransformerBlock, tv_swin.PatchMerging, tv_swin.PatchMergingV2)

    def oracle_kwargs(self, model: nn.Module) -> dict:
        return {"stages": self.stages, "last": self.last, **self.oracle(model)}


def _randomise(model: nn.Module) -> nn.Module:
    """Random relative-position terms, biases and norm affines, so nothing is an identity or a constant."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
            elif "cpb_mlp.0" in name:
                p.normal_(0, 1.0)
            elif "cpb_mlp.2" in name:
                p.normal_(0, 0.1)
            elif name.endswith("logit_scale"):
                p.uniform_(1.0, 3.5)
            elif p.dim() == 1 and name.endswith("bias"):
                p.normal_(0, 0.05)
            elif p.dim() == 1 and name.endswith("weight"):  # LayerNorm scales
                p.normal_(1.0, 0.1)
    return model.to(torch.float64).eval()


def _tv_small(v2: bool, window: int = 7) -> nn.Module:
    """A small torchvision SwinTransformer (V2: its block and merging classes) with random weights."""
    extra = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    torch.manual_seed(11 if v2 else 10)
    model = tv_swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=[window, window],
        stochastic_depth_prob=0.0,
        num_classes=10,
        **extra,
    )
    return _randomise(model)


def _tv_maxvit_small() -> nn.Module:
    """A small torchvision MaxViT: MBConv (BatchNorm, squeeze-excite, an average-pool shortcut), window and grid
    attention."""
    torch.manual_seed(14)
    model = tv_maxvit.MaxVit(
        input_size=(224, 224),
        stem_channels=16,
        partition_size=7,
        block_channels=[16, 32, 48, 64],
        block_layers=[1, 1, 1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return _randomise(model)


def _tv_full(name: str) -> nn.Module:
    torch.manual_seed(12)
    return _randomise(getattr(torchvision.models, name)(weights=None))


def _scratch(merge: type = ConvMerge) -> nn.Module:
    torch.manual_seed(13)
    return _randomise(ScratchViT(merge=merge))


CASES: Dict[str, Case] = {
    "tv_swin_t_small": Case(lambda: _tv_small(v2=False), 224, TV_STAGES, "permute"),
    "tv_swin_v2_t_small": Case(lambda: _tv_small(v2=True), 224, TV_STAGES, "permute"),
    "scratch": Case(
        _scratch,
        128,
        ScratchViT().stage_names,
        None,
        oracle=lambda m: {"key_mask_for": scratch_key_mask_for},
        blocks=(Block, ConvMerge),
    ),
    # merging by average pools with padding, counted and not counted, as torchvision MaxViT's MBConv shortcut
    "scratch_pool": Case(
        lambda: _scratch(PoolMerge),
        128,
        ScratchViT().stage_names,
        None,
        oracle=lambda m: {"key_mask_for": scratch_key_mask_for},
        blocks=(Block, PoolMerge),
    ),
    "tv_maxvit_small": Case(_tv_maxvit_small, 224, TV_MAXVIT_STAGES, "blocks.3", blocks=(tv_maxvit.MaxVitLayer,)),
    "tv_swin_t": Case(lambda: _tv_full("swin_t"), 224, TV_STAGES, "permute"),
    "tv_swin_v2_t": Case(lambda: _tv_full("swin_v2_t"), 256, TV_STAGES, "permute"),
}
SMALL = ["tv_swin_t_small", "tv_swin_v2_t_small", "tv_maxvit_small", "scratch", "scratch_pool"]
FULL = ["tv_swin_t", "tv_swin_v2_t"]
# oracle-only: window 8 at 224 makes torchvision pad the 28- and 14-grids (and drop the shift on 7)
ORACLE_ONLY: Dict[str, Case] = {
    "tv_swin_v2_padded": Case(lambda: _tv_small(v2=True, window=8), 224, TV_STAGES, "permute"),
}
slow_full = [pytest.param(n, marks=pytest.mark.slow) for n in FULL]


@lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    with torch.random.fork_rng():  # the builders seed; leave the tests' fresh seeds alone
        return {**CASES, **ORACLE_ONLY}[name].build()


@lru_cache(maxsize=None)
def _green(name: str):
    case = CASES[name]
    return gmc.convert(_model(name), img_size=case.img, stages=case.stages, mask_unit=UNIT)


def _case(name: str) -> Tuple[Case, nn.Module]:
    return {**CASES, **ORACLE_ONLY}[name], _model(name)


def _images(case: Case, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, case.img, case.img, generator=gen, dtype=torch.float64)


def _grid(case: Case) -> Tuple[int, int]:
    return case.img // UNIT, case.img // UNIT


def _plain(case: Case, model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """The unmodified model's stage outputs and final features, as it computes them (any layout)."""
    names = case.stages + ([case.last] if case.last else [])
    got: Dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)) for n in names]
    try:
        out = model(images)
    finally:
        for h in handles:
            h.remove()
    return [got[n] for n in case.stages] + [got[case.last] if case.last else out]


def _nchw(dense: torch.Tensor, img: int) -> torch.Tensor:
    layout, stride = feature_layout(dense, (img, img))
    if layout == "NHWC":
        return dense.permute(0, 3, 1, 2)
    if layout == "NLC":
        return dense.transpose(1, 2).reshape(dense.shape[0], dense.shape[2], img // stride, img // stride)
    return dense


def _plain_tokens(case: Case, model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> List[torch.Tensor]:
    """The unmodified model's outputs read at the visible positions, in the oracle's order."""
    size = (case.img, case.img)
    feats = []
    for dense in _plain(case, model, images):
        layout, stride = feature_layout(dense, size)
        feats.append(dense_to_tokens(dense, visible, stride, layout, size).feats)
    return feats


def _oracle(case: Case, model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    return dense_masked_reference(model, images, visible, **case.oracle_kwargs(model))


def _hide(images: torch.Tensor, visible: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same images with new random pixels in every masked unit."""
    shown = visible.repeat_interleave(UNIT, 1).repeat_interleave(UNIT, 2)[:, None].expand_as(images)
    other = images.clone()
    other[~shown] = 10 * torch.randn(int((~shown).sum()), generator=gen, dtype=images.dtype)
    return other


# --- the converted model (the compiler's contract) ------------------------------------------------


@pytest.mark.parametrize("name", SMALL + FULL)
def test_all_visible_equals_source_model(name, seed):
    """All visible, every stage and the final features equal the source model's (float64, 1e-10)."""
    case, model = _case(name)
    green = _green(name)
    gen = torch.Generator().manual_seed(seed)
    images = _images(case, 2, gen)
    visible = torch.ones(2, *_grid(case), dtype=torch.bool)
    with torch.no_grad():
        out = green(images, visible)
        want = [_nchw(t, case.img) for t in _plain(case, model, images)]
    assert len(out.stages) == len(case.stages)
    for got, dense in zip(out.stages + [out.last], want):
        assert got.to_dense().shape == dense.shape
        assert rel_err(got.to_dense(), dense) <= 1e-10


@pytest.mark.parametrize("name", SMALL + slow_full)
def test_masked_matches_oracle_with_gradients(name, seed):
    """Per-sample unequal masks: outputs and parameter gradients equal the oracle's (float64, 1e-10)."""
    case, model = _case(name)
    green = _green(name)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, _grid(case), 0.75, gen)
    assert len(set(visible.flatten(1).sum(1).tolist())) > 1
    images = _images(case, 3, gen)
    out = check_against_reference(model, green, images, visible, gen=gen, **case.oracle_kwargs(model))
    assert len(out.stages) == len(case.stages)


# --- the oracle on its own (independent of the compiler) ------------------------------------------


ORACLE_CASES = SMALL + list(ORACLE_ONLY) + slow_full


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_oracle_all_visible_is_the_plain_model(name, seed):
    """Outputs and parameter gradients (of a random weighted loss) of the oracle, all visible, are the model's."""
    case, model = _case(name)
    gen = torch.Generator().manual_seed(seed)
    images = _images(case, 2, gen)
    visible = torch.ones(2, *_grid(case), dtype=torch.bool)

    def oracle_feats() -> List[torch.Tensor]:
        ref = _oracle(case, model, images, visible)
        return [t.feats for t in ref.stages + [ref.last]]

    (plain, plain_grads), (ref, ref_grads) = weighted_loss_grads(
        model, [lambda: _plain_tokens(case, model, images, visible), oracle_feats], gen
    )
    assert len(ref) == len(plain) == len(case.stages) + 1
    for got, want in zip(ref, plain):
        assert rel_err(got, want) <= 1e-12
    assert_same_grads(ref_grads, plain_grads, 1e-11)


@contextmanager
def _noise_at_masked(model: nn.Module, case: Case, visible: torch.Tensor, seed: int) -> Iterator[None]:
    """Add large random values at the masked positions of the input of every block and merge of ``model``."""
    gen = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, args):
        x = args[0]
        layout, _ = feature_layout(x, (case.img, case.img))
        grid = x.shape[1:3] if layout == "NHWC" else x.shape[2:4]
        hidden = ~visibility_map(visible, tuple(grid))
        hidden = hidden[..., None] if layout == "NHWC" else hidden[:, None]
        return (x + hidden * 10 * torch.randn(x.shape, generator=gen, dtype=x.dtype),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, case.blocks)]
    assert handles
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_oracle_ignores_masked_content(name, seed):
    """Visible outputs of the oracle do not see masked pixels, nor what masked tokens hold inside the network."""
    case, model = _case(name)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, _grid(case), 0.5, gen)
    images = _images(case, 3, gen)
    other = _hide(images, visible, gen)
    with torch.no_grad():
        base, plain = _oracle(case, model, images, visible), _plain_tokens(case, model, images, visible)
        pixels, plain_pixels = _oracle(case, model, other, visible), _plain_tokens(case, model, other, visible)
        with _noise_at_masked(model, case, visible, seed):
            tokens = _oracle(case, model, images, visible)
        with _noise_at_masked(model, case, visible, seed):
            plain_tokens = _plain_tokens(case, model, images, visible)
    for changed in (pixels, tokens):
        for x, y in zip(base.stages + [base.last], changed.stages + [changed.last]):
            assert torch.equal(x.coords, y.coords) and torch.equal(x.batch, y.batch)
            assert (x.feats - y.feats).abs().max() <= 1e-12
    # the plain model does see both changes, so the checks above are not vacuous
    for changed in (plain_pixels, plain_tokens):
        assert max(float((p - q).abs().max()) for p, q in zip(plain, changed)) > 1e-3


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_oracle_masking_changes_visible_outputs(name, seed):
    """The oracle is not the plain model: with units masked, visible outputs of every stage change."""
    case, model = _case(name)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, _grid(case), 0.5, gen)
    images = _images(case, 3, gen)
    with torch.no_grad():
        ref = _oracle(case, model, images, visible)
        plain = _plain_tokens(case, model, images, visible)
    for i, (got, want) in enumerate(zip(ref.stages + [ref.last], plain)):
        partial = ~visible.flatten(1).all(1)  # samples with something masked differ; the full one does not
        rows = partial[got.batch]
        assert rel_err(got.feats[rows], want[rows]) > 1e-6, i
        assert rel_err(got.feats[~rows], want[~rows]) <= 1e-12, i


# --- the oracle's API -----------------------------------------------------------------------------


def test_oracle_restores_torchvision_attention_after_an_error():
    """torchvision's attention function, SDPA and the hooks are back in place after a failed oracle run."""
    case, model = _case("tv_swin_t_small")
    before = tv_swin.shifted_window_attention
    images = torch.zeros(1, 3, 224, 224, dtype=torch.float64)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(ValueError, match="not a multiple"):  # a 6x6 mask does not tile 224 pixels
        dense_masked_reference(model, images, torch.ones(1, 6, 6, dtype=torch.bool), stages=TV_STAGES, last="permute")
    assert tv_swin.shifted_window_attention is before
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_oracle_needs_stages_without_feature_info():
    """Without timm's feature_info the oracle asks for stage module names, and checks them."""
    case, model = _case("scratch")
    images = torch.zeros(1, 3, 128, 128, dtype=torch.float64)
    visible = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="stages"):
        dense_masked_reference(model, images, visible)
    with pytest.raises(ValueError, match="no module named"):
        dense_masked_reference(model, images, visible, stages=["stages.9"])


def test_scratch_oracle_helper_is_the_generic_oracle(seed):
    """``scratch_masked_reference`` is ``dense_masked_reference`` with the scratch model's key masks."""
    case, model = _case("scratch")
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, _grid(case), 0.5, gen)
    images = _images(case, 3, gen)
    with torch.no_grad():
        a, b = scratch_masked_reference(model, images, visible), _oracle(case, model, images, visible)
    for x, y in zip(a.stages + [a.last], b.stages + [b.last]):
        assert torch.equal(x.feats, y.feats)


def test_feature_layout_reads_shapes():
    """NCHW / NHWC / (B, N, C) and the stride from the shape and the image size; ``fmt`` breaks ties."""
    size = (224, 224)
    assert feature_layout(torch.zeros(2, 56, 56, 96), size) == ("NHWC", 4)
    assert feature_layout(torch.zeros(2, 768, 7, 7), size) == ("NCHW", 32)
    assert feature_layout(torch.zeros(2, 49, 768), size) == ("NLC", 32)
    assert feature_layout(torch.zeros(2, 56, 28, 56), (224, 112)) == ("NHWC", 4)  # (28, 56) lacks the aspect
    assert feature_layout(torch.zeros(2, 112, 64, 96), (448, 256)) == ("NHWC", 4)  # 96 does not divide 256
    ambiguous = torch.zeros(2, 56, 56, 56)
    assert feature_layout(ambiguous, size) == ("NCHW", 4)
    assert feature_layout(ambiguous, size, "NHWC") == ("NHWC", 4)
    with pytest.raises(ValueError):
        feature_layout(torch.zeros(2, 1000), size)


def test_key_mask_for_combines_with_bool_and_float_masks():
    """A ``key_mask_for`` mask removes masked keys, added to the module's own SDPA mask whatever its kind."""

    class Toy(nn.Module):  # tokens from a Linear over 32x32 pixel blocks: no conv hook zeroes masked pixels
        def __init__(self, kind: Optional[str]):
            super().__init__()
            self.kind = kind
            self.embed = nn.Linear(3 * 32 * 32, 8)

        def forward(self, x):
            b = x.shape[0]
            t = self.embed(x.reshape(b, 3, 2, 32, 2, 32).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, -1))  # (B, 4, 8)
            mask = None
            if self.kind == "bool":
                mask = torch.ones(4, 4, dtype=torch.bool)
            elif self.kind == "float":
                mask = torch.zeros(4, 4, dtype=t.dtype)
            return t + torch.nn.functional.scaled_dot_product_attention(t, t, t, attn_mask=mask)

    def keys(module):
        if isinstance(module, Toy):
            return lambda args, visible: visible.reshape(visible.shape[0], 1, 4)
        return None

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    visible = torch.tensor([[[True, False], [True, True]], [[True, True], [True, True]]])
    other = _hide(images, visible, gen)
    outs = []
    for kind in (None, "bool", "float"):
        torch.manual_seed(0)
        toy = Toy(kind).double()
        a = dense_masked_reference(toy, images, visible, stages=[], key_mask_for=keys)
        b = dense_masked_reference(toy, other, visible, stages=[], key_mask_for=keys)
        unmasked = dense_masked_reference(toy, other, visible, stages=[])
        assert torch.equal(a.last.feats, b.last.feats)
        assert rel_err(unmasked.last.feats, a.last.feats) > 1e-3
        outs.append(a.last.feats)
    assert rel_err(outs[1], outs[0]) <= 1e-14 and rel_err(outs[2], outs[0]) <= 1e-14


class RolledGlobalAttention(nn.Module):
    """Global attention over a rolled map with a learned ``(heads, N, N)`` bias: per-sample attention whose
    term is read after the layout's roll."""

    def __init__(self, dim: int = 16, heads: int = 2, grid: int = 8, shift=(3, 5)):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, grid * grid, grid * grid))
        self.heads, self.shift = heads, shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).permute(0, 2, 3, 1)
        x = torch.roll(x, self.shift, (1, 2))
        b, h, w, c = x.shape
        q, k, v = (
            self.qkv(x.reshape(b, h * w, c)).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        y = y.transpose(1, 2).reshape(b, h, w, c)
        return torch.roll(y, (-self.shift[0], -self.shift[1]), (1, 2)).permute(0, 3, 1, 2)


def test_rolled_per_sample_attention_reads_its_bias_after_the_roll(seed):
    torch.manual_seed(seed)
    model = RolledGlobalAttention().double().eval()
    green = gmc.convert(model, img_size=32, stages=[], mask_unit=4)
    shift = model.shift

    def keys(args, visible):  # keys in the rolled raster order of the attention call
        vis = torch.roll(visibility_map(visible, (8, 8)), shift, (1, 2))
        return vis.reshape(vis.shape[0], 1, 1, -1)

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    visible = masks_with_unequal_counts(3, green.mask_grid, 0.6, gen)
    check_against_reference(
        model, green, images, visible, gen=gen, stages=[], key_mask_for=lambda m: keys if m is model else None
    )
