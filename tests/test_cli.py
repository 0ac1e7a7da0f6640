"""The command line: convert, verify, exit codes, help, suggestions."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from greenmim_convert.cli import app, suggest

runner = CliRunner()
TINY = ["--model-arg", "embed_dim=32", "--model-arg", "depths=[2,2,2,2]", "--model-arg", "num_heads=[1,2,4,8]",
        "--model-arg", "window_size=4", "--img-size", "128"]
SWIN = "swin_tiny_patch4_window7_224"


def test_convert_prints_report_and_writes_file(tmp_path):
    out = tmp_path / "g.safetensors"
    res = runner.invoke(app, ["convert", SWIN, *TINY, "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for word in ("window-attention", "patch-merging", "WindowAttention: 8", "minimal mask unit 32px"):
        assert word in text
    from greenmim_convert.io import load

    green = load(str(out))
    assert green.mask_grid == (4, 4)


def test_verify_ok_and_exit_code():
    res = runner.invoke(app, ["verify", SWIN, *TINY, "--mask-ratio", "0.75", "--batch-size", "3", "--seed", "7"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "stage3" in res.output


def test_verify_reports_mismatch_with_exit_1(monkeypatch):
    import greenmim_convert.ops as ops

    real = ops.space_to_depth
    monkeypatch.setattr(ops, "space_to_depth", lambda *a, **k: real(*a, **k) * 1.001)
    res = runner.invoke(app, ["verify", SWIN, *TINY, "--mask-ratio", "0.5"])
    assert res.exit_code == 1, res.output
    assert "MISMATCH" in res.output


@pytest.mark.parametrize("args", [["convert", "swin_tinny_patch4"], ["verify", "swin_tiny_patch4_window7"]])
def test_unknown_model_suggests(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "Did you mean" in text and SWIN in text


def test_bad_option_values_exit_2():
    assert runner.invoke(app, ["verify", SWIN, *TINY, "--dtype", "int8"]).exit_code == 2
    assert runner.invoke(app, ["verify", SWIN, *TINY, "--mask-ratio", "2"]).exit_code == 2
    assert runner.invoke(app, ["convert", SWIN, *TINY, "--mask-unit", "48"]).exit_code == 2


@pytest.mark.parametrize("cmd", ["convert", "verify"])
def test_help_has_examples(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and "Example" in res.output


def test_suggest_prefers_prefix():
    assert suggest("swin_tiny", ["resnet50", "swin_tiny_patch4_window7_224", "swinv2_tiny"])[0] == "swin_tiny_patch4_window7_224"


def test_list_reports_status_and_reason(monkeypatch, tmp_path):
    import greenmim_convert.coverage as cov

    monkeypatch.setattr(cov, "family_models", lambda fams: ["pvt_v2_b0", "gcvit_xxtiny"])
    md = tmp_path / "cov.md"
    res = runner.invoke(app, ["list", "--verify", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    text = md.read_text()
    assert "| `pvt_v2_b0` | pvt_v2 | verified |" in text
    assert "| `gcvit_xxtiny` | gcvit | unsupported |" in text and "MaxPool2d" in text
    assert runner.invoke(app, ["list", "--family", "resnet"]).exit_code == 2
