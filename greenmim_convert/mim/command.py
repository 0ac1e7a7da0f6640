"""The ``greenmim-convert pretrain`` and ``greenmim-convert export`` commands.

Every option defaults to unset, so that only what the command line gives overrides the ``--config`` file, which
overrides the defaults of :class:`~greenmim_convert.mim.config.PretrainConfig`.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from greenmim_convert.errors import GreenMIMError
from greenmim_convert.tools.model_args import parse_model_args

O = typer.Option


def pretrain_cmd(
    model: Optional[str] = typer.Argument(
        None,
        help="timm name, torchvision:NAME, hf:TYPE or package.module:factory "
        "(default: the config file's, else swin_tiny_patch4_window7_224)",
    ),
    data: Optional[str] = O(None, help="ImageFolder root (labels ignored); default: scikit-image's demo photographs"),
    config: Optional[str] = O(
        None, "--config", help="settings file (.toml, .yaml, .json); the options given here override it"
    ),
    model_arg: List[str] = O([], "--model-arg", help="model builder argument key=value (repeatable)"),
    img_size: Optional[int] = O(None, help="image size (default: the model's)"),
    mask_unit: Optional[int] = O(None, help="mask unit in pixels (default: the model's total stride)"),
    grouping: Optional[str] = O(None, help="window packing of the converted model: dp | max | window"),
    dense: Optional[bool] = O(
        None, "--dense/--no-dense", help="SimMIM baseline: the unconverted encoder with a mask token at hidden units"
    ),
    decoder: Optional[str] = O(None, help="transformer (GreenMIM/MAE) or linear (SimMIM's head; --dense only)"),
    decoder_dim: Optional[int] = O(None, help="decoder width [256]"),
    decoder_depth: Optional[int] = O(None, help="decoder layers [2]"),
    decoder_heads: Optional[int] = O(None, help="decoder attention heads [8]"),
    norm_pix: Optional[bool] = O(None, "--norm-pix/--no-norm-pix", help="per-unit normalised pixel target [on]"),
    mask: Optional[str] = O(None, help="random (uniform), block (BEiT/SimMIM) or ummae (UM-MAE's uniform sampling)"),
    mask_ratio: Optional[float] = O(None, help="fraction of units hidden (random, block) [0.75]"),
    secondary_ratio: Optional[float] = O(None, help="ummae: fraction of the kept units hidden again [0.25]"),
    demo_size: Optional[int] = O(None, help="random crops per epoch of the demo photographs [1024]"),
    workers: Optional[int] = O(None, help="DataLoader workers per process [2]"),
    min_crop_scale: Optional[float] = O(None, help="RandomResizedCrop minimal area fraction [0.2]"),
    batch_size: Optional[int] = O(None, help="images per micro-batch per process [32]"),
    accum_steps: Optional[int] = O(None, help="micro-batches per optimiser step [1]"),
    steps: Optional[int] = O(None, help="optimiser steps of the schedule [1000]"),
    lr: Optional[float] = O(None, help="peak learning rate [5e-4]"),
    min_lr: Optional[float] = O(None, help="learning rate at the end of the cosine [1e-5]"),
    warmup_steps: Optional[int] = O(None, help="linear warm-up steps [5% of --steps]"),
    weight_decay: Optional[float] = O(None, help="AdamW weight decay, not on biases, norms, tokens, tables [0.05]"),
    clip_grad: Optional[float] = O(None, help="max gradient norm, 0: none [1.0]"),
    bf16: Optional[bool] = O(None, "--bf16/--no-bf16", help="bfloat16 autocast of the forward"),
    compile_: Optional[bool] = O(None, "--compile/--no-compile", help="torch.compile the MIM model"),
    fsdp: Optional[bool] = O(None, "--fsdp/--no-fsdp", help="FSDP2 (fully_shard) instead of DDP under torchrun"),
    seed: Optional[int] = O(None, help="seeds weights, data order, crops, masks, drop-path [0]"),
    out: Optional[str] = O(None, help="run folder [runs/pretrain]"),
    ckpt_every: Optional[int] = O(None, help="checkpoint every N steps, 0: at the end only [100]"),
    keep_ckpts: Optional[int] = O(None, help="keep the newest K checkpoints, 0: all [3]"),
    resume: Optional[str] = O(
        None,
        is_flag=False,
        flag_value="auto",
        metavar="[CKPT]",
        help="continue from CKPT, or with no value from OUT/last.pt when there is one",
    ),
    stop_after: Optional[int] = O(None, help="stop with a checkpoint after this step (the schedule stays --steps')"),
    device: Optional[str] = O(None, help="auto, cpu or cuda"),
    threads: Optional[int] = O(None, help="torch intra-op threads per process"),
    log_every: Optional[int] = O(None, help="text log line every N steps when no progress bar shows [10]"),
    progress: Optional[bool] = O(None, "--progress/--no-progress", help="progress bar [on]"),
    plot: Optional[bool] = O(None, "--plot/--no-plot", help="loss.png at the end [on]"),
    tensorboard: Optional[bool] = O(None, "--tensorboard/--no-tensorboard", help="TensorBoard events [on]"),
    vis_every: Optional[int] = O(None, help="reconstruction PNG (and TensorBoard image) every N steps, 0: none"),
    bench_steps: Optional[int] = O(None, help="instead of training: time N whole steps of converted vs --dense"),
    malloc_tuning: Optional[bool] = O(
        None, "--malloc-tuning/--no-malloc-tuning", help="keep freed memory in the process (glibc mallopt) [on]"
    ),
) -> None:
    """MIM pre-training (GreenMIM / MAE style) of any model convert takes, on visible units only.

    Without --data it trains on the photographs bundled with scikit-image. Under torchrun it runs DDP (or FSDP2
    with --fsdp). Writes checkpoints, log.jsonl, TensorBoard events, loss.png and config.toml (the resolved
    settings) to --out.

    Example: greenmim-convert pretrain swin_tiny_patch4_window7_224 --data /data/imagenet/train --out runs/swin_t
    Example: greenmim-convert pretrain torchvision:swin_t --config pretrain.toml --steps 500
    """
    given = {k: v for k, v in locals().items() if k not in ("config", "model_arg", "compile_") and v is not None}
    from .config import resolve
    from .engine import run

    if compile_ is not None:
        given["compile"] = compile_
    try:
        if model_arg:
            given["model_args"] = parse_model_args(model_arg)
        cfg = resolve(config, given)
        run(cfg)
    except GreenMIMError as exc:
        _fail(str(exc))


def export_cmd(
    run_dir: str = typer.Argument(..., metavar="RUN", help="run folder (its last.pt) or a checkpoint file"),
    to: str = O(..., "--to", help="folder to write the encoder to"),
) -> None:
    """Write a pre-trained encoder in its source model's own format.

    timm: model.safetensors for timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=...));
    transformers: save_pretrained; torchvision and module:factory models: a plain state_dict (state_dict.pt).

    Example: greenmim-convert export runs/swin_t --to exported/swin_t
    """
    from rich.console import Console

    from .export import export

    try:
        report = export(run_dir, to)
    except (GreenMIMError, ValueError) as exc:
        _fail(str(exc))
    console = Console()
    console.print(
        f"wrote {report.num_tensors} tensors of {report.model_name} (pre-training step {report.step}): "
        f"{', '.join(str(f) for f in report.files)}"
    )
    console.print(f"load with: {report.load_with}")


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)
