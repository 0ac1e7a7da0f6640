"""What a pre-training run reports: one JSON line per step, TensorBoard event files, a progress bar with
images/s and ETA, and a loss plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

TENSORBOARD_MISSING = (
    "note: the tensorboard package is not installed, so no TensorBoard event files are written "
    "(pip install tensorboard, or 'greenmim-convert[examples]'); log.jsonl has every step"
)


def read_log(path: Path) -> List[Dict[str, Any]]:
    """Records of a JSONL log (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def restart_log(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (all earlier steps of a resumed run), drop the rest."""
    kept = [r for r in read_log(path) if r["step"] <= step] if step else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class TensorBoard:
    """A ``SummaryWriter`` in ``log_dir`` when the tensorboard package is installed; else a no-op that said so."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: Optional[int] = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print(TENSORBOARD_MISSING, file=sys.stderr)
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A ``(3, H, W)`` image in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich (else tqdm, else plain text) progress bar with loss, images/s and ETA; rank 0 only."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int):
        self.total, self.log_every, self.kind, self.bar = total, max(1, log_every), "none", None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]pre-train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[ips]:.1f} img/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
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

    def update(self, step: int, loss: float, ips: float, eta_s: float) -> None:
        if self.kind == "rich":
            self.bar.update(self.task, completed=step, loss=loss, ips=ips)
        elif self.kind == "tqdm":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
        elif self.kind == "text" and (step % self.log_every == 0 or step == self.total):
            print(f"step {step}/{self.total}  loss {loss:.4f}  {ips:.1f} img/s  ETA {eta_s:.0f} s", flush=True)

    def close(self) -> None:
        if self.kind == "rich":
            self.bar.stop()
        elif self.kind == "tqdm":
            self.bar.close()


def write_loss_plot(log_path: Path, png_path: Path, title: str = "") -> Optional[Path]:
    """Loss per step and its moving average as a PNG; None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: matplotlib is not installed, no loss plot written (pip install 'greenmim-convert[examples]')",
            file=sys.stderr,
        )
        return None
    records = read_log(log_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=1, label="loss per step")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"moving average ({window} steps)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("masked-unit MSE")
    ax.set_title(title or "MIM pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
