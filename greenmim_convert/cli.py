"""The ``greenmim-convert`` command line.

Exit codes: 0 success, 1 verification failed, 2 usage error or unsupported model.
"""
from __future__ import annotations

import difflib
import json
import sys
from typing import Any, Dict, List, Optional

import timm
import torch
import typer
from rich.console import Console
from rich.table import Table

from .convert import GreenModel, convert
from .errors import GreenMIMError
from .masking import random_mask

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compile timm hierarchical ViTs into models that compute only on the visible patches of masked images.",
)
console = Console()
err_console = Console(stderr=True)
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def parse_model_args(pairs: List[str]) -> Dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (numbers, lists, booleans), else strings."""
    kwargs: Dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            _fail(f"--model-arg expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        kwargs[key.strip()] = tuple(value) if isinstance(value, list) else value
    return kwargs


def suggest(name: str, names: List[str], n: int = 5) -> List[str]:
    """Close matches for a misspelt model name: similar names of the same family first."""
    scored = sorted(names, key=lambda c: -difflib.SequenceMatcher(None, name, c).ratio())
    family = name.split("_")[0][:4]
    same = [c for c in scored if c.startswith(name)] + [c for c in scored if c.startswith(family) and not c.startswith(name)]
    return (same + [c for c in scored if c not in same])[:n]


def create(name: str, model_args: List[str], img_size: Optional[int]) -> torch.nn.Module:
    """timm.create_model with random weights (nothing is downloaded); close matches for unknown names."""
    if name not in timm.list_models():
        close = suggest(name, timm.list_models())
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        _fail(f"unknown timm model {name!r}.{hint}")
    kwargs = parse_model_args(model_args)
    if img_size is not None:
        kwargs.setdefault("img_size", img_size)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        _fail(f"timm.create_model({name!r}, **{kwargs}) failed: {exc}")


def _convert(model: torch.nn.Module, img_size: Optional[int], mask_unit: Optional[int], grouping: str) -> GreenModel:
    try:
        return convert(model, img_size=img_size, mask_unit=mask_unit, grouping=grouping)
    except GreenMIMError as exc:
        _fail(f"{type(exc).__name__}: {exc}")


def report_table(green: GreenModel) -> Table:
    rep = green.report
    table = Table(title=f"passes run on {rep.model}", title_justify="left")
    table.add_column("pass", style="bold")
    table.add_column("what it did")
    for p in rep.passes:
        what = ", ".join(f"{k}: {v}" for k, v in sorted(p.counts.items())) or "nothing to do"
        table.add_row(p.name, what)
    return table


@app.command("convert")
def convert_cmd(
    model: str = typer.Argument(..., help="timm model name, e.g. swin_tiny_patch4_window7_224"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="write the converted model (safetensors + config)"),
    img_size: Optional[int] = typer.Option(None, help="image size (default: the model's)"),
    mask_unit: Optional[int] = typer.Option(None, help="mask unit in pixels (default: the model's total stride)"),
    grouping: str = typer.Option("window", help="window packing: window | dp | max"),
    model_arg: List[str] = typer.Option([], "--model-arg", help="extra timm.create_model argument key=value (repeatable)"),
) -> None:
    """Convert a timm model and print the pass report.

    Example: greenmim-convert convert swin_tiny_patch4_window7_224 -o green_swin_t.safetensors
    """
    net = create(model, model_arg, img_size)
    green = _convert(net, img_size, mask_unit, grouping)
    console.print(report_table(green))
    rep = green.report
    console.print(
        f"mask grid {green.mask_grid} of {green.mask_unit}px units; grids at strides {rep.grid_strides}; "
        f"minimal mask unit {rep.min_mask_unit}px"
    )
    if output:
        from .io import save

        save(green, output, parse_model_args(model_arg) | ({"img_size": img_size} if img_size else {}))
        console.print(f"wrote {output}")


@app.command("verify")
def verify_cmd(
    model: str = typer.Argument(..., help="timm model name"),
    mask_ratio: float = typer.Option(0.75, help="fraction of mask units hidden in every sample"),
    batch_size: int = typer.Option(2, help="images per batch (each gets its own mask)"),
    img_size: Optional[int] = typer.Option(None, help="image size (default: the model's)"),
    mask_unit: Optional[int] = typer.Option(None, help="mask unit in pixels"),
    dtype: str = typer.Option("float64", help="float64 (exactness, rtol 1e-10) or float32 (rtol 1e-5)"),
    seed: int = typer.Option(0, help="seed of the weights, images and masks"),
    grouping: str = typer.Option("window", help="window packing: window | dp | max"),
    model_arg: List[str] = typer.Option([], "--model-arg", help="extra timm.create_model argument key=value"),
) -> None:
    """Convert a model and compare it with the dense masked reference on random images and masks.

    Exits 1 when any stage differs by more than the tolerance.
    Example: greenmim-convert verify swin_tiny_patch4_window7_224 --mask-ratio 0.75
    """
    from .verify import verify

    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        _fail(f"--batch-size must be positive, got {batch_size}")
    torch.manual_seed(seed)
    net = create(model, model_arg, img_size).to(DTYPES[dtype]).eval()
    green = _convert(net, img_size, mask_unit, grouping)
    gen = torch.Generator().manual_seed(seed)
    try:
        visible = random_mask(batch_size, green.mask_grid, mask_ratio, generator=gen)
    except GreenMIMError as exc:
        _fail(str(exc))
    images = torch.randn(batch_size, 3, *green.img_size, generator=gen, dtype=DTYPES[dtype])
    with console.status(f"running {model} converted and dense (masked reference) ..."):
        rep = verify(net, green, images, visible)
    table = Table(title=f"{model}: converted vs dense masked reference, mask ratio {mask_ratio}, batch {batch_size}, {dtype}", title_justify="left")
    for col in ("output", "grid", "visible tokens", "max abs err", "max rel err", "ok"):
        table.add_column(col, justify="right" if col != "output" else "left")
    for r in rep.rows:
        table.add_row(r.name, f"{r.grid[0]}x{r.grid[1]}", str(r.tokens), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                      "[green]yes[/]" if r.ok else "[red]NO[/]")
    console.print(table)
    console.print(f"tolerance: max rel err <= {rep.rtol:g}  ->  " + ("[bold green]OK[/]" if rep.ok else "[bold red]MISMATCH[/]"))
    raise typer.Exit(EXIT_OK if rep.ok else EXIT_MISMATCH)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GreenMIMError as exc:
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
