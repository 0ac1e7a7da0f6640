"""Masked-image-modeling pre-training (MAE / GreenMIM style) of a converted timm encoder.

The encoder is a timm hierarchical ViT converted by greenmim-convert, so it computes on the visible
mask units only. A small transformer decoder puts a mask token at every hidden unit, adds fixed 2-D
sin-cos positions over the mask grid, and predicts the per-unit normalised pixels of the hidden
units; the loss is taken on hidden units only.

One process::

    python examples/pretrain.py --model swin_tiny_patch4_window7_224 --steps 300 --out runs/demo

Several processes (DistributedDataParallel; gloo on CPU, nccl on CUDA)::

    torchrun --nproc-per-node 2 examples/pretrain.py --steps 300 --out runs/ddp

Without ``--data`` the model trains on random crops of the photographs that ship inside
scikit-image (nothing is downloaded). A run can be split into jobs with ``--stop-after`` and
continued with ``--resume``; the continued run is bit-identical to an uninterrupted one. The newest
``--keep-ckpts`` checkpoints are kept.

The SimMIM-style baseline, for comparison (``--dense``): the same decoder and loss, the unconverted
encoder on the full image with a learned mask token at hidden units::

    python examples/pretrain.py --dense --steps 300 --out runs/dense

Throughput of whole training steps (encoder, decoder, loss, backward, optimiser) of the converted
model and the dense baseline, alternating step by step on batches already in memory::

    python examples/pretrain.py --batch-size 16 --bench-steps 5

On Linux with glibc the script keeps freed memory in the process (``mallopt``: no ``mmap`` for
large blocks, no trimming of the heap), so that a step does not page-fault the memory the previous
step freed; ``--no-malloc-tuning`` leaves glibc's defaults. The same can be had without the flag
through the environment: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` (or
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``). The log records
the minor page faults of every step.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import inspect
import json
import math
import os
import re
import statistics
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import greenmim_convert as gmc
from greenmim_convert.tools import model_args
from greenmim_convert.tools.bench import SimMIMDense
from greenmim_convert.api.convert import default_img_size
from greenmim_convert.oracle.reference import dense_to_tokens, feature_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "greenmim-pretrain/1"
LAST = "last.pt"

# Photographs bundled in the scikit-image wheel (loaded from the installed package, never fetched).
# Grey-scale ones are repeated over three channels. Images that are mostly flat background (hubble,
# retina, moon) are left out: per-unit normalisation turns a flat unit's quantisation noise into an
# unpredictable unit-variance target.
DEMO_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "stereo_motorcycle",
    "camera", "coins", "grass", "gravel", "brick", "cell", "clock", "page",
)


# --------------------------------------------------------------------------------------------- CLI


def parse_model_args(pairs: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` pairs for ``timm.create_model`` (see ``greenmim_convert.tools.model_args``)."""
    try:
        return model_args.parse_model_args(pairs)
    except gmc.InvalidInputError as exc:
        raise SystemExit(f"error: {exc}") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default after the help text only when there is a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        meaningful = action.default is not None and action.default is not False and action.default != []
        if meaningful and action.default is not argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of the pre-training script."""
    p = argparse.ArgumentParser(
        description="MIM pre-training of a greenmim-converted timm encoder (visible units only).",
        formatter_class=_HelpFormatter,
        epilog="example: python examples/pretrain.py --model swin_tiny_patch4_window7_224 --model-arg embed_dim=32 "
        "--model-arg 'depths=[2,2,2,2]' --model-arg 'num_heads=[1,2,4,8]' --model-arg window_size=4 "
        "--img-size 128 --decoder-dim 128 --decoder-heads 4 --batch-size 16 --steps 400 --out runs/demo",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="swin_tiny_patch4_window7_224", help="timm model name (random init)")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="extra timm.create_model argument (repeatable)")
    m.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    m.add_argument("--mask-unit", type=int, default=None, help="mask unit in pixels (default: the model's total stride)")
    m.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of mask units hidden per image")
    m.add_argument("--decoder-dim", type=int, default=256, help="decoder width")
    m.add_argument("--decoder-depth", type=int, default=2, help="decoder transformer layers")
    m.add_argument("--decoder-heads", type=int, default=8, help="decoder attention heads")
    m.add_argument("--no-norm-pix", action="store_true", help="predict raw (not per-unit normalised) pixels")
    m.add_argument("--dense", action="store_true",
                   help="SimMIM-style baseline: the unconverted encoder on the full image, a learned mask token at hidden "
                   "units after the patch embedding, the same decoder and loss")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="ImageFolder root; default: built-in scikit-image demo photographs")
    d.add_argument("--demo-size", type=int, default=1024, help="random crops per epoch of the demo set")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    d.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop minimal area fraction")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=32, help="images per micro-batch per process")
    o.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimiser step")
    o.add_argument("--steps", type=int, default=1000, help="optimiser steps of the whole schedule")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    o.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases, norms, tokens, position tables)")
    o.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    o.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (the loss is taken in float32)")
    o.add_argument("--seed", type=int, default=0, help="seeds weights, data order, crops, masks and drop-path")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/pretrain", help="directory for checkpoints, log.jsonl and loss.png")
    r.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N optimiser steps (0: only at the end)")
    r.add_argument("--keep-ckpts", type=int, default=3,
                   help="keep the newest K checkpoints (0: all); the one last.pt copies is never deleted")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from a checkpoint (no value: OUT/last.pt if it exists, else start afresh)")
    r.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step; the schedule stays that of --steps")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    r.add_argument("--log-every", type=int, default=10, help="plain-text log line every N steps when no progress bar is shown")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    r.add_argument("--bench-steps", type=int, default=None, metavar="N",
                   help="instead of training: time N training steps (after one warm-up) of the converted model and the "
                   "dense baseline, alternating, on batches loaded beforehand; print images/s and page faults per step")
    r.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc's malloc defaults (it then returns freed memory every step and page-faults it back)")
    return p


# --------------------------------------------------------------------------------------- memory

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
INT_MAX = 2**31 - 1


def tune_malloc() -> Optional[str]:
    """Keep freed memory in the process on Linux glibc; returns what was set, or None where it does not apply.

    glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh ``mmap``s and
    returns them on free, and trims the heap top above 128 KiB: a training step frees its activations and the
    next step page-faults them back (~25k minor faults a step for Swin-T). With no ``mmap``-served blocks and no
    trimming, freed blocks stay on the heap's free lists and are reused. The price: the process keeps its peak
    heap, as a caching allocator does.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, INT_MAX)):
        return None
    return f"glibc {version().decode()}: mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD={INT_MAX}"


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ----------------------------------------------------------------------------------- distribution


@dataclass
class Dist:
    """Where this process stands in the job: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    """DistributedDataParallel without per-step buffer syncing (the buffers are constant index tables)."""
    ddp_cls = nn.parallel.DistributedDataParallel
    no_sync_buffers = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_cls).parameters
        else {"broadcast_buffers": False}
    )
    return ddp_cls(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_sync_buffers)


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over all ranks (itself when not distributed)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


# -------------------------------------------------------------------------------------------- data


def _sample_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (the same in every process and every run)."""
    return zlib.crc32(json.dumps(parts).encode()) * 2654435761 % (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start in the middle of an epoch and tags every index with its epoch.

    The tag lets the dataset draw its augmentation from a seed of (seed, epoch, index), so crops do
    not depend on worker processes or on where a run was resumed.
    """

    def __init__(self, dataset: Dataset, d: Dist, seed: int):
        super().__init__(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Next iteration: epoch ``epoch``, skipping its first ``start`` indices of this rank."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = list(super().__iter__())
        return iter([(i, self.epoch) for i in order[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededAugment(Dataset):
    """Wraps a dataset of ``(epoch, index) -> image``: each sample's augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]) -> torch.Tensor:
        index, epoch = key
        item = self.base[index]
        image = item[0] if isinstance(item, tuple) else item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(image)


@functools.lru_cache(maxsize=4)
def load_demo_photos(max_side: int = 512) -> Tuple[torch.Tensor, ...]:
    """The photographs bundled with scikit-image as uint8 ``(3, H, W)`` tensors, the longer side at most ``max_side``.

    Only the files inside the installed wheel are read; scikit-image's downloadable images are skipped.
    """
    from torchvision.transforms.v2 import functional as TF

    try:
        import skimage.data as skdata
    except ImportError:
        raise SystemExit(
            "error: the built-in demo data needs scikit-image (pip install 'greenmim-convert[examples]'), or pass --data DIR"
        ) from None
    photos = []
    for name in DEMO_IMAGES:
        try:
            img = getattr(skdata, name)()
            img = torch.as_tensor(img[0] if isinstance(img, tuple) else img)
        except Exception:
            continue
        if img.dim() == 2:
            img = img[:, :, None].expand(-1, -1, 3)
        img = img[:, :, :3].permute(2, 0, 1).contiguous().to(torch.uint8)
        scale = max_side / max(img.shape[1:])
        if scale < 1:
            img = TF.resize(img, [round(img.shape[1] * scale), round(img.shape[2] * scale)], antialias=True)
        photos.append(img)
    if not photos:
        raise SystemExit("error: no scikit-image sample photograph could be read; pass --data DIR")
    return tuple(photos)


class DemoPhotos(Dataset):
    """``size`` items cycling over the scikit-image photographs; cropping happens in the transform."""

    def __init__(self, size: int, max_side: int = 512):
        self.photos = load_demo_photos(max_side)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.photos[index % len(self.photos)]


def build_transform(img_size: Tuple[int, int], min_scale: float, tensor_input: bool) -> Callable:
    """RandomResizedCrop + horizontal flip + ImageNet normalisation (on PIL images or uint8 tensors)."""
    from torchvision.transforms import v2 as T

    steps = [] if tensor_input else [T.PILToTensor()]
    steps += [
        T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return T.Compose(steps)


def build_dataset(args: argparse.Namespace, img_size: Tuple[int, int]) -> SeededAugment:
    """ImageFolder under ``--data``, else the scikit-image demo photographs, with seeded augmentation."""
    if args.data:
        from torchvision.datasets import ImageFolder

        base: Dataset = ImageFolder(args.data)
        transform = build_transform(img_size, args.min_crop_scale, tensor_input=False)
    else:
        base = DemoPhotos(args.demo_size, max(512, 2 * max(img_size)))
        transform = build_transform(img_size, args.min_crop_scale, tensor_input=True)
    return SeededAugment(base, transform, args.seed)


# ------------------------------------------------------------------------------------------- model


def sincos_2d(grid: Tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed ``(gh*gw, dim)`` position embedding: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"decoder width {dim} must be a multiple of 4 for 2-D sin-cos positions")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1) * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


def patchify(images: torch.Tensor, unit: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, gh*gw, unit*unit*C)``: the pixels of every mask unit, row-major over units."""
    b, c, h, w = images.shape
    gh, gw = h // unit, w // unit
    x = images.reshape(b, c, gh, unit, gw, unit).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, unit * unit * c)


class MIMDecoder(nn.Module):
    """Encoder tokens -> decoder width, mask tokens at hidden units, fixed positions, transformer, pixel head."""

    def __init__(self, enc_dim: int, grid: Tuple[int, int], unit: int, dim: int, depth: int, heads: int, in_chans: int = 3):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.register_buffer("pos_embed", sincos_2d(self.grid, dim), persistent=False)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, unit * unit * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for lin in (self.embed, self.pred):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, unit_feats: torch.Tensor, unit_index: torch.Tensor, batch_size: int,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``unit_feats (V, C)`` of the visible units at flat positions ``unit_index`` (b * N + u) -> ``(B, N, P)``;
        with ``rows`` (flat positions), only those units' predictions ``(len(rows), P)``: the pixel head is per unit."""
        n = self.grid[0] * self.grid[1]
        emb = self.embed(unit_feats)
        tokens = self.mask_token.to(emb.dtype).expand(batch_size * n, -1)
        tokens = tokens.index_put((unit_index,), emb)
        x = tokens.view(batch_size, n, -1) + self.pos_embed.to(emb.dtype)
        x = self.blocks(x)
        if rows is not None:
            x = x.reshape(batch_size * n, -1).index_select(0, rows)
        return self.pred(self.norm(x))


class DenseEncoder(SimMIMDense):
    """The SimMIM-style baseline encoder: the unconverted model on the full image, a learned mask token in place
    of the patch embedding's output at hidden units; its last feature map is read at the visible positions.

    It returns what a converted model returns (``out.last``: the visible tokens of the final grid, in canonical
    order), so the decoder and the loss are the same for both. The timm model's keys are under ``model.``.
    """

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], mask_unit: int):
        super().__init__(model, mask_unit)
        self.img_size = tuple(img_size)
        self.mask_grid = (self.img_size[0] // mask_unit, self.img_size[1] // mask_unit)
        self.fmt = getattr(model, "output_fmt", "NCHW")
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> gmc.GreenOutput:
        """Dense forward with mask tokens; the final map's visible tokens as ``out.last`` (no stages)."""
        dense = super().forward(images, visible)
        layout, stride = feature_layout(dense, self.img_size, self.fmt)
        return gmc.GreenOutput(dense_to_tokens(dense, visible, stride, layout, self.img_size), [])


Encoder = Union[gmc.GreenModel, DenseEncoder]


class MIMPretrainer(nn.Module):
    """The whole pre-training module (wrap this in DDP): encoder (converted, or the dense baseline) + decoder +
    masked pixel loss."""

    def __init__(self, encoder: Encoder, enc_dim: int, dim: int, depth: int, heads: int, norm_pix: bool = True):
        super().__init__()
        self.encoder = encoder
        self.unit = encoder.mask_unit
        self.decoder = MIMDecoder(enc_dim, encoder.mask_grid, self.unit, dim, depth, heads)
        self.norm_pix = norm_pix

    def unit_tokens(self, tokens: gmc.VisibleTokens) -> Tuple[torch.Tensor, torch.Tensor]:
        """One feature per visible mask unit and its flat index b * N + u.

        When the final grid is finer than the mask grid, the tokens of a unit are averaged.
        """
        gh, gw = self.encoder.mask_grid
        th, tw = tokens.grid
        if th % gh or tw % gw:
            raise ValueError(f"final grid {tokens.grid} is not a multiple of the mask grid {(gh, gw)}")
        rh, rw = th // gh, tw // gw
        flat = tokens.batch * (gh * gw) + (tokens.coords[:, 0] // rh) * gw + tokens.coords[:, 1] // rw
        if rh == rw == 1:
            return tokens.feats, flat
        index, inverse = torch.unique(flat, return_inverse=True)
        sums = tokens.feats.new_zeros(index.numel(), tokens.feats.shape[1]).index_add_(0, inverse, tokens.feats)
        return sums / (rh * rw), index

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the hidden units' (per-unit normalised) pixels."""
        out = self.encoder(images, visible)
        feats, flat = self.unit_tokens(out.last)
        hidden = (~visible).flatten().nonzero().squeeze(1)
        if hidden.numel() == 0:  # nothing to predict: a zero loss that still reaches every decoder parameter
            return 0.0 * self.decoder(feats, flat, images.shape[0]).float().sum()
        pred = self.decoder(feats, flat, images.shape[0], hidden).float()
        target = patchify(images.float(), self.unit).flatten(0, 1).index_select(0, hidden)
        if self.norm_pix:
            var, mean = torch.var_mean(target, dim=-1, unbiased=False, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return (pred - target).pow(2).mean()


def dense_encoder(net: nn.Module, img_size: Optional[int], mask_unit: Optional[int]) -> DenseEncoder:
    """The SimMIM baseline with the defaults ``convert`` takes: the model's image size, its total stride as mask unit."""
    size = (img_size, img_size) if img_size is not None else default_img_size(net)
    if size is None:
        raise SystemExit(f"error: {type(net).__name__} does not state its image size: pass --img-size")
    unit = mask_unit if mask_unit is not None else int(net.feature_info[-1]["reduction"])
    if size[0] % unit or size[1] % unit:
        raise SystemExit(f"error: image size {size} is not divisible by the mask unit {unit}px")
    return DenseEncoder(net, size, unit)


def build_model(args: argparse.Namespace, dense: Optional[bool] = None) -> Tuple[MIMPretrainer, Dict[str, Any]]:
    """Seeded timm model (no classifier) -> converted encoder (``--dense``: the SimMIM baseline) -> pre-training
    module; also the config to rebuild it. ``dense`` overrides ``args.dense``."""
    dense = bool(getattr(args, "dense", False)) if dense is None else dense
    kwargs = parse_model_args(args.model_arg)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    torch.manual_seed(args.seed)
    try:
        try:
            net = timm.create_model(args.model, pretrained=False, **{**kwargs, "num_classes": 0})
        except TypeError as exc:
            if "img_size" not in str(exc) or args.img_size is None:
                raise
            del kwargs["img_size"]  # a convolutional net (ConvNeXt) takes any image size: only convert() needs it
            torch.manual_seed(args.seed)
            net = timm.create_model(args.model, pretrained=False, **{**kwargs, "num_classes": 0})
    except (RuntimeError, TypeError) as exc:
        raise SystemExit(f"error: timm.create_model({args.model!r}, **{kwargs}) failed: {exc}") from None
    encoder: Encoder
    if dense:
        encoder = dense_encoder(net, args.img_size, args.mask_unit)
    else:
        try:
            encoder = gmc.convert(net, img_size=args.img_size, mask_unit=args.mask_unit)
        except gmc.GreenMIMError as exc:
            raise SystemExit(f"error: {args.model} cannot be converted: {type(exc).__name__}: {exc}") from None
    enc_dim = int(getattr(net, "num_features"))
    model = MIMPretrainer(encoder, enc_dim, args.decoder_dim, args.decoder_depth, args.decoder_heads, not args.no_norm_pix)
    config = {
        "model_name": args.model,
        "model_kwargs": kwargs,
        "img_size": list(encoder.img_size),
        "mask_unit": encoder.mask_unit,
        "dense": dense,
        "encoder_prefix": "encoder.model." if dense else "encoder.",
    }
    return model, config


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, mask tokens, position tables (1-D or named so)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("mask_token", "relative_position_bias_table", "pos_embed", "absolute_pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, fused (one pass over each tensor, about 3.5x faster than ``foreach`` for
    Swin-T on the CPU) where PyTorch has the fused kernel for the parameters' device, else ``foreach``."""
    device = next(model.parameters()).device.type
    fused = device in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                             fused=fused or None, foreach=None if fused else True)


def lr_lambda(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then a cosine down to ``min_ratio`` at ``steps``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------------- checkpoints


def rng_state(mask_gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """This process's random states: torch CPU (drop-path), CUDA when present, the mask generator."""
    state = {"torch": torch.get_rng_state(), "masks": mask_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, torch.Tensor], mask_gen: torch.Generator) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    mask_gen.set_state(state["masks"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng(mask_gen: torch.Generator, d: Dist) -> List[Dict[str, torch.Tensor]]:
    """Every rank's random states, in rank order (a collective: all ranks must call it)."""
    mine = rng_state(mask_gen)
    if not d.enabled:
        return [mine]
    states: List[Any] = [None] * d.world
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename), and point ``last.pt`` at the newest one."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    last = path.parent / LAST
    if path.name != LAST:
        tmp_last = last.with_suffix(".tmp")
        torch.save(payload, tmp_last)
        os.replace(tmp_last, last)


CKPT_NAME = re.compile(r"ckpt-(\d{7})\.pt")


def prune_checkpoints(out_dir: Path, keep: int, current: Path) -> List[Path]:
    """Delete all but the ``keep`` newest (by step) ``ckpt-NNNNNNN.pt`` of ``out_dir``; ``current`` (the one
    ``last.pt`` copies) is always kept. ``keep`` 0 keeps everything. Returns the deleted paths."""
    if keep <= 0:
        return []
    found = sorted((int(m.group(1)), f) for f in out_dir.iterdir() if (m := CKPT_NAME.fullmatch(f.name)))
    doomed = [f for _, f in found[:-keep] if f.name != current.name]
    for f in doomed:
        f.unlink(missing_ok=True)
    return doomed


def resolve_resume(resume: Optional[str], out_dir: Path, d: Dist) -> Optional[str]:
    """The checkpoint to continue from: an explicit path must exist; ``auto`` (OUT/last.pt) starts afresh when absent."""
    if not resume:
        return None
    if resume == "auto":
        path = out_dir / LAST
        if not path.exists():
            if d.main:
                print(f"no checkpoint at {path}: starting from step 0", file=sys.stderr)
            return None
        return str(path)
    if not Path(resume).is_file():
        raise SystemExit(f"error: --resume {resume}: no such checkpoint")
    return resume


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by this script (tensors and plain Python values only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a greenmim pre-training checkpoint")
    return payload


# ---------------------------------------------------------------------------------- log, progress


def read_log(path: Path) -> List[Dict[str, Any]]:
    """Records of a JSONL log (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_loss_plot(log_path: Path, png_path: Path, title: str = "") -> Optional[Path]:
    """Loss per step and its moving average as a PNG; returns None (with a message) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no loss plot written (pip install 'greenmim-convert[examples]')", file=sys.stderr)
        return None
    records = read_log(log_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=1, label="loss per step")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"moving average ({window} steps)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("masked-unit MSE (normalised pixels)")
    ax.set_title(title or "MIM pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


class Progress:
    """A rich (else tqdm, else plain text) progress bar showing loss and images/s on rank 0."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int):
        self.total, self.log_every, self.kind, self.bar = total, log_every, "none", None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(
                TextColumn("[bold]pre-train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"), TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), ips=0.0)
            self.kind = "rich"
            return
        except ImportError:
            pass
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="pre-train")
            self.kind = "tqdm"
        except ImportError:
            self.kind = "text"

    def update(self, step: int, loss: float, ips: float) -> None:
        if self.kind == "rich":
            self.bar.update(self.task, completed=step, loss=loss, ips=ips)
        elif self.kind == "tqdm":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
        elif self.kind == "text" and (step % self.log_every == 0 or step == self.total):
            print(f"step {step}/{self.total}  loss {loss:.4f}  {ips:.1f} img/s", flush=True)

    def close(self) -> None:
        if self.kind in ("rich", "tqdm"):
            (self.bar.stop if self.kind == "rich" else self.bar.close)()


# ----------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What a call of ``train`` did: the unwrapped module, the losses of its steps, where it stopped."""

    model: MIMPretrainer
    losses: List[float]
    step: int
    out_dir: Path
    images_per_s: float
    checkpoint: Optional[Path]


def train(args: argparse.Namespace) -> TrainResult:
    """Run (or continue) pre-training as ``args`` says; rank 0 writes checkpoints, log.jsonl and loss.png."""
    d = setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    model, config = build_model(args)
    model.to(d.device)
    model.train()
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, warmup, args.min_lr / args.lr))

    torch.manual_seed(args.seed + 1000 * d.rank + 1)
    mask_gen = torch.Generator().manual_seed(args.seed + 1000 * d.rank + 2)
    step = 0
    resume_path = resolve_resume(args.resume, out_dir, d)
    if resume_path:
        ckpt = load_checkpoint(resume_path)
        if ckpt["world_size"] != d.world:
            raise SystemExit(f"error: checkpoint written by {ckpt['world_size']} processes, this run has {d.world}")
        if bool(ckpt["config"].get("dense", False)) != bool(args.dense):
            kind = "the dense baseline (--dense)" if ckpt["config"].get("dense") else "a converted encoder"
            raise SystemExit(f"error: {resume_path} trains {kind}: resume it with the same --dense setting")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        set_rng_state(ckpt["rng"][d.rank], mask_gen)

    ddp = wrap_ddp(model, d) if d.enabled else model

    dataset = build_dataset(args, tuple(model.encoder.img_size))
    sampler = ResumableSampler(dataset, d, args.seed)
    batches_per_epoch = len(sampler) // args.batch_size
    if batches_per_epoch < 1:
        raise SystemExit(f"error: {sampler.num_samples} samples per process make no batch of {args.batch_size}")
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
        pin_memory=d.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed),
    )

    log_path = out_dir / "log.jsonl"
    if d.main:
        kept = [r for r in read_log(log_path) if r["step"] <= step] if resume_path else []
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    end = min(args.steps, args.stop_after) if args.stop_after is not None else args.steps
    progress = Progress(args.steps, step, d.main and not args.no_progress and step < end, args.log_every)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    images_per_step = args.batch_size * args.accum_steps * d.world

    def batches() -> Iterator[torch.Tensor]:
        micro = step * args.accum_steps
        epoch, offset = divmod(micro, batches_per_epoch)
        while True:
            sampler.set_position(epoch, offset * args.batch_size)
            yield from loader
            epoch, offset = epoch + 1, 0

    def checkpoint(at: int) -> Path:
        rng = gather_rng(mask_gen, d)
        path = out_dir / f"ckpt-{at:07d}.pt"
        if d.main:
            save_checkpoint(path, {
                "format": CHECKPOINT_FORMAT, "step": at, "world_size": d.world, "config": config, "args": vars(args),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            })
            prune_checkpoints(out_dir, args.keep_ckpts, path)
        return path

    losses: List[float] = []
    step_ips: List[float] = []
    step_faults: List[int] = []
    last_ckpt: Optional[Path] = None
    stream = batches()
    t_start = time.perf_counter()
    done_images = 0
    try:
        with (log_path.open("a") if d.main else nullcontext()) as log:
            while step < end:
                t0, faults0 = time.perf_counter(), minor_faults()
                total = torch.zeros((), device=d.device)
                for k in range(args.accum_steps):
                    images = next(stream).to(d.device, non_blocking=True)
                    visible = gmc.random_mask(images.shape[0], model.encoder.mask_grid, args.mask_ratio, generator=mask_gen).to(d.device)
                    sync = k == args.accum_steps - 1 or not d.enabled
                    with (nullcontext() if sync else ddp.no_sync()), autocast:
                        loss = ddp(images, visible)
                    (loss / args.accum_steps).backward()
                    total += loss.detach() / args.accum_steps
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad) if args.clip_grad > 0 else torch.zeros(())
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
                    log.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                                          "images_per_s": ips, "minor_faults": faults, "time": time.time()}) + "\n")
                    log.flush()
                    progress.update(step, mean_loss, ips)
                if (args.ckpt_every and step % args.ckpt_every == 0) or step == end:
                    last_ckpt = checkpoint(step)
    finally:
        progress.close()
    elapsed = time.perf_counter() - t_start
    throughput = done_images / elapsed if elapsed > 0 else 0.0
    if d.main:
        if losses:
            median = sorted(step_ips)[len(step_ips) // 2]
            print(f"steps {step - len(losses) + 1}..{step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                  f"{throughput:.1f} images/s overall, {median:.1f} images/s median step, "
                  f"{statistics.median(step_faults):.0f} minor page faults median step "
                  f"({d.world} process{'es' if d.world > 1 else ''}{', dense baseline' if args.dense else ''})")
        if not args.no_plot:
            title = (f"{args.model}, {d.world}x{args.batch_size}x{args.accum_steps} images/step, "
                     f"mask ratio {args.mask_ratio:g}")
            png = write_loss_plot(log_path, out_dir / "loss.png", title)
            if png:
                print(f"loss curve: {png}")
    return TrainResult(model, losses, step, out_dir, throughput, last_ckpt)


# ----------------------------------------------------------------------------------------- throughput


@dataclass
class Throughput:
    """One side of ``--bench-steps``: wall time and minor page faults of every timed step."""

    name: str
    batch_size: int
    step_s: List[float]
    faults: List[int]

    @property
    def images_per_s(self) -> float:
        """Images per second of the median step."""
        return self.batch_size / statistics.median(self.step_s)

    @property
    def faults_per_step(self) -> float:
        """Median minor page faults of a step."""
        return float(statistics.median(self.faults))


def benchmark(args: argparse.Namespace, malloc_note: Optional[str] = None) -> Dict[str, Throughput]:
    """Time whole training steps (forward, loss, backward, clipping, AdamW) of the converted model and the dense
    baseline, one micro-batch a step, alternating step by step (the first of each pair alternates too) on the same
    preloaded batches and masks, after one warm-up step each; print images/s and page faults per step."""
    d = setup_distributed(args.device)
    if d.enabled:
        raise SystemExit("error: --bench-steps runs in one process")
    if args.threads:
        torch.set_num_threads(args.threads)
    sides: Dict[str, Tuple[MIMPretrainer, torch.optim.Optimizer]] = {}
    for name, dense in (("converted", False), ("dense", True)):
        model = build_model(args, dense)[0].to(d.device).train()
        sides[name] = (model, make_optimizer(model, args))
    model = sides["converted"][0]
    dataset = build_dataset(args, tuple(model.encoder.img_size))
    sampler = ResumableSampler(dataset, d, args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers)
    pool: List[torch.Tensor] = []
    for batch in loader:
        pool.append(batch.to(d.device))
        if len(pool) == min(4, args.bench_steps + 1):
            break
    if not pool:
        raise SystemExit(f"error: {sampler.num_samples} samples make no batch of {args.batch_size}")
    gen = torch.Generator().manual_seed(args.seed + 2)
    masks = [gmc.random_mask(args.batch_size, model.encoder.mask_grid, args.mask_ratio, generator=gen).to(d.device)
             for _ in range(args.bench_steps + 1)]
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    results = {name: Throughput(name, args.batch_size, [], []) for name in sides}
    for i in range(args.bench_steps + 1):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            model, optimizer = sides[name]
            t0, faults0 = time.perf_counter(), minor_faults()
            with autocast:
                loss = model(pool[i % len(pool)], masks[i])
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            if i > 0:
                results[name].step_s.append(time.perf_counter() - t0)
                results[name].faults.append(minor_faults() - faults0)
    conv, dense = results["converted"], results["dense"]
    print(f"{args.model}, batch {args.batch_size}, mask ratio {args.mask_ratio:g}, {d.device.type} "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, {torch.get_num_threads()} threads, {args.bench_steps} timed steps "
          f"each (whole training step, data in memory); malloc: {malloc_note or 'glibc defaults'}")
    for r in (conv, dense):
        print(f"  {r.name:9s} {r.images_per_s:8.2f} images/s  ({1e3 * statistics.median(r.step_s):.0f} ms/step, "
              f"min {1e3 * min(r.step_s):.0f}, max {1e3 * max(r.step_s):.0f})  {r.faults_per_step:.0f} minor page faults/step")
    print(f"  converted / dense: {conv.images_per_s / dense.images_per_s:.2f}x images/s")
    return results


def main(argv: Optional[Sequence[str]] = None) -> Union[TrainResult, Dict[str, Throughput]]:
    """Parse the command line, tune malloc, and train (or benchmark); leaves the process group when it created one."""
    args = build_parser().parse_args(argv)
    if args.accum_steps < 1 or args.batch_size < 1 or args.steps < 1:
        raise SystemExit("error: --batch-size, --accum-steps and --steps must be positive")
    if args.bench_steps is not None and args.bench_steps < 1:
        raise SystemExit("error: --bench-steps must be positive")
    if args.keep_ckpts < 0:
        raise SystemExit("error: --keep-ckpts must be 0 (keep all) or positive")
    malloc_note = None if args.no_malloc_tuning else tune_malloc()
    try:
        return benchmark(args, malloc_note) if args.bench_steps is not None else train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
