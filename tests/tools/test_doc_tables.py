"""The docs' generated tables agree with the measurements they are generated from."""

import json
import shutil
from pathlib import Path

from greenmim_convert.tools import doc_tables

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_tables_are_up_to_date():
    """Every ``<!-- table:NAME -->`` block of the docs is what its ``benchmarks/`` file gives
    (``python -m greenmim_convert.tools.doc_tables`` rewrites them)."""
    assert doc_tables.render(REPO, check=True) == []


def test_a_changed_measurement_makes_its_table_stale(tmp_path):
    """Edit one number of a copy of the data: the copied docs are then out of date, and rendering fixes them."""
    shutil.copytree(REPO / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("*.png"))
    for name in doc_tables.DOCS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    path = tmp_path / "benchmarks" / "families.json"
    rows = json.loads(path.read_text())
    rows[0]["green_ms"] *= 2
    path.write_text(json.dumps(rows))
    assert doc_tables.render(tmp_path, check=True) == ["docs/performance.md"]
    assert doc_tables.render(tmp_path) == ["docs/performance.md"]
    assert doc_tables.render(tmp_path, check=True) == []
    assert f"{rows[0]['green_ms']:.0f} ms" in (tmp_path / "docs/performance.md").read_text()
