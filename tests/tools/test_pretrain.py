"""MIM pre-training (greenmim_convert.mim and ``greenmim-convert pretrain``/``export``): every model source learns,
resuming is bit-identical, DDP and FSDP2 run, exports load into the source model, masks and configs behave."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import timm
import torch
from typer.testing import CliRunner

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.mim import (
    BlockMask,
    MIMModel,
    RandomMask,
    UniformMask,
    build_mim,
    export,
    patchify,
    resolve,
    run,
)
from greenmim_convert.mim.checkpoint import prune_checkpoints
from greenmim_convert.mim.config import read_file
from greenmim_convert.mim.export import load_mim
from greenmim_convert.mim.logs import TENSORBOARD_MISSING, TensorBoard
from greenmim_convert.oracle.verify import reference_of
from greenmim_convert.tools import models
from greenmim_convert.tools.cli import app

pytest.importorskip("skimage", reason="the demo data needs scikit-image (the examples extra)")

runner = CliRunner()
# two-stage models at 64px: mask units of 8px, an 8x8 mask grid
SOURCES = {
    "timm": [
        "swin_tiny_patch4_window7_224",
        "--model-arg",
        "embed_dim=16",
        "--model-arg",
        "depths=[1,1]",
        "--model-arg",
        "num_heads=[1,2]",
        "--model-arg",
        "window_size=4",
    ],
    "torchvision": [
        "torchvision:swin_t",
        "--model-arg",
        "embed_dim=24",
        "--model-arg",
        "depths=[1,1]",
        "--model-arg",
        "num_heads=[1,2]",
        "--model-arg",
        "window_size=[4,4]",
    ],
    "hf": [
        "hf:swin",
        "--model-arg",
        "embed_dim=16",
        "--model-arg",
        "depths=[1,1]",
        "--model-arg",
        "num_heads=[1,2]",
        "--model-arg",
        "window_size=4",
    ],
    "factory": [
        "scratch_models:ScratchViT",
        "--model-arg",
        "embed=24",
        "--model-arg",
        "depths=[1,1]",
        "--model-arg",
        "heads=[1,2]",
        "--model-arg",
        "window=4",
    ],
}
COMMON = [
    "--img-size",
    "64",
    "--decoder-dim",
    "32",
    "--decoder-depth",
    "1",
    "--decoder-heads",
    "2",
    "--batch-size",
    "8",
    "--demo-size",
    "32",
    "--workers",
    "0",
    "--no-progress",
    "--threads",
    "1",
    "--no-malloc-tuning",
    "--no-plot",
    "--no-tensorboard",
]
TINY = dict(
    model="swin_tiny_patch4_window7_224",
    img_size=64,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
    model_args=dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
    batch_size=8,
    demo_size=32,
    workers=0,
    progress=False,
    threads=1,
    malloc_tuning=False,
    plot=False,
    tensorboard=False,
)


def pretrain(*args: str) -> None:
    """``greenmim-convert pretrain ARGS``, the caller's global RNG left untouched."""
    with torch.random.fork_rng(devices=[]):
        res = runner.invoke(app, ["pretrain", *args])
    assert res.exit_code == 0, (res.output, res.exception)


def train(out: Path, **settings):
    with torch.random.fork_rng(devices=[]):
        return run(resolve(None, {**TINY, "out": str(out), **settings}))


def log_losses(out: Path) -> List[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def assert_learns(losses: List[float], steps: int = 30) -> None:
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (first, last)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """30 steps of each model source through the command; the timm run also draws reconstructions and logs
    TensorBoard events."""
    out = {}
    for source, model in SOURCES.items():
        path = tmp_path_factory.mktemp(source)
        extra = ["--tensorboard", "--vis-every", "15"] if source == "timm" else []
        pretrain(
            *model,
            *COMMON,
            *extra,
            "--steps",
            "30",
            "--ckpt-every",
            "0",
            "--lr",
            "2e-3",
            "--seed",
            "1",
            "--out",
            str(path),
        )
        out[source] = path
    return out


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_model_source_learns(runs, source):
    assert_learns(log_losses(runs[source]))
    assert (runs[source] / "last.pt").exists() and (runs[source] / "config.toml").exists()


def test_reports_reconstructions_and_tensorboard(runs):
    out = runs["timm"]
    assert sorted(p.name for p in out.glob("recon-*.png")) == ["recon-0000015.png", "recon-0000030.png"]
    from PIL import Image

    assert Image.open(out / "recon-0000030.png").size == (3 * 64, 4 * 64)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert len(events.Scalars("loss")) == 30 and [e.step for e in events.Images("reconstruction")] == [15, 30]


def test_tensorboard_missing_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    board = TensorBoard(tmp_path, enabled=True)
    board.scalars(1, {"loss": 1.0})
    assert capsys.readouterr().err.count(TENSORBOARD_MISSING) == 1 and not list(tmp_path.iterdir())


def _outputs(model: torch.nn.Module, source: str, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x) if source == "timm" else model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_export_loads_into_the_source_model(runs, source, tmp_path):
    """The exported encoder, loaded the source's own way, computes what the run's encoder computes."""
    res = runner.invoke(app, ["export", str(runs[source]), "--to", str(tmp_path)])
    assert res.exit_code == 0, res.output
    trained = load_mim(str(runs[source])).encoder.source_model.eval()
    if source == "timm":
        kwargs = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, img_size=64)
        loaded = timm.create_model(
            SOURCES["timm"][0],
            pretrained=True,
            num_classes=10,
            **kwargs,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
        )
    elif source == "hf":
        from transformers import AutoModel

        loaded = AutoModel.from_pretrained(str(tmp_path))
    else:
        meta = json.loads((tmp_path / "export.json").read_text())
        loaded = models.build(meta["model_name"], meta["model_kwargs"], 64).model
        loaded.load_state_dict(torch.load(tmp_path / "state_dict.pt", weights_only=True))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_outputs(loaded.eval(), source, x), _outputs(trained, source, x))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 steps without interruption, checkpoints every 4."""
    return train(tmp_path_factory.mktemp("straight"), steps=8, ckpt_every=4, seed=3)


def test_resume_is_bit_identical(straight, tmp_path):
    first = train(tmp_path, steps=8, ckpt_every=4, seed=3, stop_after=4)
    assert first.step == 4 and (tmp_path / "last.pt").exists()
    resumed = train(tmp_path, steps=8, ckpt_every=4, seed=3, resume="auto")
    assert resumed.step == 8 and first.losses + resumed.losses == straight.losses
    assert log_losses(tmp_path) == straight.losses
    a = torch.load(tmp_path / "last.pt", weights_only=True)
    b = torch.load(straight.out_dir / "last.pt", weights_only=True)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert torch.equal(a["rng"][0]["masks"], b["rng"][0]["masks"])


def test_keep_ckpts_keeps_the_newest(tmp_path):
    train(tmp_path, steps=3, ckpt_every=1, keep_ckpts=2, batch_size=4)
    assert sorted(f.name for f in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000002.pt", "ckpt-0000003.pt"]


def test_prune_never_deletes_the_checkpoint_last_points_to(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"ckpt-{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "notes.pt").write_bytes(b"x")
    assert prune_checkpoints(tmp_path, 0, tmp_path / "ckpt-0000002.pt") == []
    deleted = prune_checkpoints(tmp_path, 2, tmp_path / "ckpt-0000002.pt")
    assert sorted(f.name for f in deleted) == ["ckpt-0000001.pt", "ckpt-0000003.pt"]


def test_dense_simmim_with_linear_head_learns_and_exports(tmp_path):
    """--dense --decoder linear is SimMIM (mask token at hidden units, a linear head reading them); it exports
    and does not resume a converted run."""
    result = train(tmp_path, dense=True, decoder="linear", steps=30, lr=2e-3, seed=1)
    assert_learns(result.losses)
    assert result.model.encoder.mask_token.grad is None and result.model.encoder.mask_token.abs().sum() > 0
    assert export(str(tmp_path), str(tmp_path / "export")).num_tensors > 0
    with pytest.raises(InvalidInputError, match="same --dense"):
        train(tmp_path, steps=31, seed=1, resume="auto")


def test_linear_head_needs_the_dense_encoder():
    cfg = resolve(None, {**TINY, "decoder": "linear"})
    with pytest.raises(InvalidInputError, match="converted encoder computes none"):
        build_mim(cfg)


class _Reference(torch.nn.Module):
    """The dense masked reference of a source model, as a MIM encoder."""

    def __init__(self, green):
        super().__init__()
        self.green = green
        self.mask_unit, self.mask_grid, self.img_size = green.mask_unit, green.mask_grid, green.img_size

    def forward(self, images, visible):
        return reference_of(self.green.source_model, self.green, images, visible)


def test_mim_loss_of_converted_equals_dense_masked_reference_float64():
    """Same batch and per-sample masks: the MIM loss and every gradient of the converted encoder's MIM model equal
    those of the dense masked reference's, in float64."""
    with torch.random.fork_rng(devices=[]):
        model = build_mim(resolve(None, TINY)).model.double().eval()
        for p in model.parameters():  # tables that start at zero get values
            p.data.add_(0.02 * torch.randn(p.shape, dtype=p.dtype))
    ref = MIMModel(_Reference(model.encoder), model.decoder, model.target)
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)
    visible = RandomMask(model.mask_grid, 0.6)(3, gen)
    params = [p for p in model.parameters()]
    got = model(images, visible).loss
    want = ref(images, visible).loss
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    assert float((got - want).detach().abs() / want.detach().abs()) <= 1e-10
    for g, w in zip(g_got, g_want):
        assert (g is None) == (w is None)
        if g is not None:
            assert float((g - w).abs().max() / w.abs().max().clamp_min(1e-300)) <= 1e-10


def test_dense_encoder_reads_the_units_the_converted_one_reads():
    """All units visible and the same weights: the dense baseline's unit features equal the converted encoder's."""
    with torch.random.fork_rng(devices=[]):
        converted = build_mim(resolve(None, TINY)).model.eval()
        dense = build_mim(resolve(None, TINY), dense=True).model.eval()
    dense.encoder.model.load_state_dict(converted.encoder.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    visible = torch.ones(2, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        a = converted.encoder(x, visible).last.feats
        b = dense.encoder(x, visible).last.feats
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_loss_is_masked_mse_on_normalised_pixels(ratio):
    """The loss (pixel head on hidden units only) equals the MSE over the hidden units between the full decoder
    output and each unit's normalised pixels; gradients agree too. No hidden unit: zero loss."""
    with torch.random.fork_rng(devices=[]):
        model = build_mim(resolve(None, TINY)).model.eval()
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, 64, 64, generator=gen)
    visible = RandomMask(model.mask_grid, ratio)(3, gen)
    loss = model(images, visible).loss
    got = torch.autograd.grad(loss, list(model.decoder.parameters()), allow_unused=True)
    from greenmim_convert.mim import unit_tokens

    feats, index = unit_tokens(model.encoder(images, visible).last, model.mask_grid)
    pred = model.decoder(feats, index, 3)
    target = patchify(images, model.unit)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    hidden = (~visible).flatten(1)
    want = (pred - target).pow(2).mean(-1)[hidden].mean() if hidden.any() else 0.0 * pred.sum()
    want_grads = torch.autograd.grad(want, list(model.decoder.parameters()), allow_unused=True)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want_grads):
        assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, rtol=1e-4, atol=1e-6))


def test_bench_steps_times_both_sides(tmp_path, capsys):
    results = train(tmp_path, bench_steps=1, batch_size=4)
    assert set(results) == {"converted", "dense"} and all(r.images_per_s > 0 for r in results.values())
    assert "converted / dense" in capsys.readouterr().out and not list(tmp_path.glob("*.pt"))


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    """Without drop-path, 2 x 4 accumulated images give the loss and gradient norm of one batch of 8 (masks hide
    equal counts). Parameters are not compared: AdamW's first step moves a parameter by about lr whatever the
    size of its gradient, and the key bias of attention has a gradient of rounding noise only."""
    args = {**TINY["model_args"], "drop_path_rate": 0.0}
    train(tmp_path / "big", steps=1, ckpt_every=0, model_args=args, seed=5)
    train(tmp_path / "accum", steps=1, ckpt_every=0, model_args=args, seed=5, batch_size=4, accum_steps=2)
    big, accum = (json.loads((tmp_path / name / "log.jsonl").read_text()) for name in ("big", "accum"))
    assert big["loss"] == pytest.approx(accum["loss"], rel=1e-5)
    assert big["grad_norm"] == pytest.approx(accum["grad_norm"], rel=1e-4)


def test_bf16_autocast_and_image_folder(tmp_path):
    from PIL import Image

    from greenmim_convert.mim.data import load_demo_photos

    photos = load_demo_photos(128)
    for i in range(8):
        folder = tmp_path / "data" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[i % len(photos)].permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg")
    result = train(tmp_path / "out", data=str(tmp_path / "data"), steps=2, bf16=True, batch_size=4, accum_steps=2)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)


# ------------------------------------------------------------------------------------------------ masks


def _grid_stats(visible: torch.Tensor) -> float:
    """Mean number of hidden 4-neighbours of a hidden unit (clustering of the hidden units)."""
    h = (~visible).float()
    pad = torch.nn.functional.pad(h, (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    return float((neighbours * h).sum() / h.sum())


def test_masks_are_seeded_and_have_their_ratios():
    grid = (14, 14)
    for gen_mask in (RandomMask(grid, 0.75), BlockMask(grid, 0.6), UniformMask(grid, 0.25)):
        a = gen_mask(16, torch.Generator().manual_seed(0))
        b = gen_mask(16, torch.Generator().manual_seed(0))
        assert a.dtype == torch.bool and a.shape == (16, *grid) and torch.equal(a, b)
        assert not torch.equal(a, gen_mask(16, torch.Generator().manual_seed(1)))
    assert (RandomMask(grid, 0.75)(16).flatten(1).sum(1) == 196 - 147).all()
    assert (BlockMask(grid, 0.6)(16).flatten(1).sum(1) == 196 - 118).all()


def test_block_masks_hide_blocks():
    """Hidden units of a block mask cluster: far more hidden neighbours than a uniform mask's at the same ratio."""
    grid = (14, 14)
    block = _grid_stats(BlockMask(grid, 0.4)(64, torch.Generator().manual_seed(0)))
    uniform = _grid_stats(RandomMask(grid, 0.4)(64, torch.Generator().manual_seed(0)))
    assert uniform == pytest.approx(4 * 0.4, abs=0.25) and block > uniform + 0.8


def test_ummae_keeps_at_most_one_unit_of_every_2x2_block():
    gen_mask = UniformMask((8, 12), 0.25)
    visible = gen_mask(32, torch.Generator().manual_seed(0))
    per_block = visible.view(32, 4, 2, 6, 2).sum((2, 4))
    assert per_block.max() == 1 and (visible.flatten(1).sum(1) == 24 - 6).all() == True  # noqa: E712
    assert (UniformMask((8, 12), 0.0)(4).view(4, 4, 2, 6, 2).sum((2, 4)) == 1).all()
    positions = visible.view(32, 4, 2, 6, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)
    used = positions[positions.any(1)].float().mean(0)
    assert (used > 0.15).all()  # every position inside a block is drawn
    with pytest.raises(InvalidInputError, match="even"):
        UniformMask((7, 8))


# ------------------------------------------------------------------------------------------------ config


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        'model = "convnextv2_atto"\nsteps = 50\nlr = 1e-3\nmask = "block"\n'
        "[model_args]\ndepths = [1, 1, 2, 1]\ndrop_path_rate = 0.1\n"
    )
    cfg = resolve(str(tmp_path / "run.toml"), {"steps": 7, "model_args": {"drop_path_rate": 0.0}})
    assert (cfg.model, cfg.steps, cfg.lr, cfg.mask, cfg.batch_size) == ("convnextv2_atto", 7, 1e-3, "block", 32)
    assert cfg.model_args == {"depths": (1, 1, 2, 1), "drop_path_rate": 0.0}
    from greenmim_convert.mim.config import save_resolved

    again = resolve(str(save_resolved(cfg, tmp_path)))
    assert again == cfg
    (tmp_path / "run.yaml").write_text("batch-size: 4\nmask_ratio: 0.6\n")
    assert resolve(str(tmp_path / "run.yaml")).batch_size == 4
    (tmp_path / "bad.toml").write_text("batch_sise = 4\n")
    with pytest.raises(InvalidInputError, match="Did you mean: batch_size"):
        resolve(str(tmp_path / "bad.toml"))
    with pytest.raises(InvalidInputError, match="must be int"):
        resolve(None, {"steps": "many"})


def test_yaml_without_pyyaml_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    (tmp_path / "run.yaml").write_text("steps: 3\n")
    with pytest.raises(InvalidInputError, match="pyyaml"):
        read_file(str(tmp_path / "run.yaml"))


def test_command_reads_config_and_saves_the_resolved_one(tmp_path):
    (tmp_path / "run.toml").write_text("steps = 50\nseed = 4\n")
    pretrain(
        *SOURCES["timm"],
        *COMMON,
        "--config",
        str(tmp_path / "run.toml"),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--batch-size",
        "4",
    )
    saved = read_file(str(tmp_path / "out" / "config.toml"))
    assert saved["steps"] == 2 and saved["seed"] == 4 and saved["batch_size"] == 4
    assert saved["model_args"]["depths"] == [1, 1]


# ------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import json, sys, torch
from pathlib import Path
from greenmim_convert.mim import resolve, run
settings = json.loads(sys.argv[1])
result = run(resolve(None, settings))
torch.save({"losses": result.losses}, Path(settings["out"]) / f"rank{sys.argv[2]}.pt")
"""


def launch(out: Path, fsdp: bool) -> None:
    """Two processes of a gloo job (as torchrun would start them), 3 steps each."""
    script = out / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    settings = json.dumps({**TINY, "out": str(out), "steps": 3, "ckpt_every": 0, "batch_size": 4, "fsdp": fsdp})
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "GLOO_SOCKET_IFNAME": "lo",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), settings, str(rank)],
                env=env,
                cwd=out,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for proc in procs:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(out, fsdp=False)
    return out


def test_ddp_two_processes_stay_in_sync(ddp):
    r0, r1 = (torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert len(r0["losses"]) == 3 and all(math.isfinite(v) for v in r0["losses"]) and r0["losses"] == r1["losses"]
    ckpt = torch.load(ddp / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_fsdp2_two_processes_train_as_ddp_does(ddp, tmp_path):
    """fully_shard of the MIM model (gloo, CPU): the same losses as DDP, and a full checkpoint with its keys."""
    launch(tmp_path, fsdp=True)
    losses = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["losses"] for r in range(2)]
    want = torch.load(ddp / "rank0.pt", weights_only=True)["losses"]
    assert losses[0] == losses[1] and losses[0] == pytest.approx(want, rel=1e-5)
    a = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    b = torch.load(ddp / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


MALLOC_PROBE = """
import sys, torch
from greenmim_convert.mim.memory import minor_faults, tune_malloc
note = tune_malloc() if sys.argv[1] == "tuned" else None
faults = []
for i in range(6):
    before = minor_faults()
    x = torch.empty(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    faults.append(minor_faults() - before)
print(note, min(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_malloc_tuning_stops_page_faults_of_freed_memory(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(MALLOC_PROBE)
    out = {}
    for mode in ("default", "tuned"):
        proc = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        note, faults = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
        out[mode] = (note, int(faults))
    if out["tuned"][0] == "None":
        pytest.skip("not glibc")
    assert "M_MMAP_MAX=0" in out["tuned"][0]
    assert out["default"][1] > 10000 and out["tuned"][1] < 100, out


@pytest.mark.slow
def test_compile_trains(tmp_path):
    """--compile: torch.compile of the MIM model trains as eager does."""
    eager = train(tmp_path / "eager", steps=3, ckpt_every=0, batch_size=4, seed=2)
    compiled = train(tmp_path / "compiled", steps=3, ckpt_every=0, batch_size=4, seed=2, compile=True)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)


OTHER_FAMILIES = {
    "convnextv2": dict(model="convnextv2_atto", model_args=dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))),
    "maxvit": dict(model="maxvit_rmlp_pico_rw_256", model_args=dict(depths=(1, 1, 1, 1), embed_dim=(32, 64, 128, 256))),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_learn(family, tmp_path):
    """FCMAE-style ConvNeXt V2 (GRN over visible positions) and MaxViT (BatchNorm over visible positions)."""
    result = train(tmp_path, img_size=128, steps=30, ckpt_every=0, lr=1e-3, seed=1, **OTHER_FAMILIES[family])
    assert_learns(result.losses)


def test_trainer_example_runs(tmp_path, monkeypatch):
    """examples/pretrain_hf_trainer.py: the MIM model inside transformers' Trainer."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    import pretrain_hf_trainer

    with torch.random.fork_rng(devices=[]):
        trainer = pretrain_hf_trainer.main(["--steps", "3", "--batch-size", "4", "--out", str(tmp_path)])
    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r] + [history[-1]["train_loss"]]
    assert trainer.state.global_step == 3 and all(math.isfinite(v) for v in losses)
