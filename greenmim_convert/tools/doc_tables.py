"""Performance and coverage tables of the docs, generated from the measurements checked in under ``benchmarks/``.

A table lives in a Markdown file between ``<!-- table:NAME -->`` and ``<!-- /table -->``; ``render`` rewrites every
such block from its data file, and ``python -m greenmim_convert.tools.doc_tables --check`` (run by the tests) fails
when a checked-in table differs from what its data gives. The data files come from the commands each table states.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/performance.md", "docs/coverage.md")
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(root: Path, name: str) -> Any:
    return json.loads((root / "benchmarks" / name).read_text())


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: List[Sequence[Any]]) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def _mib(stats: Dict[str, Any]) -> float:
    return stats["saved_bytes"] / 2**20


def headline(root: Path) -> str:
    """The Swin-T and ConvNeXt-T training steps at batch 8 (``benchmarks/headline.json``: a list of ``bench --json``
    results)."""
    rows = []
    for r in _load(root, "headline.json"):
        d, g = r["dense"], r["green"]
        rows.append(
            [
                f"`{r['model']}`",
                f"{d['time_median_s'] * 1e3:.0f} ms",
                f"{g['time_median_s'] * 1e3:.0f} ms",
                f"{r['speedup']:.2f}x",
                f"{_mib(d):.0f} -> {_mib(g):.0f} MiB",
                f"{d['flops'] / 1e9:.1f} -> {g['flops'] / 1e9:.1f} G",
                f"{r['flops_vs_ideal']:.3f}",
            ]
        )
    return _table(
        [
            "model",
            "dense step",
            "converted step",
            "speed-up",
            "activations saved for backward",
            "FLOPs",
            "FLOPs / ideal",
        ],
        rows,
    )


def families(root: Path) -> str:
    """The smallest model of every family (``benchmarks/families.json``, median of its repeated runs)."""
    rows = []
    for r in _load(root, "families.json"):
        rows.append(
            [
                f"`{r['model']}`",
                f"{r['dense_ms']:.0f} ms",
                f"{r['green_ms']:.0f} ms",
                f"{r['speedup']:.2f}x",
                f"{r['flops_ratio']:.2f}x",
                f"{r['speedup'] / r['flops_ratio']:.2f}",
                f"{r['dense_mib']:.0f} -> {r['green_mib']:.0f} MiB ({r['saved_bytes_reduction']:.0%} less)",
                f"{r['flops_vs_ideal']:.3f}",
            ]
        )
    return _table(
        [
            "model",
            "dense step",
            "converted step",
            "speed-up",
            "FLOP ratio",
            "speed-up / FLOP ratio",
            "activations saved for backward",
            "FLOPs / ideal",
        ],
        rows,
    )


def threads(root: Path) -> str:
    """Speed-up (and speed-up / FLOP ratio) per family at batch 8 on 2 and 1 threads, and at batch 32."""
    runs = [_load(root, f) for f in ("families.json", "families_1thread.json", "families_b32.json")]
    by_model = [{r["model"]: r for r in run} for run in runs]
    rows = []
    for r in runs[0]:
        cells = [f"`{r['model']}`"]
        for found in by_model:
            x = found.get(r["model"])
            cells.append(f"{x['speedup']:.2f}x ({x['speedup'] / x['flops_ratio']:.2f})" if x else "not run")
        rows.append(cells)
    return _table(["model", "batch 8, 2 threads", "batch 8, 1 thread", "batch 32, 2 threads"], rows)


def sweep(root: Path) -> str:
    """Speed-up and activation-memory ratio against mask ratio and batch size (``benchmarks/sweep.json``)."""
    rows = [
        [
            f"`{r['model']}`",
            r["batch_size"],
            f"{r['mask_ratio']:.2f}",
            f"{r['dense_ms']:.0f} ms",
            f"{r['green_ms']:.0f} ms",
            f"{r['speedup']:.2f}x",
            f"{r['flops_ratio']:.2f}x",
            f"{r['memory_ratio']:.2f}x",
        ]
        for r in _load(root, "sweep.json")
    ]
    return _table(
        ["model", "batch", "mask ratio", "dense step", "converted step", "speed-up", "FLOP ratio", "activations ratio"],
        rows,
    )


def coverage(root: Path) -> str:
    """The coverage matrix (``benchmarks/coverage.json``, written by ``greenmim-convert list --json``)."""
    rows = []
    for r in _load(root, "coverage.json"):
        detail = r["detail"].replace("|", "\\|")
        rows.append([f"`{r['model']}`", r["family"], r["status"], r["verified"], detail])
    return _table(["model", "family", "status", "verified", "detail"], rows)


def coverage_summary(root: Path) -> str:
    """One line: how many models of the coverage matrix convert."""
    rows = _load(root, "coverage.json")
    ok = sum(r["status"] == "converts" for r in rows)
    refused = ", ".join(f"`{r['model']}`" for r in rows if r["status"] != "converts")
    line = f"{ok} of the {len(rows)} model names of the coverage matrix convert"
    return line + (f"; not {refused} (reasons in [docs/coverage.md](docs/coverage.md))." if refused else ".")


TABLES: Dict[str, Callable[[Path], str]] = {
    "headline": headline,
    "families": families,
    "threads": threads,
    "sweep": sweep,
    "coverage": coverage,
    "coverage-summary": coverage_summary,
}


def render_text(text: str, root: Path = REPO) -> str:
    """``text`` with every table block rewritten from its data file."""

    def block(m: "re.Match[str]") -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
        return m.group(1) + TABLES[name](root).rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(block, text)


def render(root: Path = REPO, check: bool = False, files: Sequence[str] = DOCS) -> List[str]:
    """Rewrite the tables of ``files`` (with ``check``, only report them); returns the files that were out of date."""
    stale = []
    for name in files:
        path = root / name
        text = path.read_text()
        new = render_text(text, root)
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new)
    return stale


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date tables (exit 1 if any)")
    args = parser.parse_args(list(argv))
    stale = render(check=args.check)
    for name in stale:
        print(f"{name}: tables {'out of date' if args.check else 'rewritten'}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
