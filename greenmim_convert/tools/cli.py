"""The ``greenmim-convert`` command line.

Exit codes: 0 success, 1 verification failed, 2 usage error or unsupported model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from greenmim_convert.api.convert import GreenModel, convert
from greenmim_convert.api.masking import random_mask
from greenmim_convert.errors import GreenMIMError
from greenmim_convert.mim.command import export_cmd, pretrain_cmd
from greenmim_convert.tools import model_args, models
from greenmim_convert.tools.models import suggest  # noqa: F401  (part of the CLI's interface)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compile hierarchical ViTs (timm names, torchvision:NAME, or hf:TYPE for a transformers model type) into "
    "models that compute only on the visible patches of masked images.",
)
console = Console()
err_console = Console(stderr=True)
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
DTYPES = {"float64": torch.float64, "float32": torch.float32}
MODEL_HELP = (
    "timm model name, a pretrained tag allowed (swin_tiny_patch4_window7_224.ms_in1k: its config, not its "
    "weights), torchvision:NAME for a torchvision classifier, or hf:TYPE for a transformers model type "
    "(hf:swin, hf:convnextv2; hf:TYPE/backbone for its AutoBackbone), built from its default config, or "
    "package.module:factory, a Python callable returning an nn.Module (given --model-arg keywords and "
    "img_size when it takes one); random weights, nothing is downloaded"
)
IMG_SIZE_HELP = (
    "image size (default: the model's; for torchvision models, which do not state theirs, the crop size of "
    "torchvision's default weights: 224, 256 for Swin V2; for hf:TYPE the config's image_size, which this "
    "sets where the config has one, else 224)"
)
MODEL_ARG_HELP = (
    "extra model argument key=value (repeatable; values as JSON or Python literals, [a,b] a list), for "
    "timm.create_model, torchvision's builder or the transformers config of hf:TYPE (keys it lacks are "
    "refused); architecture keys a torchvision builder fixes (depths, embed_dim, ...) go to its model class"
)
GROUPING_HELP = "window packing: dp (ours) | max (GreenMIM) | window (one window per group)"


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def parse_model_args(pairs: List[str]) -> Dict[str, Any]:
    """``--model-arg key=value`` pairs for the model builder (exit 2 on a malformed pair)."""
    try:
        return model_args.parse_model_args(pairs)
    except GreenMIMError as exc:
        _fail(str(exc))


def create(name: str, model_args: List[str], img_size: Optional[int]) -> models.BuiltModel:
    """Build a timm, ``torchvision:`` or ``hf:`` model with random weights (nothing is downloaded); exit 2 with
    close matches for an unknown name."""
    kwargs = parse_model_args(model_args)
    try:
        return models.build(name, kwargs, img_size)
    except GreenMIMError as exc:
        _fail(str(exc))


def _convert(built: models.BuiltModel, mask_unit: Optional[int], grouping: str) -> GreenModel:
    """Convert at the built model's image size; the config keeps the command-line name (a timm tag, the
    ``torchvision:`` or ``hf:`` prefix), which ``load`` rebuilds the model from."""
    try:
        green = convert(built.model, img_size=built.img_size, mask_unit=mask_unit, grouping=grouping)
    except GreenMIMError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    green.config.model_name = green.report.model = built.name
    green.config.model_kwargs = dict(built.kwargs)
    return green


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line, for errors of code this CLI calls into."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


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
    model: str = typer.Argument(..., help=MODEL_HELP + ", e.g. swin_tiny_patch4_window7_224 or torchvision:swin_t"),
    output: Optional[str] = typer.Option(
        None, "-o", "--output", help="write the converted model (safetensors + config)"
    ),
    img_size: Optional[int] = typer.Option(None, help=IMG_SIZE_HELP),
    mask_unit: Optional[int] = typer.Option(None, help="mask unit in pixels (default: the model's total stride)"),
    grouping: str = typer.Option("dp", help=GROUPING_HELP),
    model_arg: List[str] = typer.Option([], "--model-arg", help=MODEL_ARG_HELP),
) -> None:
    """Convert a timm, torchvision or transformers model and print the pass report.

    Example: greenmim-convert convert swin_tiny_patch4_window7_224 -o green_swin_t.safetensors
    Example: greenmim-convert convert swin_tiny_patch4_window7_224.ms_in1k
    Example: greenmim-convert convert torchvision:swin_t --img-size 224
    Example: greenmim-convert convert hf:resnet --model-arg depths=[2,2,2,2]
    """
    built = create(model, model_arg, img_size)
    green = _convert(built, mask_unit, grouping)
    console.print(report_table(green))
    rep = green.report
    console.print(
        f"mask grid {green.mask_grid} of {green.mask_unit}px units; grids at strides {rep.grid_strides}; "
        f"minimal mask unit {rep.min_mask_unit}px"
    )
    if output:
        from greenmim_convert.api.io import save

        save(green, output, built.kwargs)
        console.print(f"wrote {output}")


@app.command("verify")
def verify_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    mask_ratio: float = typer.Option(0.75, help="fraction of mask units hidden in every sample"),
    batch_size: int = typer.Option(2, help="images per batch (each gets its own mask)"),
    img_size: Optional[int] = typer.Option(None, help=IMG_SIZE_HELP),
    mask_unit: Optional[int] = typer.Option(None, help="mask unit in pixels"),
    dtype: str = typer.Option("float64", help="float64 (exactness, rtol 1e-10) or float32 (rtol 1e-5)"),
    seed: int = typer.Option(0, help="seed of the weights, images and masks"),
    grouping: str = typer.Option("dp", help=GROUPING_HELP),
    model_arg: List[str] = typer.Option([], "--model-arg", help=MODEL_ARG_HELP),
) -> None:
    """Convert a model and compare it with the dense masked reference on random images and masks.

    Exits 1 when any stage differs by more than the tolerance.
    Example: greenmim-convert verify swin_tiny_patch4_window7_224 --mask-ratio 0.75
    Example: greenmim-convert verify hf:resnet --img-size 128
    """
    from greenmim_convert.oracle.verify import verify

    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        _fail(f"--batch-size must be positive, got {batch_size}")
    torch.manual_seed(seed)
    built = create(model, model_arg, img_size)
    net = built.model.to(DTYPES[dtype]).eval()
    green = _convert(built, mask_unit, grouping)
    gen = torch.Generator().manual_seed(seed)
    try:
        visible = random_mask(batch_size, green.mask_grid, mask_ratio, generator=gen)
    except GreenMIMError as exc:
        _fail(str(exc))
    images = torch.randn(batch_size, 3, *green.img_size, generator=gen, dtype=DTYPES[dtype])
    with console.status(f"running {model} converted and dense (masked reference) ..."):
        try:
            rep = verify(net, green, images, visible)
        except Exception as exc:  # the converted model or the dense oracle cannot run this model
            _fail(f"verify of {model} failed: {_one_line(exc)}")
    table = Table(
        title=f"{model}: converted vs dense masked reference, mask ratio {mask_ratio}, batch {batch_size}, {dtype}",
        title_justify="left",
    )
    for col in ("output", "grid", "visible tokens", "max abs err", "max rel err", "ok"):
        table.add_column(col, justify="right" if col != "output" else "left")
    for r in rep.rows:
        table.add_row(
            r.name,
            f"{r.grid[0]}x{r.grid[1]}",
            str(r.tokens),
            f"{r.max_abs:.2e}",
            f"{r.max_rel:.2e}",
            "[green]yes[/]" if r.ok else "[red]NO[/]",
        )
    console.print(table)
    console.print(
        f"tolerance: max rel err <= {rep.rtol:g}  ->  " + ("[bold green]OK[/]" if rep.ok else "[bold red]MISMATCH[/]")
    )
    raise typer.Exit(EXIT_OK if rep.ok else EXIT_MISMATCH)


PROFILE_TOP = 15  # ops listed per model by bench --profile


def _print_census(res) -> None:
    """Bytes saved for backward per autograd node kind, dense against converted."""
    from greenmim_convert.tools.bench import census_rows

    table = Table(title="activations saved for backward, by the autograd node that saved them", title_justify="left")
    for col in ("node", "dense", "converted", "converted share"):
        table.add_column(col, justify="right" if col != "node" else "left")
    total = max(res.green.saved_bytes, 1)
    for kind, d, g in census_rows(res.saved_by_node):
        table.add_row(kind, f"{d / 2**20:.1f} MiB", f"{g / 2**20:.1f} MiB", f"{100 * g / total:.0f}%")
    console.print(table)


def _print_profile(res) -> None:
    """Top ops by self CPU time of one step of each model (torch.profiler)."""
    for name, title in (("dense", "dense"), ("green", "converted")):
        table = Table(title=f"{title} step: top ops by self CPU time", title_justify="left")
        for col in ("op", "self CPU", "calls"):
            table.add_column(col, justify="right" if col != "op" else "left")
        for row in res.profile.get(name, []):
            table.add_row(row.op, f"{row.self_cpu_ms:.1f} ms", str(row.calls))
        console.print(table)


@app.command("bench")
def bench_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    batch_size: int = typer.Option(8, help="images per step, each with its own mask"),
    img_size: Optional[int] = typer.Option(None, help=IMG_SIZE_HELP),
    mask_ratio: float = typer.Option(0.75, help="fraction of mask units hidden"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32 or float64"),
    steps: int = typer.Option(5, help="timed steps after one warm-up step"),
    grouping: str = typer.Option("dp", help=GROUPING_HELP),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the numbers to this JSON file"),
    seed: int = typer.Option(0, help="seed of weights, images and masks"),
    model_arg: List[str] = typer.Option([], "--model-arg", help=MODEL_ARG_HELP),
    compile_: bool = typer.Option(False, "--compile", help="also time both models under torch.compile (inductor)"),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="also profile one more step of each model (torch.profiler) and print the ops taking most self CPU time",
    ),
    threads: int = typer.Option(0, help="torch CPU threads for both models (0: PyTorch's default)"),
) -> None:
    """Time forward+backward of the converted model against the dense SimMIM-style model.

    Both run in this process, alternating step by step; ratios are dense / converted.
    Example: greenmim-convert bench swin_tiny_patch4_window7_224 --batch-size 8 --mask-ratio 0.75
    """
    from rich.progress import Progress

    from greenmim_convert.compiler.capture import is_timm_model
    from greenmim_convert.tools.bench import run_bench

    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        _fail(f"--device must be cpu or cuda (and cuda needs a GPU), got {device!r}")
    if steps < 1 or batch_size < 1 or not 0.0 <= mask_ratio <= 1.0:
        _fail("--steps and --batch-size must be positive and --mask-ratio in [0, 1]")
    if threads < 0:
        _fail(f"--threads must be 0 (PyTorch's default) or positive, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    built = create(model, model_arg, img_size)
    net = built.model.to(device=device, dtype=DTYPES[dtype]).train()
    green = _convert(built, None, grouping)
    dense_fn = "forward_features" if is_timm_model(net) else "forward"
    console.print(
        f"[bold]{model}[/]: dense SimMIM-style {dense_fn} (mask token at hidden units) vs converted model on visible "
        f"units; batch {batch_size}, {green.img_size[0]}px, mask ratio {mask_ratio}, per-image masks, {device} "
        f"{dtype}, "
        f"forward+backward, {steps} timed steps, {torch.get_num_threads()} CPU threads"
    )
    with Progress(console=console, transient=True) as bar:
        total = 2 + 2 * (steps + 1) + (2 * (steps + 2) if compile_ else 0) + 2 * profile
        task = bar.add_task("benchmarking", total=total)
        try:
            res = run_bench(
                net,
                green,
                batch_size,
                mask_ratio,
                steps,
                seed=seed,
                progress=lambda msg: bar.update(task, advance=1, description=msg),
                compile=compile_,
                profile=PROFILE_TOP * profile,
            )
        except GreenMIMError as exc:
            _fail(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # the dense or converted model fails in a step
            _fail(f"bench of {model} failed: {_one_line(exc)}")
    table = Table(title="per training step (forward + backward)", title_justify="left")
    for col in ("", "dense", "converted", "dense / converted"):
        table.add_column(col, justify="right")
    d, g = res.dense, res.green
    table.add_row(
        "wall time (median)",
        f"{d.time_median_s * 1e3:.0f} ms",
        f"{g.time_median_s * 1e3:.0f} ms",
        f"{res.speedup:.2f}x",
    )
    table.add_row("wall time (spread)", f"{d.time_spread_s * 1e3:.0f} ms", f"{g.time_spread_s * 1e3:.0f} ms", "")
    table.add_row(
        "activations saved for backward",
        f"{d.saved_bytes / 2**20:.1f} MiB",
        f"{g.saved_bytes / 2**20:.1f} MiB",
        f"{d.saved_bytes / max(g.saved_bytes, 1):.2f}x ({100 * res.saved_bytes_reduction:.0f}% less)",
    )
    table.add_row("FLOPs", f"{d.flops / 1e9:.1f} G", f"{g.flops / 1e9:.1f} G", f"{res.flops_ratio:.2f}x")
    table.add_row(
        "FLOPs vs visible-only ideal", "", f"{res.flops_ideal / 1e9:.1f} G ideal", f"{res.flops_vs_ideal:.3f} of ideal"
    )
    if d.peak_cuda_bytes is not None:
        table.add_row(
            "peak CUDA memory",
            f"{d.peak_cuda_bytes / 2**20:.0f} MiB",
            f"{g.peak_cuda_bytes / 2**20:.0f} MiB",
            f"{d.peak_cuda_bytes / max(g.peak_cuda_bytes, 1):.2f}x",
        )
    console.print(table)
    if res.compiled is not None:
        _print_compiled(res.compiled, d.time_median_s, g.time_median_s)
    gt = Table(title=f"window groupings: strategy {grouping}", title_justify="left")
    for col in ("grid", "window", "shift", "tokens", "groups x size", "logits / lower bound", "time"):
        gt.add_column(col, justify="right")
    for r in res.grouping:
        gt.add_row(
            f"{r.grid[0]}x{r.grid[1]}",
            f"{r.window[0]}x{r.window[1]}",
            f"{r.shift[0]},{r.shift[1]}",
            str(r.tokens),
            r.groups,
            f"{r.padding_overhead:.2f}",
            f"{r.time_ms:.2f} ms",
        )
    console.print(gt)
    _print_census(res)
    if profile:
        _print_profile(res)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res.to_dict(), f, indent=2)
        console.print(f"wrote {json_out}")


def _print_compiled(c, dense_eager: float, green_eager: float) -> None:
    """The ``bench --compile`` table: compiled step times next to the eager ones, compile time apart."""
    table = Table(title="torch.compile (inductor), per training step after warm-up", title_justify="left")
    for col in ("", "dense", "converted", "dense / converted"):
        table.add_column(col, justify="right")
    table.add_row(
        "eager wall time (median)",
        f"{dense_eager * 1e3:.0f} ms",
        f"{green_eager * 1e3:.0f} ms",
        f"{dense_eager / green_eager:.2f}x",
    )
    table.add_row(
        "compiled wall time (median)",
        f"{c.dense_time_median_s * 1e3:.0f} ms",
        f"{c.green_time_median_s * 1e3:.0f} ms",
        f"{c.speedup:.2f}x",
    )
    table.add_row("eager / compiled", f"{c.dense_vs_eager:.2f}x", f"{c.green_vs_eager:.2f}x", "")
    table.add_row("first step (compiles)", f"{c.dense_compile_s:.1f} s", f"{c.green_compile_s:.1f} s", "")
    console.print(table)


@app.command("list")
def list_cmd(
    family: List[str] = typer.Option(
        [],
        "--family",
        help="restrict to these families (repeatable): timm families, torchvision for its Swin, "
        "Swin V2 and MaxViT, hf for transformers' vision backbones (hf:TYPE); default: all (hf where transformers "
        "is installed)",
    ),
    model: List[str] = typer.Option(
        [],
        "--model",
        "--models",
        help="list these models (repeatable; any name convert takes), after the families "
        "given by --family (none unless given)",
    ),
    model_arg: List[str] = typer.Option([], "--model-arg", help=MODEL_ARG_HELP + "; given to every listed model"),
    verify_models: bool = typer.Option(False, "--verify", help="also verify each converted model on a masked image"),
    verify_smallest: bool = typer.Option(
        False, "--verify-smallest", help="verify the smallest converting model of each family (by parameters)"
    ),
    markdown_out: Optional[str] = typer.Option(None, "--markdown", help="write the table as markdown to this file"),
    json_out: Optional[str] = typer.Option(
        None,
        "--json",
        help="write the rows as JSON to this file (the data of docs/coverage.md: benchmarks/coverage.json)",
    ),
) -> None:
    """Coverage matrix: every model of the hierarchical families (timm's, torchvision's under the family
    torchvision, transformers' vision backbones under the family hf), whether it converts, and why not.

    Example: greenmim-convert list --family swin --family pvt_v2 --verify
    Example: greenmim-convert list --family torchvision
    Example: greenmim-convert list --family hf
    Example: greenmim-convert list --model hf:swin --model swin_tiny_patch4_window7_224.ms_in1k
    """
    from rich.progress import Progress

    from greenmim_convert.tools.coverage import FAMILIES, coverage, family_models, markdown

    unknown = [f for f in family if f not in FAMILIES]
    if unknown:
        _fail(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    kwargs = parse_model_args(model_arg)
    if family:
        wanted = family
    elif model:
        wanted = []
    else:
        wanted = [f for f in FAMILIES if f != models.HF or models.has_transformers()]
    names = list(dict.fromkeys(family_models(wanted) + list(model)))
    try:
        if any(models.is_hf(n) for n in names):
            models.require_transformers()
        for name in model:
            models.check_name(name)
    except GreenMIMError as exc:
        _fail(str(exc))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("converting", total=len(names))
        mode = "all" if verify_models else "smallest" if verify_smallest else "none"
        rows = coverage(names, mode, progress=lambda n: bar.update(task, advance=1, description=n), model_kwargs=kwargs)
    table = Table(title=f"{len(rows)} models", title_justify="left")
    for col in ("model", "family", "status", "verified", "detail"):
        table.add_column(col)
    colors = {"converts": "green", "unsupported": "yellow", "error": "red", "✓": "green", "✗": "red", "not run": "dim"}
    for r in rows:
        table.add_row(
            r.model, r.family, f"[{colors[r.status]}]{r.status}[/]", f"[{colors[r.verified]}]{r.verified}[/]", r.detail
        )
    console.print(table)
    ok = sum(r.status == "converts" for r in rows)
    checked = [r for r in rows if r.verified != "not run"]
    console.print(
        f"{ok} of {len(rows)} convert"
        + (f"; {sum(r.verified == '✓' for r in checked)} of {len(checked)} verified" if checked else "")
    )
    if markdown_out:
        with open(markdown_out, "w") as f:
            f.write(markdown(rows) + "\n")
        console.print(f"wrote {markdown_out}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1, ensure_ascii=False)
            f.write("\n")
        console.print(f"wrote {json_out}")
    if any(r.verified == "✗" for r in rows):
        raise typer.Exit(1)


app.command("pretrain")(pretrain_cmd)
app.command("export")(export_cmd)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GreenMIMError as exc:
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
