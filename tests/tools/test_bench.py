"""The benchmark runs end to end, and its activation counter gives known answers."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
from test_cli import SWIN, TINY, TV_SWIN, TV_TINY
from typer.testing import CliRunner

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask
from greenmim_convert.mim.dense import SimMIMDense
from greenmim_convert.tools import models
from greenmim_convert.tools.bench import (
    SavedTensorCounter,
    census_rows,
    exact_attention_fraction,
    measure_grouping,
    run_bench,
)
from greenmim_convert.tools.cli import app

# the tiny Swin's stages at 128px: grids 32, 16, 8 with 4x4 windows, each stage one plain and one
# shifted block, so six groupings; stage 3's window covers its whole 4x4 grid (per-sample attention)
GROUPINGS = {(32, (0, 0)), (32, (2, 2)), (16, (0, 0)), (16, (2, 2)), (8, (0, 0)), (8, (2, 2))}


def check_bench_json(data: dict) -> None:
    for side in ("dense", "green"):
        for key in ("time_median_s", "time_spread_s", "saved_bytes", "flops"):
            assert key in data[side]
        assert data[side]["time_median_s"] > 0 and data[side]["saved_bytes"] > 0 and data[side]["flops"] > 0
    for key in ("speedup", "saved_bytes_reduction", "flops_ratio", "flops_vs_ideal"):
        assert data[key] > 0 and data[key] == data[key] and data[key] != float("inf")
    assert {(g["grid"][0], tuple(g["shift"])) for g in data["grouping"]} == GROUPINGS
    assert len(data["grouping"]) == len(GROUPINGS)
    assert all(g["window"] == [4, 4] and g["padding_overhead"] >= 1.0 for g in data["grouping"])


@pytest.fixture(scope="module")
def tiny_swin():
    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, img_size=128)
    model = timm.create_model(SWIN, pretrained=False, **kwargs).eval()
    return model, gmc.convert(model)


def test_saved_tensor_counter_known_answer():
    a = torch.randn(100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    counter = SavedTensorCounter(exclude=[w])
    with counter():
        b = a.exp()  # saves its result b: 400 bytes
        c = b.sin()  # saves b again: same storage, counted once
        d = (c * w).sum()  # saves c (400 bytes) and w (excluded, like a parameter)
    d.backward()
    assert counter.bytes == 800


def test_saved_tensor_census_known_answer():
    """Bytes per autograd node kind: a storage saved by two nodes is charged to the earlier one, a custom
    Function's saved tensors count under its own node, and the kinds sum to the counter's total."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    a = torch.randn(100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    counter = SavedTensorCounter(exclude=[w])
    with counter():
        b = a.exp()  # ExpBackward0 saves b (400 bytes)
        c = b.sin()  # SinBackward0 saves b too: charged to the earlier ExpBackward0
        d = Square.apply(c)  # SquareBackward saves c (400 bytes)
        e = (d * w).sum()  # MulBackward0 saves d (400 bytes) and w (excluded)
    census = counter.census(e)
    assert census == {"ExpBackward0": 400, "SquareBackward": 400, "MulBackward0": 400}
    assert sum(census.values()) == counter.bytes == 1200
    partial = counter.census(c)  # the nodes after c (Square, Mul) are out of reach from c's graph
    assert partial == {"ExpBackward0": 400, "(unattributed)": 800}
    e.backward()


def test_census_rows_keep_the_totals():
    saved = {"dense": {"A": 50, "B": 30, "C": 5, "D": 1}, "green": {"A": 10, "E": 40, "D": 2}}
    rows = census_rows(saved, top=2)
    assert rows[:2] == [("A", 50, 10), ("E", 0, 40)]
    assert rows[2] == ("(3 other kinds)", 36, 2)
    for i, side in ((1, "dense"), (2, "green")):
        assert sum(r[i] for r in rows) == sum(saved[side].values())


def test_bench_census_sums_to_the_total_and_profile_lists_ops(tiny_swin):
    """On a real model: each side's census sums to its bytes saved for backward, the converted side is saved by
    the converted graph's own ops (no convolution: the patch embedding is a per-patch linear), and
    ``profile`` lists the top ops of each side by self CPU time."""
    model, green = tiny_swin
    res = run_bench(model, green, batch_size=2, mask_ratio=0.75, steps=1, warmup=0, profile=4)
    for side, stats in (("dense", res.dense), ("green", res.green)):
        census = res.saved_by_node[side]
        assert sum(census.values()) == stats.saved_bytes and "(unattributed)" not in census
        rows = res.profile[side]
        assert len(rows) == 4 and all(r.op for r in rows) and any(r.op.startswith("aten::") for r in rows)
        assert [r.self_cpu_ms for r in rows] == sorted((r.self_cpu_ms for r in rows), reverse=True)
        assert rows[0].self_cpu_ms > 0 and all(r.calls >= 1 for r in rows)
    assert res.saved_by_node["dense"].get("ConvolutionBackward0", 0) > 0
    assert "ConvolutionBackward0" not in res.saved_by_node["green"]
    assert run_bench(model, green, batch_size=2, steps=1, warmup=0).profile == {}


def test_bench_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", SWIN, *TINY, "--batch-size", "2", "--steps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    check_bench_json(json.loads(out.read_text()))
    assert "dense / converted" in res.output and "forward_features" in res.output
    assert "by the autograd node that saved them" in res.output and "self CPU" not in res.output


def test_bench_cli_threads(tmp_path):
    """--threads sets the CPU threads both models run on, and says so in the header and the JSON."""
    out, before = tmp_path / "bench.json", torch.get_num_threads()
    try:
        res = CliRunner().invoke(
            app, ["bench", SWIN, *TINY, "--batch-size", "2", "--steps", "1", "--threads", "1", "--json", str(out)]
        )
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["cpu_threads"] == 1
    assert "1 CPU threads" in " ".join(res.output.split())
    bad = CliRunner().invoke(app, ["bench", SWIN, *TINY, "--threads", "-2"])
    assert bad.exit_code != 0 and "--threads" in bad.output


def test_bench_cli_profile():
    res = CliRunner().invoke(app, ["bench", SWIN, *TINY, "--batch-size", "2", "--steps", "1", "--profile"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "dense step: top ops by self CPU time" in text and "converted step: top ops by self CPU time" in text
    assert "aten::" in text


def test_bench_cli_torchvision(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", TV_SWIN, *TV_TINY, "--batch-size", "2", "--steps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    check_bench_json(data)
    assert data["model"] == TV_SWIN and data["img_size"] == [128, 128]
    assert "SimMIM-style forward " in " ".join(res.output.split())


def test_measure_grouping_reads_the_digit_windows(tiny_swin):
    _, green = tiny_swin
    visible = random_mask(2, green.mask_grid, 0.75, generator=torch.Generator().manual_seed(1))
    rows = measure_grouping(green, visible, repeats=1)
    assert {(r.grid[0], tuple(r.shift)) for r in rows} == GROUPINGS
    for r in rows:
        assert r.window == [4, 4] and r.time_ms > 0
        assert r.tokens == int(visible.sum()) * (r.grid[0] // 4) ** 2
        assert r.lower_bound <= r.logits and r.padding_overhead == r.logits / r.lower_bound


def test_exact_attention_fraction_weights_logits_by_width(tiny_swin):
    """Needed over computed logits, each attention call weighted by its q width (= the stage's channels here)."""
    _, green = tiny_swin
    visible = random_mask(2, green.mask_grid, 0.75, generator=torch.Generator().manual_seed(2))
    width = {32: 32, 16: 64, 8: 128}
    rows = measure_grouping(green, visible, repeats=1)
    needed = sum(r.lower_bound * width[r.grid[0]] for r in rows)
    computed = sum(r.logits * width[r.grid[0]] for r in rows)
    counts = visible.flatten(1).sum(1)  # stage 3's 4x4 grid is the mask grid: two per-sample blocks of width 256
    needed += 2 * 256 * int((counts * counts).sum())
    computed += 2 * 256 * len(counts) * int(counts.max()) ** 2
    frac = exact_attention_fraction(green, visible)
    assert 0 < frac < 1 and frac == pytest.approx(needed / computed)


class TinyNet(nn.Module):
    """Not a timm model and without ``forward_features``: a patchify conv, a token MLP, a 2x2 merge."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.mlp = nn.Linear(16, 16)
        self.merge = nn.Conv2d(16, 32, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.merge(x)


def test_run_bench_on_a_model_that_is_not_timm():
    torch.manual_seed(0)
    model = TinyNet().train()
    green = gmc.convert(model, img_size=32)
    res = run_bench(model, green, batch_size=2, mask_ratio=0.5, steps=1)
    assert res.model == "TinyNet" and res.grouping == [] and res.flops_vs_ideal == pytest.approx(1.0)
    assert res.dense.flops > res.green.flops > 0 and res.dense.saved_bytes > 0


def test_simmim_baseline_runs_forward_of_torchvision_models():
    """Without forward_features the baseline is the model's forward, with the mask token after its patchify conv."""
    torch.manual_seed(0)
    small = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=(4, 4))
    model = models.build(TV_SWIN, small).model.eval()
    dense = SimMIMDense(model, 32)
    assert dense.stem is model.features[0][0]
    images = torch.randn(2, 3, 128, 128)
    visible = random_mask(2, (4, 4), 0.5)
    with torch.no_grad():
        dense.mask_token.normal_()
        plain = model(images)
        assert torch.equal(dense(images, torch.ones_like(visible)), plain)
        masked = dense(images, visible)
    assert masked.shape == plain.shape == (2, 1000) and not torch.equal(masked, plain)
    assert not dense.stem._forward_hooks


def test_simmim_baseline_finds_the_stem_of_a_one_channel_model():
    """The mask token goes after the conv reading the model's own image channels (here 1), not 3."""
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        in_chans=1,
        img_size=64,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 1),
        window_size=2,
    ).eval()
    dense = SimMIMDense(model, 32)
    assert dense.stem is model.patch_embed.proj and dense.stem.in_channels == 1
    visible = random_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense.mask_token.normal_()
        images = torch.randn(2, 1, 64, 64)
        assert not torch.equal(dense(images, visible), dense(images, torch.ones_like(visible)))


def _benchmark_script(name: str):
    """A script of ``benchmarks/`` loaded as a module."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_script_smoke(tmp_path):
    sweep = _benchmark_script("sweep")
    rows = [dict(model="m", batch_size=2, mask_ratio=r, speedup=1 + r, memory_ratio=2 + r) for r in (0.5, 0.75)]
    sweep.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_families_script_repeats_and_threads(tmp_path, capsys):
    """benchmarks/families.py measures a model --repeats times (median and range) on --threads threads."""
    families = _benchmark_script("families")
    out, before = tmp_path / "f.json", torch.get_num_threads()
    try:
        families.main(
            [
                "--models",
                "convnext_atto",
                "--batch-size",
                "1",
                "--steps",
                "1",
                "--repeats",
                "2",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(before)
    (r,) = json.loads(out.read_text())
    assert r["repeats"] == 2 and len(r["speedup_runs"]) == 2 and r["cpu_threads"] == 1
    assert min(r["speedup_runs"]) <= r["speedup"] <= max(r["speedup_runs"])
    assert f"({min(r['speedup_runs']):.2f}-{max(r['speedup_runs']):.2f})" in capsys.readouterr().out


def test_transformers_matrix_script(capsys):
    """benchmarks/transformers_matrix.py: a converting model with its canonicalize rewrites and masked errors, and
    Hiera's backbone (groups spanning the image) converted with whole-sample masks."""
    pytest.importorskip("transformers")
    matrix = _benchmark_script("transformers_matrix")
    before = torch.get_num_threads()
    try:
        matrix.main(["--types", "hiera"])
    finally:
        torch.set_num_threads(before)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == {"`hiera`", "`hiera/backbone`"}
    converts, _, rewrote, errors = rows["`hiera`"]
    assert converts == "yes" and "max(dim).values -> amax: " in rewrote
    assert all(float(e) <= 1e-10 for e in errors.split(" / "))
    converts, _, _, errors = rows["`hiera/backbone`"]
    assert converts == "yes, whole samples only" and all(float(e) <= 1e-10 for e in errors.split(" / "))


def test_simmim_baseline_masks_the_stem_of_any_family():
    """The dense baseline puts its mask token after the image convolution, whatever the family calls it."""
    import timm

    import greenmim_convert as gmc
    from greenmim_convert.api.masking import random_mask

    small = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    model = timm.create_model("davit_tiny", pretrained=False, **small).eval()
    green = gmc.convert(model)
    dense = SimMIMDense(model, green.mask_unit)
    assert dense.stem is model.stem.conv
    images = torch.randn(2, 3, *green.img_size)
    visible = random_mask(2, green.mask_grid, 0.5)
    with torch.no_grad():
        dense.mask_token.normal_()
        masked = dense(images, visible)
        plain = model.forward_features(images)
        dense.mask_token.add_(1.0)
        other_token = dense(images, visible)
    assert masked.shape == plain.shape and not torch.equal(masked, plain)
    assert not torch.equal(masked, other_token)
    assert not dense.stem._forward_hooks
