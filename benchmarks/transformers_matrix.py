"""Every transformers model type of the test configurations, converted as it is: one markdown table.

For each type of ``tests/hf_models.py`` (``CONFIGS``: its ``AutoModel``; ``BACKBONES``: its ``AutoBackbone``
with every stage an output), tiny config, float64, drop path 0.1, random weights: whether it converts or the
refusal (one line: the operation, its module and the reason), the seconds ``convert`` took (to the refusal for
a refused one), what the canonicalize pass rewrote (its report in ``GreenModel.report``), and the largest
relative error of any stage against the transformers oracle, masked (per-sample masks), in eval mode and in
training mode (the same seed on both sides).

    python benchmarks/transformers_matrix.py
    python benchmarks/transformers_matrix.py --types swin convnext --threads 1
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import BACKBONES, CONFIGS, build_hf, image_size  # noqa: E402  (the test configurations)

import greenmim_convert as gmc  # noqa: E402
from greenmim_convert.errors import ImageWideMixingError, UnsupportedOperationError  # noqa: E402
from greenmim_convert.oracle.verify import compare_tokens, reference_of  # noqa: E402

HEADER = (
    "| model | converts | convert s | canonicalize rewrote | masked max rel err eval / train |\n"
    "| --- | --- | --- | --- | --- |"
)


def refusal(exc: Exception) -> str:
    """A conversion error on one line: the reason, the operation and its module."""
    if isinstance(exc, UnsupportedOperationError) and exc.where:
        op = re.search(r"\(call_function ([^)]*)\)", exc.where)
        module = re.search(r"in module '([^']*)'", exc.where)
        where = " ".join(filter(None, [op and op.group(1), module and f"in {module.group(1)}"]))
        return " ".join(f"{where}: {exc.reason}".split())
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def canonical_counts(green: gmc.GreenModel) -> str:
    """What the canonicalize pass rewrote, ``kind: count`` per kind of rewrite."""
    counts: Dict[str, int] = {}
    for record in green.report.passes:
        if record.name == "canonicalize":
            counts = record.counts
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing"


def masked_error(model: nn.Module, green: gmc.GreenModel, train: bool, seed: int = 0) -> float:
    """Largest relative error of any stage or the final features against the oracle, three images with
    per-sample masks (one half visible, one all visible, one a single unit); training mode draws drop path
    from the same seed on both sides, and the BatchNorm statistics are put back afterwards."""
    gen = torch.Generator().manual_seed(seed)
    visible = torch.rand(3, *green.mask_grid, generator=gen) < 0.5
    visible[0].view(-1)[0] = True
    visible[1] = True
    visible[2] = False
    visible[2].view(-1)[-1] = True
    images = torch.randn(3, 3, *green.img_size, generator=gen, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train)
    green.train(train)
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            out = green(images, visible)
            model.load_state_dict(state)
            torch.manual_seed(seed)
            ref = reference_of(model, green, images, visible)
    finally:
        model.load_state_dict(state)
        model.eval()
        green.eval()
    if len(out.stages) != len(ref.stages):
        return float("inf")
    pairs = zip(out.stages + [out.last], ref.stages + [ref.last])
    return max(compare_tokens("", got, want, 0.0).max_rel for got, want in pairs)


def row(model_type: str, backbone: bool) -> Tuple[str, Optional[str]]:
    """One table row, and the refusal (None when it converts)."""
    torch.manual_seed(sum(map(ord, model_type)) + backbone)
    name = f"{model_type}{'/backbone' if backbone else ''}"
    model = build_hf(model_type, backbone=backbone)
    size = image_size(model_type)
    start = time.perf_counter()
    whole = ""
    try:
        try:
            green = gmc.convert(model, img_size=size)
        except ImageWideMixingError:  # groups spanning the image: whole-sample masks only
            green, whole = gmc.convert(model, img_size=size, mask_unit=size), ", whole samples only"
    except Exception as exc:  # a refusal, or any other failure of the compiler: reported, not raised
        seconds = time.perf_counter() - start
        reason = refusal(exc)
        return f"| `{name}` | refused: {reason} | {seconds:.1f} | | |", reason
    seconds = time.perf_counter() - start
    try:
        errors = " / ".join(f"{masked_error(model, green, train):.1e}" for train in (False, True))
    except Exception as exc:  # the converted model or the oracle cannot run it
        errors = f"failed: {refusal(exc)}"
    return f"| `{name}` | yes{whole} | {seconds:.1f} | {canonical_counts(green)} | {errors} |", None


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="*", default=None, help="model types (default: every type of the tests)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (these models are tiny)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [(t, False) for t in CONFIGS] + [(t, True) for t in BACKBONES]
    if args.types is not None:
        cases = [c for c in cases if c[0] in args.types]
    print(HEADER, flush=True)
    refused = 0
    for model_type, backbone in cases:
        line, reason = row(model_type, backbone)
        refused += reason is not None
        print(line, flush=True)
    print(f"\n{len(cases) - refused} of {len(cases)} convert; torch {torch.__version__}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
