"""The pre-training example: it learns, resumes bit-identically, runs under DDP, and exports timm weights."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import List

import pytest
import timm
import torch
import torch.multiprocessing as mp

import greenmim_convert as gmc

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("skimage", reason="the demo data needs scikit-image (the examples extra)")

import load_into_timm  # noqa: E402
import pretrain  # noqa: E402

TINY = [
    "--model", "swin_tiny_patch4_window7_224", "--model-arg", "embed_dim=32", "--model-arg", "depths=[2,2,2,2]",
    "--model-arg", "num_heads=[1,2,4,8]", "--model-arg", "window_size=4", "--img-size", "128",
    "--decoder-dim", "64", "--decoder-depth", "1", "--decoder-heads", "2",
    "--batch-size", "8", "--demo-size", "64", "--workers", "0", "--no-progress", "--threads", "2",
    "--no-malloc-tuning",  # leave the test process's allocator alone (a subprocess test checks the tuning)
]


def run(out: Path, *extra: str, plot: bool = False) -> "pretrain.TrainResult":
    """One in-process pre-training run of the tiny Swin; the caller's global RNG is left untouched."""
    argv = TINY + ["--out", str(out), *extra] + ([] if plot else ["--no-plot"])
    with torch.random.fork_rng(devices=[]):
        return pretrain.main(argv)


def log_losses(out: Path) -> List[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 steps without interruption, checkpoints every 10."""
    out = tmp_path_factory.mktemp("straight")
    return run(out, "--steps", "20", "--ckpt-every", "10", "--seed", "3")


def test_loss_goes_down_on_demo_photos(tmp_path):
    result = run(tmp_path, "--steps", "30", "--ckpt-every", "0", "--lr", "1e-3", "--seed", "1", plot=True)
    losses = result.losses
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (first, last)
    assert log_losses(tmp_path) == losses
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "last.pt").exists()


def test_dense_baseline_learns_and_exports(tmp_path):
    """--dense: the unconverted encoder with a SimMIM mask token, the same decoder and loss, learns like the converted
    one; its checkpoint exports timm weights and does not resume a converted run."""
    result = run(tmp_path, "--dense", "--steps", "30", "--ckpt-every", "0", "--lr", "1e-3", "--seed", "1")
    losses = result.losses
    assert isinstance(result.model.encoder, pretrain.DenseEncoder)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (first, last)
    assert result.model.encoder.mask_token.grad is None and result.model.encoder.mask_token.abs().sum() > 0
    report = load_into_timm.export_encoder(str(tmp_path / "last.pt"), str(tmp_path / "encoder.safetensors"))
    assert report["keys_ok"] and report["missing_backbone_keys"] == [] and report["unexpected_keys"] == []
    with pytest.raises(SystemExit, match="same --dense"):
        run(tmp_path, "--steps", "31", "--ckpt-every", "0", "--seed", "1", "--resume")


def test_dense_encoder_reads_the_units_the_converted_one_reads():
    """All units visible and the same weights: the dense baseline's unit features equal the converted encoder's."""
    args = pretrain.build_parser().parse_args(TINY)
    converted, _ = pretrain.build_model(args, dense=False)
    dense, _ = pretrain.build_model(args, dense=True)
    dense.load_state_dict(converted.state_dict(), strict=False)
    dense.encoder.model.load_state_dict(converted.encoder.state_dict())
    converted.eval(), dense.eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    visible = torch.ones(2, 4, 4, dtype=torch.bool)
    visible[0, 1, 2] = False  # a hidden unit: the mask token changes the dense features, not which units are read
    with torch.no_grad():
        fc, ic = converted.unit_tokens(converted.encoder(x, torch.ones_like(visible)).last)
        fd, idx = dense.unit_tokens(dense.encoder(x, torch.ones_like(visible)).last)
        _, masked_idx = dense.unit_tokens(dense.encoder(x, visible).last)
    assert torch.equal(ic, idx) and float((fc - fd).abs().max() / fd.abs().max()) <= 1e-5
    assert masked_idx.tolist() == [i for i in range(32) if i != 6]


def test_keep_ckpts_keeps_the_newest(tmp_path):
    run(tmp_path, "--steps", "3", "--ckpt-every", "1", "--keep-ckpts", "2")
    assert sorted(f.name for f in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000002.pt", "ckpt-0000003.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3


def test_prune_never_deletes_the_checkpoint_last_points_to(tmp_path):
    """Resumed from an early checkpoint into a directory that still holds later ones: the newest K by step stay,
    and so does the one just written (the one last.pt copies)."""
    for step in range(1, 6):
        (tmp_path / f"ckpt-{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "notes.pt").write_bytes(b"x")
    assert pretrain.prune_checkpoints(tmp_path, 0, tmp_path / "ckpt-0000002.pt") == []
    deleted = pretrain.prune_checkpoints(tmp_path, 2, tmp_path / "ckpt-0000002.pt")
    assert sorted(f.name for f in deleted) == ["ckpt-0000001.pt", "ckpt-0000003.pt"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt-0000002.pt", "ckpt-0000004.pt", "ckpt-0000005.pt", "notes.pt"]


def test_bench_steps_times_both_encoders(tmp_path, capsys):
    results = pretrain.main(TINY + ["--out", str(tmp_path), "--bench-steps", "1", "--batch-size", "4"])
    assert set(results) == {"converted", "dense"}
    for r in results.values():
        assert len(r.step_s) == 1 and r.images_per_s > 0 and r.faults_per_step >= 0
    assert "converted / dense" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.pt"))


MALLOC_PROBE = """
import sys, torch
sys.path.insert(0, {examples!r})
import pretrain
note = pretrain.tune_malloc() if sys.argv[1] == "tuned" else None
faults = []
for i in range(6):
    before = pretrain.minor_faults()
    x = torch.empty(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    faults.append(pretrain.minor_faults() - before)
print(note, min(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_malloc_tuning_stops_page_faults_of_freed_memory(tmp_path):
    """A freed 64 MiB block is faulted in again on every allocation with glibc's defaults, not once tuned."""
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text(MALLOC_PROBE.format(examples=str(EXAMPLES)))
    out = {}
    for mode in ("default", "tuned"):
        proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        note, faults = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
        out[mode] = (note, int(faults))
    if out["tuned"][0] == "None":
        pytest.skip("not glibc")
    assert "M_MMAP_MAX=0" in out["tuned"][0]
    assert out["default"][1] > 10000 and out["tuned"][1] < 100, out


OTHER_FAMILIES = {
    # FCMAE-style: ConvNeXt V2 with GRN over visible positions; MaxViT with BatchNorm over visible positions
    "convnextv2": ["--model", "convnextv2_atto", "--model-arg", "depths=[1,1,2,1]", "--model-arg", "dims=[16,32,48,64]"],
    "maxvit": ["--model", "maxvit_rmlp_pico_rw_256", "--model-arg", "depths=[1,1,1,1]",
               "--model-arg", "embed_dim=[32,64,128,256]"],
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_learn(family, tmp_path):
    """A short pre-training run of a tiny ConvNeXt V2 and MaxViT: the loss is finite and falls."""
    argv = TINY[TINY.index("--img-size"):] + OTHER_FAMILIES[family] + ["--out", str(tmp_path), "--no-plot", "--steps", "30",
                                                   "--ckpt-every", "0", "--lr", "1e-3", "--seed", "1"]
    with torch.random.fork_rng(devices=[]):
        losses = pretrain.main(argv).losses
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (first, last)


def test_resume_is_bit_identical(straight, tmp_path):
    first = run(tmp_path, "--steps", "20", "--ckpt-every", "10", "--seed", "3", "--stop-after", "10")
    assert first.step == 10 and (tmp_path / "last.pt").exists()
    resumed = run(tmp_path, "--steps", "20", "--ckpt-every", "10", "--seed", "3", "--resume")
    assert resumed.step == 20 and len(resumed.losses) == 10
    assert first.losses + resumed.losses == straight.losses
    assert log_losses(tmp_path) == straight.losses
    assert_same_params(resumed.model, straight.model)
    a = torch.load(tmp_path / "last.pt", weights_only=True)
    b = torch.load(straight.out_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in group_a:
            assert torch.equal(group_a[k], group_b[k])
    assert torch.equal(a["rng"][0]["masks"], b["rng"][0]["masks"])


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    """Without drop-path, 2 x 4 accumulated images give the gradient of one batch of 8 (masks hide equal counts)."""
    common = ["--steps", "1", "--ckpt-every", "0", "--model-arg", "drop_path_rate=0", "--seed", "5"]
    big = run(tmp_path / "big", *common, "--batch-size", "8")
    accum = run(tmp_path / "accum", *common, "--batch-size", "4", "--accum-steps", "2")
    assert big.losses[0] == pytest.approx(accum.losses[0], rel=1e-5)
    norms = [json.loads((out / "log.jsonl").read_text())["grad_norm"] for out in (tmp_path / "big", tmp_path / "accum")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    for (k, p), q in zip(big.model.state_dict().items(), accum.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_autocast_runs(tmp_path):
    result = run(tmp_path, "--steps", "2", "--ckpt-every", "0", "--bf16", "--accum-steps", "2", "--batch-size", "4")
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)


def test_image_folder_data(tmp_path):
    from PIL import Image

    photos = pretrain.load_demo_photos(256)
    for i in range(8):
        folder = tmp_path / "data" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[i % len(photos)].permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg")
    result = run(tmp_path / "out", "--data", str(tmp_path / "data"), "--steps", "2", "--ckpt-every", "0", "--batch-size", "4")
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    argv = TINY + ["--out", out, "--steps", "3", "--ckpt-every", "0", "--no-plot", "--threads", "1", "--batch-size", "4"]
    result = pretrain.main(argv)
    torch.save({"losses": result.losses, "state": result.model.state_dict()}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_stay_in_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len(r0["losses"]) == 3 and all(math.isfinite(v) for v in r0["losses"])
    assert r0["losses"] == r1["losses"]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert len(log_losses(tmp_path)) == 3
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_exported_weights_load_into_dense_timm(straight, tmp_path):
    out = tmp_path / "encoder.safetensors"
    report = load_into_timm.export_encoder(str(straight.out_dir / "last.pt"), str(out))
    assert report["keys_ok"] and report["missing_backbone_keys"] == [] and report["unexpected_keys"] == []
    assert report["missing_head_keys"] == ["head.fc.bias", "head.fc.weight"]
    assert report["max_rel_err"] <= 1e-5

    from safetensors.torch import load_file

    state = load_file(str(out))
    dense = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                              window_size=4, img_size=128, num_classes=10)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight"] and unexpected == []
    dense.eval()
    green = straight.model.encoder.eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    visible = torch.ones(2, *green.mask_grid, dtype=torch.bool)
    with torch.no_grad():
        ref = dense.forward_features(x).permute(0, 3, 1, 2)
        got = green(x, visible).last.to_dense()
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert load_into_timm.main([str(straight.out_dir / "last.pt"), "-o", str(tmp_path / "encoder.pt")]) == 0
    assert torch.load(tmp_path / "encoder.pt", weights_only=True).keys() == state.keys()


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_loss_is_masked_mse_on_normalised_pixels(ratio):
    """The loss (pixel head on hidden units only) equals the mean squared error, over the hidden units, between the
    full decoder output and each unit's normalised pixels; gradients agree too. No hidden unit: zero loss."""
    args = pretrain.build_parser().parse_args(TINY + ["--out", "unused"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = pretrain.build_model(args)[0].eval()  # no drop-path: both passes see the same encoder
        gen = torch.Generator().manual_seed(4)
        images = torch.randn(3, 3, 128, 128, generator=gen)
        visible = gmc.random_mask(3, model.encoder.mask_grid, ratio, generator=gen)
        loss = model(images, visible)
        got = torch.autograd.grad(loss, list(model.decoder.parameters()), allow_unused=True)
        feats, flat = model.unit_tokens(model.encoder(images, visible).last)
        pred = model.decoder(feats, flat, 3)
        target = pretrain.patchify(images, model.unit)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        hidden = (~visible).flatten(1)
        want = (pred - target).pow(2).mean(-1)[hidden].mean() if hidden.any() else 0.0 * pred.sum()
        want_grads = torch.autograd.grad(want, list(model.decoder.parameters()), allow_unused=True)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want_grads):
        assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, rtol=1e-4, atol=1e-6))
