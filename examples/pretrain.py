"""MIM pre-training in a loop short enough to read, on the greenmim_convert.mim library.

A tiny Swin is converted to compute on visible mask units only; GreenMIM/MAE's light decoder predicts the
normalised pixels of the hidden units. The data are random crops of the photographs bundled with scikit-image.

    python examples/pretrain.py --steps 200 --out runs/example

The full-featured command (DDP/FSDP2, resuming, configs, TensorBoard, export) is ``greenmim-convert pretrain``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

import greenmim_convert as gmc
from greenmim_convert.mim import MIMModel, PixelTarget, RandomMask, TransformerDecoder
from greenmim_convert.mim.data import ResumableSampler, build_dataset
from greenmim_convert.mim.optim import make_optimizer, make_scheduler
from greenmim_convert.mim.vis import reconstruction_grid, save_png


def build(img_size: int) -> MIMModel:
    """A tiny Swin (no classifier), converted, with a 2-layer decoder and the per-unit normalised pixel target."""
    net = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        img_size=img_size,
    )
    encoder = gmc.convert(net)
    decoder = TransformerDecoder(net.num_features, encoder.mask_grid, encoder.mask_unit, dim=128, depth=2, heads=4)
    return MIMModel(encoder, decoder, PixelTarget(norm_pix=True))


def batches(img_size: int, batch_size: int, seed: int):
    """Endless batches of seeded random crops of the demo photographs."""
    dataset = build_dataset(None, (img_size, img_size), seed, demo_size=1024)
    sampler = ResumableSampler(dataset, rank=0, world=1, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=2)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/example")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args.img_size).train()
    mask = RandomMask(model.mask_grid, ratio=0.75)
    masks = torch.Generator().manual_seed(1)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=0.05)
    schedule = make_scheduler(optimizer, args.steps, warmup=max(1, args.steps // 20), min_ratio=0.01)
    stream = batches(args.img_size, args.batch_size, seed=0)
    for step in range(1, args.steps + 1):
        images = next(stream)
        out = model(images, mask(images.shape[0], masks))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 10 == 0 or step == 1:
            print(f"step {step}/{args.steps}  loss {out.loss.item():.4f}", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = next(stream)[:4]
    save_png(reconstruction_grid(model, images, mask(4, masks)), out_dir / "reconstruction.png")
    torch.save(model.encoder.source_model.state_dict(), out_dir / "swin_encoder.pt")  # timm's own keys
    print(f"wrote {out_dir / 'reconstruction.png'} and {out_dir / 'swin_encoder.pt'}")


if __name__ == "__main__":
    main()
