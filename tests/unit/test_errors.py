"""Bad input gets a specific exception that names the problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TINY_SWIN, make_swin, rel_err

import greenmim_convert as gmc
from greenmim_convert.api.io import load, save
from greenmim_convert.api.masking import random_mask


@pytest.fixture(scope="module")
def tiny32():
    model = make_swin(dtype=torch.float32, **TINY_SWIN)
    return model, gmc.convert(model)


def _inputs(batch=2, size=128, grid=(4, 4)):
    return torch.randn(batch, 3, size, size), random_mask(batch, grid, 0.5)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: (torch.randn(2, 3, 96, 96), random_mask(2, (4, 4))), ["(2, 3, 96, 96)", "128"]),
        (lambda: (torch.randn(2, 1, 128, 128), random_mask(2, (4, 4))), ["(2, 1, 128, 128)", "expected"]),
        (lambda: (torch.randn(2, 3, 128), random_mask(2, (4, 4))), ["(B, 3, H, W)"]),
        (lambda: (torch.randint(0, 255, (2, 3, 128, 128)), random_mask(2, (4, 4))), ["floating point", "int64"]),
        (lambda: (torch.randn(2, 3, 128, 128, dtype=torch.float64), random_mask(2, (4, 4))), ["float64", "float32"]),
        (lambda: (torch.randn(2, 3, 128, 128), random_mask(2, (8, 8))), ["(2, 8, 8)", "(2, 4, 4)"]),
        (lambda: (torch.randn(2, 3, 128, 128), random_mask(3, (4, 4))), ["(3, 4, 4)", "(2, 4, 4)"]),
        (lambda: (torch.randn(2, 3, 128, 128), random_mask(2, (4, 4)).to(torch.uint8)), ["bool", "uint8"]),
        (lambda: (torch.randn(2, 3, 128, 128), random_mask(2, (4, 4)).to("meta")), ["meta"]),
        (lambda: (torch.randn(2, 3, 128, 128, device="meta"), random_mask(2, (4, 4))), ["meta"]),
    ],
)
def test_bad_inputs(tiny32, make, words):
    _, green = tiny32
    images, visible = make()
    with pytest.raises(gmc.InvalidInputError) as exc:
        green(images, visible)
    for w in words:
        assert w in str(exc.value)


def test_mask_unit_errors():
    model = make_swin(dtype=torch.float32, **TINY_SWIN)
    with pytest.raises(gmc.MaskUnitError, match="48.*minimal mask unit 32"):
        gmc.convert(model, mask_unit=48)
    assert gmc.convert(model, mask_unit=64).mask_grid == (2, 2)
    odd = make_swin(dtype=torch.float32, **dict(TINY_SWIN, img_size=96, window_size=3))  # 96 px: 3 units of 32
    with pytest.raises(gmc.MaskUnitError, match=r"\(96, 96\).*64"):
        gmc.convert(odd, mask_unit=64)


def test_unsupported_op_names_node_module_and_line():
    model = make_swin(dtype=torch.float32, **TINY_SWIN)
    model.layers[1].blocks[0].mlp.act = nn.Softmax(dim=1)
    with pytest.raises(gmc.UnsupportedOperationError) as exc:
        gmc.convert(model)
    msg = str(exc.value)
    assert "'layers.1.blocks.0.mlp.act' (Softmax)" in msg and "softmax" in msg
    assert "mlp.py" in msg and "x = self.act(x)" in msg  # the source line that called it


def test_untraceable_model_is_a_trace_error():
    model = make_swin(dtype=torch.float32, **TINY_SWIN)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model.layers[0].downsample = DataDependent()
    with pytest.raises(gmc.TraceError, match="torch.export could not capture") as exc:
        gmc.convert(model)
    msg = str(exc.value)
    assert "layers.0.downsample" in msg and "DataDependent" in msg
    assert "x.sum() > 0" in msg  # the user's line that export could not capture


def test_bad_options():
    model = make_swin(dtype=torch.float32, **TINY_SWIN)
    with pytest.raises(gmc.InvalidInputError, match="grouping"):
        gmc.convert(model, grouping="greedy")
    with pytest.raises(gmc.InvalidInputError, match="img_size"):
        gmc.convert(nn.Linear(2, 2))


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(torch.randint(0, 255, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(gmc.LoadError, match="not a safetensors file"):
        load(str(junk))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(3)}, str(foreign))
    with pytest.raises(gmc.LoadError, match="no greenmim-convert metadata"):
        load(str(foreign))
    with pytest.raises(gmc.LoadError, match="no such file"):
        load(str(tmp_path / "missing.safetensors"))


def test_save_load_round_trip(tmp_path, seed):
    torch.manual_seed(seed)
    model = make_swin(dtype=torch.float32, **TINY_SWIN)
    green = gmc.convert(model)
    path = str(tmp_path / "g.safetensors")
    save(green, path, model_kwargs=TINY_SWIN)
    back = load(path).eval()
    images, visible = _inputs()
    a, b = green(images, visible), back(images, visible)
    assert torch.equal(a.last.feats, b.last.feats)
    assert back.config.mask_unit == 32 and back.config.img_size == (128, 128)


class _GlobalQueryViT(nn.Module):
    """A patch embedding and one window attention whose queries are a per-sample map made from the whole grid
    (``pool``), repeated over the windows; ``also_elsewhere`` adds that map's mean to the output too."""

    def __init__(self, pool: nn.Module, also_elsewhere: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.pool = pool
        self.kv = nn.Linear(16, 32)
        self.also = also_elsewhere

    def forward(self, x):
        x = self.embed(x)  # (B, 16, 8, 8)
        b = x.shape[0]
        m = self.pool(x)
        q = m.permute(0, 2, 3, 1)  # (B, 4, 4, 16)
        t = x.permute(0, 2, 3, 1).reshape(b, 2, 4, 2, 4, 16).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 16, 16)
        k, v = self.kv(t).chunk(2, dim=-1)
        q = q.repeat_interleave(4, dim=0).reshape(b * 4, 16, 16)
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).reshape(b, 2, 2, 4, 4, 16).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(b, 8, 8, 16).permute(0, 3, 1, 2)
        return y + m.mean((2, 3), keepdim=True) if self.also else y


class _Flip(nn.Module):
    def forward(self, x):
        return torch.flip(nn.functional.max_pool2d(x, 2), dims=(2,))


def test_global_queries_convert_and_island_failures_name_the_node():
    torch.manual_seed(0)
    model = _GlobalQueryViT(nn.MaxPool2d(3, 2, 1))
    green = gmc.convert(model, img_size=64)
    island = next(p for p in green.report.passes if p.name == "dense-island")
    assert island.counts == {"map broadcast over windows -> per-token rows": 1, "token map -> dense map": 1}
    images, visible = torch.randn(2, 3, 64, 64), random_mask(2, green.mask_grid, 0.5)
    with torch.no_grad():
        assert rel_err(green(images, torch.ones_like(visible)).last.to_dense(), model(images)) < 1e-5
    with pytest.raises(gmc.UnsupportedOperationError) as exc:
        gmc.convert(_GlobalQueryViT(_Flip()), img_size=64)
    assert "flip" in str(exc.value) and "'pool' (_Flip)" in str(exc.value)
    with pytest.raises(
        gmc.UnsupportedOperationError, match="does not tile in windows the 4x4 grid of max_pool2d"
    ) as exc:
        gmc.convert(_GlobalQueryViT(nn.MaxPool2d(3, 2, 1), also_elsewhere=True), img_size=64)
    assert "node 'repeat_interleave'" in str(exc.value)


class _PaddedGrid(nn.Module):
    """A patch embedding, then the 16x16 token grid padded and used as ``misuse`` says."""

    def __init__(self, misuse: str):
        super().__init__()
        self.misuse = misuse
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.embed(x).permute(0, 2, 3, 1)
        if self.misuse == "rolled":
            return nn.functional.pad(torch.roll(y, 1, 1), (0, 0, 0, 2, 0, 2))[:, :16, :16]
        if self.misuse == "reflect":
            return nn.functional.pad(y.permute(0, 3, 1, 2), (0, 2, 0, 2), mode="reflect")[:, :, :16, :16]
        if self.misuse == "channels":
            return nn.functional.pad(y, (0, 2))
        if self.misuse == "pool":  # a row and a column before the image: pooled cells would mix image and padding
            padded = nn.functional.pad(y, (0, 0, 1, 1, 1, 1)).permute(0, 3, 1, 2)
            return nn.functional.max_pool2d(padded, 2).permute(0, 2, 3, 1)[:, 1:, 1:]
        padded = nn.functional.pad(y, (0, 0, 0, 2, 0, 2))
        if self.misuse == "conv":
            return (self.conv(padded.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + padded)[:, :16, :16]
        return padded[:, 1:17, :16]  # crops an image row


@pytest.mark.parametrize(
    "misuse, words",
    [
        ("rolled", "pad of rolled tokens"),
        ("reflect", "reflect pad"),
        ("channels", "not one whole side of the grid"),
        ("conv", "conv2d.default of a padded grid onto another grid"),
        ("pool", "a pooled cell would hold image and padded positions together"),
        ("crop", "that does not remove padded positions only"),
    ],
)
def test_padded_grid_refusals_name_why(misuse: str, words: str):
    """Padded positions are constant tokens of the padded grid only: what would move them onto another grid, pad
    image values or rolled tokens, or crop image positions is refused, naming the node and its source line."""
    with pytest.raises(gmc.UnsupportedOperationError) as exc:
        gmc.convert(_PaddedGrid(misuse).eval(), img_size=64)
    assert words in str(exc.value) and "test_errors.py" in str(exc.value)
