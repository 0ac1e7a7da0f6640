"""The benchmark runs end to end, and its activation counter gives known answers."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from greenmim_convert.bench import SavedTensorCounter
from greenmim_convert.cli import app

from test_cli import SWIN, TINY


def test_saved_tensor_counter_known_answer():
    a = torch.randn(100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    counter = SavedTensorCounter(exclude=[w])
    with counter():
        b = a.exp()          # saves its result b: 400 bytes
        c = b.sin()          # saves b again: same storage, counted once
        d = (c * w).sum()    # saves c (400 bytes) and w (excluded, like a parameter)
    d.backward()
    assert counter.bytes == 800


def test_bench_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", SWIN, *TINY, "--batch-size", "2", "--steps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    for side in ("dense", "green"):
        for key in ("time_median_s", "time_spread_s", "saved_bytes", "flops"):
            assert key in data[side]
        assert data[side]["time_median_s"] > 0 and data[side]["saved_bytes"] > 0 and data[side]["flops"] > 0
    for key in ("speedup", "saved_bytes_reduction", "flops_ratio", "flops_vs_ideal"):
        assert data[key] > 0 and data[key] == data[key] and data[key] != float("inf")
    assert len(data["grouping"]) == 7 and all(g["padding_overhead"] >= 1.0 for g in data["grouping"])
    assert "dense / converted" in res.output


def test_sweep_script_smoke(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rows = [dict(model="m", batch_size=2, mask_ratio=r, speedup=1 + r, memory_ratio=2 + r) for r in (0.5, 0.75)]
    sweep.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_simmim_baseline_masks_the_stem_of_any_family():
    """The dense baseline puts its mask token after the image convolution, whatever the family calls it."""
    import timm

    import greenmim_convert as gmc
    from greenmim_convert.bench import SimMIMDense
    from greenmim_convert.masking import random_mask

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
