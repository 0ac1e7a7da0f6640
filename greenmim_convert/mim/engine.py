"""The pre-training engine: one process or many (DDP, or FSDP2 with ``fsdp``), gradient accumulation, bf16
autocast, AdamW with a warm-up + cosine schedule, clipping, checkpoints every N steps with bit-identical resuming,
and the run's reports (log.jsonl, TensorBoard, progress bar, loss plot, reconstruction pictures)."""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from greenmim_convert.errors import InvalidInputError

from . import checkpoint as ck
from .build import build_mim
from .config import PretrainConfig, save_resolved
from .data import ResumableSampler, build_dataset
from .distributed import (
    Dist,
    all_mean,
    gather_objects,
    load_states,
    model_state,
    optimizer_state,
    setup_distributed,
    shard_fsdp,
    wrap_ddp,
)
from .logs import Progress, TensorBoard, read_log, restart_log, write_loss_plot
from .masks import mask_generator
from .memory import minor_faults, tune_malloc
from .model import MIMModel
from .optim import make_optimizer, make_scheduler
from .vis import reconstruction_grid, save_png

VIS_IMAGES = 4  # images in a reconstruction picture


@dataclass
class TrainResult:
    """What a call of :func:`train` did: the MIM model, the losses of its steps, where it stopped."""

    model: MIMModel
    losses: List[float]
    step: int
    out_dir: Path
    images_per_s: float
    checkpoint: Optional[Path]


def _loader(cfg: PretrainConfig, dataset, sampler: ResumableSampler, d: Dist) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _vis_batch(cfg: PretrainConfig, dataset, model: MIMModel, mask, d: Dist):
    """The fixed images and masks of the reconstruction pictures (the first items of epoch 0, seed + 7 masks)."""
    n = min(VIS_IMAGES, len(dataset))
    images = torch.stack([dataset[(i, 0)] for i in range(n)]).to(d.device)
    visible = mask(n, torch.Generator().manual_seed(cfg.seed + 7)).to(d.device)
    return images, visible


def _check_resume(ckpt: dict, cfg: PretrainConfig, path: str, d: Dist) -> None:
    if ckpt["world_size"] != d.world:
        raise InvalidInputError(f"checkpoint written by {ckpt['world_size']} processes, this run has {d.world}")
    if bool(ckpt["config"].get("dense", False)) != bool(cfg.dense):
        kind = "the dense baseline (--dense)" if ckpt["config"].get("dense") else "a converted encoder"
        raise InvalidInputError(f"{path} trains {kind}: resume it with the same --dense setting")
    if bool(ckpt.get("fsdp", False)) != bool(cfg.fsdp):
        raise InvalidInputError(
            f"{path} was written {'with' if ckpt.get('fsdp') else 'without'} --fsdp: resume it the same way"
        )


def train(cfg: PretrainConfig) -> TrainResult:
    """Run (or continue) pre-training as ``cfg`` says; rank 0 writes checkpoints and reports into ``cfg.out``."""
    d = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.fsdp and not d.enabled:
        raise InvalidInputError("--fsdp shards over the processes of a torchrun job: launch with torchrun")
    out_dir = Path(cfg.out)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out_dir)

    built = build_mim(cfg)
    model = built.model.to(d.device).train()
    torch.manual_seed(cfg.seed + 1000 * d.rank + 1)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1000 * d.rank + 2)
    mask = mask_generator(cfg.mask, model.mask_grid, cfg.mask_ratio, cfg.secondary_ratio)
    if cfg.fsdp:
        shard_fsdp(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, fused=not cfg.fsdp)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.warmup, cfg.min_lr / cfg.lr)

    step = 0
    resume_path = ck.resolve_resume(cfg.resume, out_dir, d.main)
    if resume_path:
        ckpt = ck.load_checkpoint(resume_path)
        _check_resume(ckpt, cfg, resume_path, d)
        load_states(model, optimizer, ckpt["model"], ckpt["optimizer"], cfg.fsdp)
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        ck.set_rng_state(ckpt["rng"][d.rank], mask_gen)

    net = wrap_ddp(model, d) if d.enabled and not cfg.fsdp else model
    if cfg.compile:
        net.compile()

    dataset = build_dataset(cfg.data, tuple(model.encoder.img_size), cfg.seed, cfg.demo_size, cfg.min_crop_scale)
    sampler = ResumableSampler(dataset, d.rank, d.world, cfg.seed)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch < 1:
        raise InvalidInputError(f"{sampler.num_samples} samples per process make no batch of {cfg.batch_size}")
    loader = _loader(cfg, dataset, sampler, d)
    vis = _vis_batch(cfg, dataset, model, mask, d) if cfg.vis_every else None

    log_path = out_dir / "log.jsonl"
    if d.main:
        restart_log(log_path, step if resume_path else 0)
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    progress = Progress(cfg.steps, step, d.main and cfg.progress and step < end, cfg.log_every)
    board = TensorBoard(out_dir / "tensorboard", d.main and cfg.tensorboard, purge_step=step + 1 if step else None)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    images_per_step = cfg.batch_size * cfg.accum_steps * d.world

    def batches() -> Iterator[torch.Tensor]:
        epoch, offset = divmod(step * cfg.accum_steps, batches_per_epoch)
        while True:
            sampler.set_position(epoch, offset * cfg.batch_size)
            yield from loader
            epoch, offset = epoch + 1, 0

    def save(at: int) -> Path:
        rng = gather_objects(ck.rng_state(mask_gen), d)
        state, optim = model_state(model, cfg.fsdp), optimizer_state(model, optimizer, cfg.fsdp)
        path = out_dir / f"ckpt-{at:07d}.pt"
        if d.main:
            ck.save_checkpoint(
                path,
                {
                    "format": ck.CHECKPOINT_FORMAT,
                    "step": at,
                    "world_size": d.world,
                    "config": built.meta,
                    "settings": cfg.to_dict(),
                    "fsdp": cfg.fsdp,
                    "model": state,
                    "optimizer": optim,
                    "scheduler": scheduler.state_dict(),
                    "rng": rng,
                },
            )
            ck.prune_checkpoints(out_dir, cfg.keep_ckpts, path)
        return path

    def picture(at: int) -> None:
        grid = reconstruction_grid(model, *vis)
        if d.main:
            save_png(grid, out_dir / f"recon-{at:07d}.png")
            board.image("reconstruction", grid, at)

    losses: List[float] = []
    step_ips: List[float] = []
    step_faults: List[int] = []
    last_ckpt: Optional[Path] = None
    stream = batches()
    t_start = time.perf_counter()
    done_images = 0
    try:
        with log_path.open("a") if d.main else nullcontext() as log:
            while step < end:
                t0, faults0 = time.perf_counter(), minor_faults()
                total = torch.zeros((), device=d.device)
                for k in range(cfg.accum_steps):
                    images = next(stream).to(d.device, non_blocking=True)
                    visible = mask(images.shape[0], mask_gen).to(d.device)
                    sync = k == cfg.accum_steps - 1 or not d.enabled or cfg.fsdp
                    with nullcontext() if sync else net.no_sync(), autocast:
                        loss = net(images, visible).loss
                    (loss / cfg.accum_steps).backward()
                    total += loss.detach() / cfg.accum_steps
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad > 0 else torch.zeros(())
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                mean_loss = float(all_mean(total, d))
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss became {mean_loss} at step {step}")
                dt = time.perf_counter() - t0
                faults = minor_faults() - faults0
                done_images += images_per_step
                ips = images_per_step / dt
                losses.append(mean_loss)
                step_ips.append(ips)
                step_faults.append(faults)
                if d.main:
                    record = {
                        "step": step,
                        "loss": mean_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "images_per_s": ips,
                        "minor_faults": faults,
                        "time": time.time(),
                    }
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    board.scalars(
                        step, {"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "images_per_s": ips}
                    )
                    eta = (end - step) * (time.perf_counter() - t_start) / len(losses)
                    progress.update(step, mean_loss, ips, eta)
                if vis is not None and (step % cfg.vis_every == 0 or step == end):
                    picture(step)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == end:
                    last_ckpt = save(step)
    finally:
        progress.close()
        board.close()
    elapsed = time.perf_counter() - t_start
    throughput = done_images / elapsed if elapsed > 0 else 0.0
    if d.main:
        _summary(cfg, d, step, losses, step_ips, step_faults, throughput, log_path, out_dir)
    return TrainResult(model, losses, step, out_dir, throughput, last_ckpt)


def _summary(
    cfg: PretrainConfig,
    d: Dist,
    step: int,
    losses: List[float],
    step_ips: List[float],
    step_faults: List[int],
    throughput: float,
    log_path: Path,
    out_dir: Path,
) -> None:
    """Print the run's loss and speed, and write the loss plot."""
    if losses:
        median = statistics.median(step_ips)
        print(
            f"steps {step - len(losses) + 1}..{step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
            f"{throughput:.1f} images/s overall, {median:.1f} images/s median step, "
            f"{statistics.median(step_faults):.0f} minor page faults median step "
            f"({d.world} process{'es' if d.world > 1 else ''}{', dense baseline' if cfg.dense else ''})"
        )
    if cfg.plot and read_log(log_path):
        title = (
            f"{cfg.model}, {d.world}x{cfg.batch_size}x{cfg.accum_steps} images/step, "
            f"{cfg.mask} mask, ratio {cfg.mask_ratio:g}"
        )
        png = write_loss_plot(log_path, out_dir / "loss.png", title)
        if png:
            print(f"loss curve: {png}")


def run(cfg: PretrainConfig):
    """Tune malloc (unless ``malloc_tuning`` is off), then train, or benchmark with ``bench_steps``; leaves the
    process group when one was created."""
    from .throughput import benchmark

    note = tune_malloc() if cfg.malloc_tuning else None
    try:
        result = benchmark(cfg, note) if cfg.bench_steps is not None else train(cfg)
        if dist.is_initialized():
            dist.barrier()  # every rank's collectives done before the group is torn down
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
