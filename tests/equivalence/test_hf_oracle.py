"""Self-checks of the dense masked reference on transformers vision backbones (``reference_hf``).

Every family, as ``AutoModel`` and (where transformers has one) ``AutoBackbone``: with every unit visible
the oracle is the plain model (outputs and gradients); neither masked pixels nor what masked positions hold
inside the network reach visible outputs; masking does change them. Tiny float64 configs, 64x64 images.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_same_grads, masks_with_unequal_counts, rel_err, weighted_loss_grads
from hf_models import BACKBONES, CONFIGS, IMG, MODEL_TYPES, build_hf, clear_caches, image_size, import_transformers

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.oracle import transformers as reference_hf
from greenmim_convert.oracle.reference import dense_masked_reference, feature_layout, visibility_map
from greenmim_convert.runtime.tokens import GreenOutput

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    """A model to check: its type, AutoBackbone or AutoModel, attention implementation and mask unit."""

    model_type: str
    backbone: bool = False
    attn: Optional[str] = None  # None: the config's default (SDPA where the family supports it)
    unit: int = 32  # mask unit in pixels
    fmt: str = "NCHW"  # layout of 4-D features whose shape allows both
    overrides: Tuple[Tuple[str, Any], ...] = ()  # config kwargs over CONFIGS[model_type]

    @property
    def name(self) -> str:
        extra = [self.attn] if self.attn else []
        extra += [k if v is True else f"{k}={v}" for k, v in self.overrides]
        return "/".join([self.model_type] + (["backbone"] if self.backbone else []) + extra)

    @property
    def size(self) -> int:
        """The side of its square images."""
        return image_size(self.model_type)

    @property
    def family(self) -> str:
        """The transformers model type (a case of ``MODEL_TYPES`` is a second configuration of one)."""
        return MODEL_TYPES.get(self.model_type, self.model_type)


# mask units by test case, else by model type: no stage past stride 16 mixes positions, but sam2-pooled-padding's
# last block pools its queries onto a stride-32 grid
UNITS = {"vitdet": 16, "sam2_hiera_det_model": 16, "sam2-pooled-padding": 32}
FMT = {"sam2_hiera_det_model": "NHWC"}
CASES = (
    [
        Case(t, unit=UNITS.get(t, UNITS.get(MODEL_TYPES.get(t, t), 32)), fmt=FMT.get(MODEL_TYPES.get(t, t), "NCHW"))
        for t in CONFIGS
    ]
    + [Case(t, backbone=True, unit=UNITS.get(t, 32)) for t in BACKBONES if t != "hiera"]
    # transformers' eager attention: float32 softmax of float64 logits, the mask must stay finite there
    + [
        Case(t, attn="eager", unit=UNITS.get(t, 32), fmt=FMT.get(t, "NCHW"))
        for t in ("swin", "segformer", "sam2_hiera_det_model")
    ]
    # keys from a 7x7 adaptive average pool: a key is visible where its cell holds a visible position
    + [Case("pvt_v2", overrides=(("linear_attention", True),))]
)
IDS = [c.name for c in CASES]
# HieraBackbone runs Hiera's encoder on raster tokens it never unrolled: its groups span the image, so its only mask
# unit is the image (whole samples visible or hidden); masking inside a sample does not exist for it
WHOLE_SAMPLE = [Case("hiera", backbone=True, unit=IMG)]

# classes whose first input (a feature map or raster tokens) the masked-content test perturbs at masked positions
NOISE_INPUTS = {
    "swin": ("SwinLayer", "SwinPatchMerging"),
    "swinv2": ("Swinv2Layer", "Swinv2PatchMerging"),
    "donut-swin": ("DonutSwinLayer",),
    "maskformer-swin": ("MaskFormerSwinLayer",),
    "focalnet": ("FocalNetLayer",),
    "convnext": ("ConvNextLayer",),
    "convnextv2": ("ConvNextV2Layer",),
    "pvt": ("PvtLayer",),
    "pvt_v2": ("PvtV2BlockLayer",),
    "segformer": ("SegformerLayer",),
    "hiera": (),
    "cvt": ("CvtLayer",),
    "poolformer": ("PoolFormerLayer",),
    "resnet": ("ResNetBasicLayer",),
    "mobilevit": ("MobileViTLayer", "MobileViTInvertedResidual"),
    "levit": ("LevitResidualLayer", "LevitAttentionSubsample"),
    "swiftformer": ("SwiftFormerEncoderBlock", "SwiftFormerConvEncoder"),
    "vitdet": ("VitDetLayer",),
    "sam2_hiera_det_model": ("Sam2MultiScaleBlock",),
}
# classes whose output (first tensor) it perturbs: Hiera's tokens are unrolled past its embeddings
NOISE_OUTPUTS = {"hiera": ("HieraEmbeddings",)}


@lru_cache(maxsize=None)
def _model(case: Case) -> nn.Module:
    torch.manual_seed(sum(map(ord, case.name)))
    return build_hf(case.model_type, backbone=case.backbone, attn_implementation=case.attn, **dict(case.overrides))


def _grid(case: Case) -> Tuple[int, int]:
    return case.size // case.unit, case.size // case.unit


def _images(n: int, gen: torch.Generator, size: int = IMG) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)


def _grid_vis(visible: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W) visibility of a feature grid written here: a multiple of the mask grid repeats the units; a grid with
    fewer cells than units is a pick of every ``ceil(units / cells)``-th unit from the first (LeViT's 4x4 of 7x7),
    whose cells are visible where the units they pick are."""
    vis = visible
    for axis, n in ((1, grid[0]), (2, grid[1])):
        m = vis.shape[axis]
        if n % m == 0:
            vis = vis.repeat_interleave(n // m, axis)
        else:
            step = -(-m // n)
            assert len(range(0, m, step)) == n, (grid, tuple(visible.shape))
            vis = vis.index_select(axis, torch.arange(0, m, step))
    return vis


def _oracle(case: Case, model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    if case.backbone:
        return dense_masked_reference(model, images, visible, case.fmt, stages_from_output=True)
    return dense_masked_reference(model, images, visible, case.fmt, stages=[])


def _nchw(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """A plain output as (B, C, H, W): NHWC maps permuted; raster tokens (after a class token) reshaped."""
    if x.dim() == 3:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            x = x[:, 1:]
            side = int(round(x.shape[1] ** 0.5))
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    return x.permute(0, 3, 1, 2) if fmt == "NHWC" else x


def _plain(case: Case, model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """The plain model's stages and final features, NCHW (the oracle's order: stages, then the last)."""
    out = model(images)
    if case.backbone:
        maps = list(out.feature_maps)
        return [_nchw(m, case.fmt) for m in maps] + [_nchw(maps[-1], case.fmt)]
    return [_nchw(out.last_hidden_state, case.fmt)]


def _dense(ref: GreenOutput) -> List[torch.Tensor]:
    return [t.to_dense() for t in ref.stages + [ref.last]]


def _at_visible(dense: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) values at the visible positions, (T, C)."""
    vis = _grid_vis(visible, tuple(dense.shape[-2:]))
    return dense.permute(0, 2, 3, 1)[vis]


@pytest.mark.parametrize("case", CASES + WHOLE_SAMPLE, ids=IDS + [c.name for c in WHOLE_SAMPLE])
def test_oracle_all_visible_is_the_plain_model(case, seed):
    """Every unit visible: the oracle's outputs and parameter gradients are the plain model's."""
    model = _model(case)
    gen = torch.Generator().manual_seed(seed)
    images = _images(2, gen, case.size)
    visible = torch.ones(2, *_grid(case), dtype=torch.bool)

    runs = [
        lambda: _plain(case, clear_caches(model), images),  # LeViT caches its attention biases in eval mode
        lambda: _dense(_oracle(case, clear_caches(model), images, visible)),
    ]
    (plain, plain_grads), (ref, ref_grads) = weighted_loss_grads(model, runs, gen)
    for got, want in zip(ref, plain):
        assert rel_err(got, want) <= 1e-12
    assert_same_grads(ref_grads, plain_grads, 1e-11, floor=0.1)  # within 1e-12 of the largest: rounding noise


def _hide(images: torch.Tensor, visible: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The images with new random content at masked pixels."""
    hidden = ~visibility_map(visible, tuple(images.shape[-2:]))[:, None]
    return torch.where(hidden, 10 * torch.randn(images.shape, generator=gen, dtype=images.dtype), images)


def _with_noise(x: torch.Tensor, case: Case, visible: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x`` plus large random values at its masked positions (layout read from its shape; a token before a
    square grid of tokens is a class token, always visible)."""
    if x.dim() == 3:
        first = 0 if int(round(x.shape[1] ** 0.5)) ** 2 == x.shape[1] else 1
        tokens = x[:, first:]
        side = int(round(tokens.shape[1] ** 0.5))
        hidden = ~_grid_vis(visible, (side, side)).reshape(x.shape[0], -1, 1)
        noisy = tokens + hidden * 10 * torch.randn(tokens.shape, generator=gen, dtype=x.dtype)
        return torch.cat([x[:, :first], noisy], 1)
    layout, _ = feature_layout(x, (case.size, case.size), case.fmt)
    grid = x.shape[1:3] if layout == "NHWC" else x.shape[2:4]
    hidden = ~_grid_vis(visible, tuple(grid))
    hidden = hidden[..., None] if layout == "NHWC" else hidden[:, None]
    return x + hidden * 10 * torch.randn(x.shape, generator=gen, dtype=x.dtype)


@contextmanager
def _noise_at_masked(model: nn.Module, case: Case, visible: torch.Tensor, seed: int) -> Iterator[None]:
    """Large random values at the masked positions of the inputs (outputs) of ``NOISE_INPUTS`` (``NOISE_OUTPUTS``)."""
    gen = torch.Generator().manual_seed(seed)
    inputs, outputs = NOISE_INPUTS[case.family], NOISE_OUTPUTS.get(case.family, ())

    def pre(module, args):
        return (_with_noise(args[0], case, visible, gen),) + tuple(args[1:])

    def post(module, args, out):
        if isinstance(out, tuple):
            return (_with_noise(out[0], case, visible, gen),) + tuple(out[1:])
        return _with_noise(out, case, visible, gen)

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if type(m).__name__ in inputs]
    handles += [m.register_forward_hook(post) for m in model.modules() if type(m).__name__ in outputs]
    assert handles
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_oracle_ignores_masked_content(case, seed):
    """Visible outputs of the oracle see neither masked pixels nor what masked positions hold inside the network;
    masking does change them (the oracle is not the plain model) in partly masked samples, not in the full one."""
    model = _model(case)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, _grid(case), 0.5, gen)
    images = _images(3, gen, case.size)
    other = _hide(images, visible, gen)
    with torch.no_grad():
        ref = _oracle(case, model, images, visible)
        base, plain = _dense(ref), _plain(case, model, images)
        pixels, plain_pixels = _dense(_oracle(case, model, other, visible)), _plain(case, model, other)
        with _noise_at_masked(model, case, visible, seed):
            tokens = _dense(_oracle(case, model, images, visible))
            plain_tokens = _plain(case, model, images)
    for changed in (pixels, tokens):
        for x, y in zip(base, changed):
            assert rel_err(_at_visible(y, visible), _at_visible(x, visible)) <= 1e-12
    # the plain model does see both changes at visible positions, so the checks above are not vacuous
    for changed in (plain_pixels, plain_tokens):
        assert max(rel_err(_at_visible(q, visible), _at_visible(p, visible)) for p, q in zip(plain, changed)) > 1e-6
    partial = ~visible.flatten(1).all(1)
    for got, want in zip(ref.stages + [ref.last], plain):
        rows = partial[got.batch]
        want = _at_visible(want, visible)
        assert rel_err(got.feats[rows], want[rows]) > 1e-6
        assert rel_err(got.feats[~rows], want[~rows]) <= 1e-12


TRAIN_CASES = [
    c for c in CASES if c.family in ("resnet", "cvt", "mobilevit", "levit", "swiftformer", "swin") and not c.attn
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.name for c in TRAIN_CASES])
def test_oracle_training_mode_ignores_masked_content(case, seed):
    """Training mode (BatchNorm batch statistics over visible positions, drop-path drawn from one seed): masked
    pixels and masked positions inside the network reach neither visible outputs nor the running statistics."""
    model = _model(case)
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, _grid(case), 0.5, gen)
    images = _images(3, gen, case.size)
    other = _hide(images, visible, gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(imgs: torch.Tensor, noisy: bool):
        model.load_state_dict(state)
        torch.manual_seed(seed)
        with torch.no_grad(), _noise_at_masked(model, case, visible, seed) if noisy else nullcontext():
            dense = _dense(_oracle(case, model, imgs, visible))
        return dense, {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    try:
        runs = [run(images, False), run(other, False), run(images, True)]
    finally:
        model.load_state_dict(state)
        model.eval()
    (base, stats), changed = runs[0], runs[1:]
    moved = [k for k in stats if "running" in k and not torch.equal(stats[k], state[k])]
    if case.model_type != "swin":
        assert moved  # BatchNorm statistics were updated, from visible positions only (next check)
    for outs, new_stats in changed:
        for x, y in zip(base, outs):
            assert rel_err(_at_visible(y, visible), _at_visible(x, visible)) <= 1e-12
        for k in moved:
            assert rel_err(new_stats[k], stats[k]) <= 1e-12, k


# config -> (mask unit, (grid side, window, shift) of every attention call in order (window 0: global), heads per
# key row): grids that windows of 3 do not divide, padded at the bottom and right
PADDED = {
    "maskformer-swin-window3": (
        32,
        [(16, 3, 0), (16, 3, 1), (8, 3, 0), (8, 3, 1), (4, 3, 0), (4, 3, 1), (2, 3, 0), (2, 3, 1)],
        1,
    ),
    "vitdet": (16, [(4, 3, 0), (4, 0, 0), (4, 3, 0)], 2),
}


def _window_keys(visible: torch.Tensor, unit: int, side: int, window: int, shift: int) -> torch.Tensor:
    """``(B * windows, N)`` key visibility written here: the grid's visibility padded with visible positions (padded
    positions are constant tokens the source attends to, never hidden), rolled by ``-shift``, cut into windows."""
    f = side // (IMG // unit)
    vis = visible.repeat_interleave(f, 1).repeat_interleave(f, 2)
    if not window:
        return vis.reshape(vis.shape[0], -1)
    pad = -side % window
    vis = F.pad(vis.to(torch.int64), (0, pad, 0, pad), value=1).bool()
    vis = torch.roll(vis, (-shift, -shift), (1, 2))
    n = vis.shape[1] // window
    return vis.view(-1, n, window, n, window).transpose(2, 3).reshape(-1, window * window)


@pytest.mark.parametrize("model_type", sorted(PADDED))
def test_padded_positions_stay_keys(model_type, seed, monkeypatch):
    """The key mask of attention on a padded grid hides the hidden image positions only: the padded positions
    stay keys, for every sample and window, however much of the image is hidden."""
    unit, calls, heads = PADDED[model_type]
    seen: List[torch.Tensor] = []

    class Recorded(reference_hf._Keys):
        def __init__(self, vis: torch.Tensor):
            super().__init__(vis)
            seen.append(vis)

    monkeypatch.setattr(reference_hf, "_Keys", Recorded)
    model = _model(Case(model_type, unit=unit))
    gen = torch.Generator().manual_seed(seed)
    visible = masks_with_unequal_counts(3, (IMG // unit, IMG // unit), 0.75, gen)
    dense_masked_reference(model, _images(3, gen), visible, stages=[])
    assert len(seen) == len(calls)
    for vis, (side, window, shift) in zip(seen, calls):
        got = vis.reshape(-1, vis.shape[-1])[::heads]
        assert torch.equal(got, _window_keys(visible, unit, side, window, shift)), (side, window, shift)


def test_hiera_backbone_takes_whole_sample_masks(seed):
    """HieraBackbone's encoder groups raster tokens across the image: a mask of whole samples is its masked-dense
    model (a hidden sample's pixels and tokens never reach a visible one, whose features are the plain model's), a
    finer mask is refused."""
    model = _model(WHOLE_SAMPLE[0])
    gen = torch.Generator().manual_seed(seed)
    images = _images(3, gen)
    visible = torch.tensor([True, False, True]).view(3, 1, 1)
    other = _hide(images, visible, gen)
    with torch.no_grad():
        ref = _oracle(WHOLE_SAMPLE[0], model, images, visible)
        hidden = _oracle(WHOLE_SAMPLE[0], model, other, visible)
        plain = _plain(WHOLE_SAMPLE[0], model, images)
    assert not torch.equal(other[1], images[1])
    for got, moved, want in zip(ref.stages + [ref.last], hidden.stages + [hidden.last], plain):
        assert got.counts().tolist() == [got.grid[0] * got.grid[1], 0, got.grid[0] * got.grid[1]]
        assert rel_err(moved.feats, got.feats) <= 1e-12
        assert rel_err(got.feats, _at_visible(want, visible)) <= 1e-12
    finer = masks_with_unequal_counts(2, (2, 2), 0.5, gen)
    with pytest.raises(InvalidInputError, match="whole samples"):
        dense_masked_reference(model, images[:2], finer, stages_from_output=True)


def test_unknown_attention_is_refused(seed):
    """A transformers attention the oracle does not know is an error, not silently unmasked keys."""
    transformers = import_transformers()
    config = transformers.AutoConfig.for_model(
        "vit",
        image_size=IMG,
        patch_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = transformers.AutoModel.from_config(config).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    with pytest.raises(InvalidInputError, match="ViT[A-Za-z]*Attention"):
        dense_masked_reference(model, _images(1, gen), torch.ones(1, 2, 2, dtype=torch.bool), stages=[])


def test_stages_from_output_reads_feature_maps_and_class_tokens(seed):
    """``stages_from_output`` takes the output's feature maps (last = final); a (B, 1 + N, C) stage drops its
    class token; ``stages``/``last`` with it are refused."""
    model = _model(Case("cvt"))
    gen = torch.Generator().manual_seed(seed)
    images = _images(2, gen)
    visible = masks_with_unequal_counts(2, (2, 2), 0.5, gen)
    layer = "encoder.stages.2.layers.1"  # (B, 1 + 16, C): the class token, then the 4x4 grid
    with torch.no_grad():
        ref = dense_masked_reference(model, images, visible, stages=[layer])
        out = dense_masked_reference(model, images, visible, stages=[layer], last=layer)
    assert ref.stages[0].grid == ref.last.grid == (4, 4)
    assert torch.equal(out.last.feats, ref.stages[0].feats) and rel_err(ref.last.feats, ref.stages[0].feats) > 1e-6
    with pytest.raises(InvalidInputError, match="stages_from_output"):
        dense_masked_reference(model, images, visible, stages=[layer], stages_from_output=True)
    backbone = _model(Case("convnext", backbone=True))
    with torch.no_grad():
        ref = dense_masked_reference(backbone, images, visible, stages_from_output=True)
    assert [t.grid for t in ref.stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert torch.equal(ref.last.feats, ref.stages[-1].feats)


def test_hiera_stages_are_read_in_raster_order(seed):
    """Hiera's stage modules output unrolled tokens: the oracle rerolls them; all visible they are the model's
    own ``reshaped_hidden_states``."""
    model = _model(Case("hiera"))
    gen = torch.Generator().manual_seed(seed)
    images = _images(2, gen)
    stages = [f"encoder.stages.{i}" for i in range(3)]
    with torch.no_grad():
        ref = dense_masked_reference(model, images, torch.ones(2, 2, 2, dtype=torch.bool), stages=stages)
        want = model(images, output_hidden_states=True).reshaped_hidden_states[1:]
    for got, w in zip(ref.stages, want):
        assert rel_err(got.to_dense(), w.permute(0, 3, 1, 2)) <= 1e-12


def test_import_does_not_import_transformers():
    """transformers stays optional: neither the package nor its oracle on a non-transformers model imports it."""
    code = (
        "import sys, torch, torch.nn as nn\n"
        "import greenmim_convert as g\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 4, 4), nn.Conv2d(4, 4, 2, 2)).double()\n"
        "g.dense_masked_reference(m, torch.randn(1, 3, 32, 32, dtype=torch.float64), torch.ones(1, 2, 2, "
        "dtype=torch.bool),"
        " stages=[])\n"
        "assert 'transformers' not in sys.modules and 'greenmim_convert.oracle.transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
