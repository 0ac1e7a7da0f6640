"""The MIM model inside transformers' Trainer: the model returns an output whose ``loss`` the Trainer reads.

    python examples/pretrain_hf_trainer.py --steps 50 --out runs/trainer

Needs transformers and accelerate (``pip install 'transformers[torch]'``). The encoder is a transformers Swin
(hf:swin, random weights), converted to compute on visible units only.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from greenmim_convert.mim import PretrainConfig, RandomMask, build_mim
from greenmim_convert.mim.data import build_dataset


class MaskedCrops(Dataset):
    """Seeded random crops of the demo photographs, each with its own seeded mask: ``{"images", "visible"}``."""

    def __init__(self, img_size: int, mask: RandomMask, size: int = 1024, seed: int = 0):
        self.crops = build_dataset(None, (img_size, img_size), seed, demo_size=size)
        self.mask, self.seed = mask, seed

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int):
        visible = self.mask(1, torch.Generator().manual_seed(self.seed * 100003 + index))[0]
        return {"images": self.crops[(index, 0)], "visible": visible}


def main(argv=None) -> Trainer:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/trainer")
    args = p.parse_args(argv)
    cfg = PretrainConfig(
        model="hf:swin",
        img_size=64,
        decoder_dim=64,
        decoder_depth=1,
        decoder_heads=2,
        model_args=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    )
    model = build_mim(cfg).model
    data = MaskedCrops(64, RandomMask(model.mask_grid, 0.75))
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.05,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
