"""The command line: convert, verify, exit codes, help, suggestions, timm and torchvision model names."""
from __future__ import annotations


import pytest
from typer.testing import CliRunner

from greenmim_convert.cli import app, suggest

runner = CliRunner()
TINY = ["--model-arg", "embed_dim=32", "--model-arg", "depths=[2,2,2,2]", "--model-arg", "num_heads=[1,2,4,8]",
        "--model-arg", "window_size=4", "--img-size", "128"]
SWIN = "swin_tiny_patch4_window7_224"
TV_SWIN = "torchvision:swin_t"
# torchvision's swin_t builder fixes these; greenmim-convert hands them to SwinTransformer instead (embed_dim
# 24, not 32: a (B, 32, 32, 32) stage at 128px would read as NCHW and NHWC alike)
TV_TINY = ["--model-arg", "embed_dim=24", "--model-arg", "depths=[2,2,2,2]", "--model-arg", "num_heads=[1,2,4,8]",
           "--model-arg", "window_size=[4,4]", "--img-size", "128"]


def flat(output: str) -> str:
    """CLI output on one line, table borders dropped, so that wrapped cells read as plain text."""
    return " ".join(output.replace("│", " ").split())


def test_convert_prints_report_and_writes_file(tmp_path):
    out = tmp_path / "g.safetensors"
    res = runner.invoke(app, ["convert", SWIN, *TINY, "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = flat(res.output)
    for word in ("attention", "window attention", "patch-merging", "space-to-depth", "minimal mask unit 32px"):
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


def run_list(monkeypatch, tmp_path, names, *flags):
    """``greenmim-convert list FLAGS --markdown FILE`` over ``names`` only: the result and the markdown written."""
    import greenmim_convert.coverage as cov

    monkeypatch.setattr(cov, "family_models", lambda fams: list(names))
    md = tmp_path / "cov.md"
    res = runner.invoke(app, ["list", *flags, "--markdown", str(md)])
    return res, md.read_text() if md.exists() else ""


def test_list_reports_status_and_reason(monkeypatch, tmp_path):
    from greenmim_convert.passes import layout_analysis

    # without its rule, GC ViT's broadcast of the global queries over windows is an op no pass converts
    rules = [(name, rule) for name, rule in layout_analysis.LAYOUT_RULES if name != "dense-island"]
    monkeypatch.setattr(layout_analysis, "LAYOUT_RULES", rules)
    res, text = run_list(monkeypatch, tmp_path, ["pvt_v2_b0", "gcvit_xxtiny"], "--verify")
    assert res.exit_code == 0, res.output
    assert "| `pvt_v2_b0` | pvt_v2 | converts | ✓ |" in text
    assert "| `gcvit_xxtiny` | gcvit | unsupported | not run |" in text and "repeat_interleave" in text
    assert runner.invoke(app, ["list", "--family", "resnet"]).exit_code == 2


def test_torchvision_convert_writes_file_that_loads(tmp_path):
    out = tmp_path / "tv.safetensors"
    res = runner.invoke(app, ["convert", TV_SWIN, *TV_TINY, "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = flat(res.output)
    assert f"passes run on {TV_SWIN}" in text and "window attention" in text and "mask grid (4, 4) of 32px units" in text
    from greenmim_convert.io import load

    green = load(str(out))
    assert green.config.model_name == TV_SWIN and green.config.model_kwargs["depths"] == [2, 2, 2, 2]
    assert green.img_size == (128, 128) and green.mask_grid == (4, 4)
    assert type(green.source_model).__name__ == "SwinTransformer" and len(green.source_model.features[1]) == 2


def test_torchvision_verify_ok():
    res = runner.invoke(app, ["verify", TV_SWIN, *TV_TINY, "--batch-size", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "stage3" in res.output


def test_torchvision_image_size_defaults_to_its_weights_crop():
    from greenmim_convert import models

    built = models.build(TV_SWIN)
    assert built.img_size == 224 == models.TORCHVISION_IMG_SIZE and built.kwargs == {}
    assert models.torchvision_img_size("swin_v2_t") == 256  # Swin V2's weights are evaluated at 256 px
    assert models.build(TV_SWIN, img_size=96).img_size == 96
    assert "crop size of torchvision" in flat(runner.invoke(app, ["convert", "--help"]).output)


def test_torchvision_builder_arguments():
    """Keywords the builder fixes reach the model class (once); the others go through the builder."""
    from torchvision.models.swin_transformer import SwinTransformer

    from greenmim_convert import models

    init = SwinTransformer.__dict__["__init__"]
    tiny = models.build(TV_SWIN, {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_classes": 7}).model
    assert [len(tiny.features[i]) for i in (1, 3, 5, 7)] == [1, 1, 1, 1]
    assert tiny.head.out_features == 7 and tiny.norm.normalized_shape == (128,)
    assert SwinTransformer.__dict__["__init__"] is init
    assert [len(models.build(TV_SWIN).model.features[i]) for i in (1, 3, 5, 7)] == [2, 2, 6, 2]
    maxvit = models.build("torchvision:maxvit_t")
    assert maxvit.kwargs == {"input_size": (224, 224)}


@pytest.mark.parametrize("args, expected", [
    (["convert", "torchvision:swin_tt"], "torchvision:swin_t"),
    (["verify", "torchvision:swin_v2"], "torchvision:swin_v2_t"),
    (["bench", "torchvision:maxvit"], "torchvision:maxvit_t"),
    (["convert", "swin_v2_t"], "torchvision:swin_v2_t"),
])
def test_unknown_torchvision_model_suggests(args, expected):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    text = flat(res.output)
    assert "Did you mean" in text and expected in text


def test_torchvision_bad_model_arg_exits_2():
    res = runner.invoke(app, ["convert", TV_SWIN, "--model-arg", "bogus_option=1"])
    assert res.exit_code == 2 and "bogus_option" in flat(res.output)
    assert runner.invoke(app, ["convert", TV_SWIN, "--model-arg", "depths"]).exit_code == 2


def test_list_torchvision_family(monkeypatch, tmp_path):
    import greenmim_convert.coverage as cov
    from greenmim_convert import models

    every = ["torchvision:" + n for n in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t")]
    assert cov.family_models(["torchvision"]) == every
    assert "torchvision" in cov.FAMILIES and cov.family_of("torchvision:swin_v2_t") == "torchvision"
    assert not any(n.startswith("torchvision:") for n in cov.family_models(["swin"]))
    monkeypatch.setattr(models, "TORCHVISION_HIERARCHICAL", ("swin_t",))
    md = tmp_path / "tv.md"
    res = runner.invoke(app, ["list", "--family", "torchvision", "--verify", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    assert "| `torchvision:swin_t` | torchvision | converts | ✓ |" in md.read_text()


def test_list_verifies_smallest_of_each_family_and_fails_on_mismatch(monkeypatch, tmp_path):
    import greenmim_convert.coverage as cov

    res, text = run_list(monkeypatch, tmp_path, ["pvt_v2_b1", "pvt_v2_b0"], "--verify-smallest")
    assert res.exit_code == 0, res.output
    assert "| `pvt_v2_b0` | pvt_v2 | converts | ✓ |" in text and "| `pvt_v2_b1` | pvt_v2 | converts | not run |" in text

    real = cov.verify

    def wrong(model, green, images, visible):
        report = real(model, green, images, visible)
        report.rows[0].max_rel, report.rows[0].ok = 1.0, False
        return report

    monkeypatch.setattr(cov, "verify", wrong)
    res, text = run_list(monkeypatch, tmp_path, ["pvt_v2_b1", "pvt_v2_b0"], "--verify-smallest")
    assert res.exit_code == 1 and "| `pvt_v2_b0` | pvt_v2 | converts | ✗ |" in text
