"""Sweep mask ratio and batch size for Swin-T and Swin-B; plot speed-up and activation-memory ratio.

Each point is one ``run_bench`` (dense SimMIM-style vs converted, forward + backward, alternating
in this process). Writes a JSON with every measurement and a PNG with two panels.

    python benchmarks/sweep.py --models swin_tiny_patch4_window7_224 swin_base_patch4_window7_224 \\
        --ratios 0.5 0.6 0.7 0.75 0.8 0.9 --batch-sizes 4 8 --out benchmarks/sweep
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

import timm
import torch

import greenmim_convert as gmc
from greenmim_convert.tools.bench import run_bench


def sweep(models: List[str], ratios: List[float], batch_sizes: List[int], steps: int, grouping: str) -> List[dict]:
    """One benchmark per (model, batch size, ratio); the model is converted once."""
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).train()
        green = gmc.convert(model, grouping=grouping)
        for batch in batch_sizes:
            for ratio in ratios:
                res = run_bench(model, green, batch, ratio, steps)
                rows.append(
                    dict(
                        model=name,
                        batch_size=batch,
                        mask_ratio=ratio,
                        speedup=res.speedup,
                        memory_ratio=res.dense.saved_bytes / res.green.saved_bytes,
                        saved_bytes_reduction=res.saved_bytes_reduction,
                        flops_ratio=res.flops_ratio,
                        dense_ms=1e3 * res.dense.time_median_s,
                        green_ms=1e3 * res.green.time_median_s,
                    )
                )
                print(
                    f"{name} batch {batch} ratio {ratio:.2f}: {res.speedup:.2f}x faster, "
                    f"{100 * res.saved_bytes_reduction:.0f}% fewer activation bytes, {res.flops_ratio:.2f}x fewer "
                    f"FLOPs",
                    flush=True,
                )
    return rows


def plot(rows: List[dict], path: str) -> None:
    """Speed-up and activation-memory ratio against mask ratio, one line per (model, batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["model"], r["batch_size"]) for r in rows})
    for model, batch in keys:
        pts = sorted(
            (r for r in rows if r["model"] == model and r["batch_size"] == batch), key=lambda r: r["mask_ratio"]
        )
        label = f"{model.split('_patch')[0]}, batch {batch}"
        axes[0].plot([p["mask_ratio"] for p in pts], [p["speedup"] for p in pts], marker="o", label=label)
        axes[1].plot([p["mask_ratio"] for p in pts], [p["memory_ratio"] for p in pts], marker="o", label=label)
    axes[0].set(xlabel="mask ratio", ylabel="dense time / converted time", title="training step speed-up (CPU)")
    axes[1].set(xlabel="mask ratio", ylabel="dense bytes / converted bytes", title="activations saved for backward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.9])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grouping", default="dp")
    parser.add_argument("--out", default="benchmarks/sweep", help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    rows = sweep(args.models, args.ratios, args.batch_sizes, args.steps, args.grouping)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
