"""The command line: convert, verify, list, exit codes, help, suggestions, timm (tagged too), torchvision and hf:
names."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from greenmim_convert.tools.cli import app, suggest

runner = CliRunner()
TINY = [
    "--model-arg",
    "embed_dim=32",
    "--model-arg",
    "depths=[2,2,2,2]",
    "--model-arg",
    "num_heads=[1,2,4,8]",
    "--model-arg",
    "window_size=4",
    "--img-size",
    "128",
]
SWIN = "swin_tiny_patch4_window7_224"
TV_SWIN = "torchvision:swin_t"
# torchvision's swin_t builder fixes these; greenmim-convert hands them to SwinTransformer instead (embed_dim
# 24, not 32: a (B, 32, 32, 32) stage at 128px would read as NCHW and NHWC alike)
TV_TINY = [
    "--model-arg",
    "embed_dim=24",
    "--model-arg",
    "depths=[2,2,2,2]",
    "--model-arg",
    "num_heads=[1,2,4,8]",
    "--model-arg",
    "window_size=[4,4]",
    "--img-size",
    "128",
]


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
    from greenmim_convert.api.io import load

    green = load(str(out))
    assert green.mask_grid == (4, 4)


def test_verify_ok_and_exit_code():
    res = runner.invoke(app, ["verify", SWIN, *TINY, "--mask-ratio", "0.75", "--batch-size", "3", "--seed", "7"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "stage3" in res.output


def test_verify_reports_mismatch_with_exit_1(monkeypatch):
    from greenmim_convert.runtime import ops

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
    assert (
        suggest("swin_tiny", ["resnet50", "swin_tiny_patch4_window7_224", "swinv2_tiny"])[0]
        == "swin_tiny_patch4_window7_224"
    )


def run_list(monkeypatch, tmp_path, names, *flags):
    """``greenmim-convert list FLAGS --markdown FILE`` over ``names`` only: the result and the markdown written."""
    import greenmim_convert.tools.coverage as cov

    monkeypatch.setattr(cov, "family_models", lambda fams: list(names))
    md = tmp_path / "cov.md"
    res = runner.invoke(app, ["list", *flags, "--markdown", str(md)])
    return res, md.read_text() if md.exists() else ""


def test_list_reports_status_and_reason(monkeypatch, tmp_path):
    from greenmim_convert.passes import layout_analysis

    # without its rule, GC ViT's broadcast of the global queries over windows is an op no pass converts
    rules = [rule for rule in layout_analysis.LAYOUT_RULES if rule.name != "dense-island"]
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
    assert (
        f"passes run on {TV_SWIN}" in text and "window attention" in text and "mask grid (4, 4) of 32px units" in text
    )
    from greenmim_convert.api.io import load

    green = load(str(out))
    assert green.config.model_name == TV_SWIN and green.config.model_kwargs["depths"] == [2, 2, 2, 2]
    assert green.img_size == (128, 128) and green.mask_grid == (4, 4)
    assert type(green.source_model).__name__ == "SwinTransformer" and len(green.source_model.features[1]) == 2


def test_torchvision_verify_ok():
    res = runner.invoke(app, ["verify", TV_SWIN, *TV_TINY, "--batch-size", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "stage3" in res.output


def test_torchvision_image_size_defaults_to_its_weights_crop():
    from greenmim_convert.tools import models

    built = models.build(TV_SWIN)
    assert built.img_size == 224 == models.TORCHVISION_IMG_SIZE and built.kwargs == {}
    assert models.torchvision_img_size("swin_v2_t") == 256  # Swin V2's weights are evaluated at 256 px
    assert models.build(TV_SWIN, img_size=96).img_size == 96
    assert "crop size of torchvision" in flat(runner.invoke(app, ["convert", "--help"]).output)


def test_torchvision_builder_arguments():
    """Keywords the builder fixes reach the model class (once); the others go through the builder."""
    from torchvision.models.swin_transformer import SwinTransformer

    from greenmim_convert.tools import models

    init = SwinTransformer.__dict__["__init__"]
    tiny = models.build(TV_SWIN, {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_classes": 7}).model
    assert [len(tiny.features[i]) for i in (1, 3, 5, 7)] == [1, 1, 1, 1]
    assert tiny.head.out_features == 7 and tiny.norm.normalized_shape == (128,)
    assert SwinTransformer.__dict__["__init__"] is init
    assert [len(models.build(TV_SWIN).model.features[i]) for i in (1, 3, 5, 7)] == [2, 2, 6, 2]
    maxvit = models.build("torchvision:maxvit_t")
    assert maxvit.kwargs == {"input_size": (224, 224)}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["convert", "torchvision:swin_tt"], "torchvision:swin_t"),
        (["verify", "torchvision:swin_v2"], "torchvision:swin_v2_t"),
        (["bench", "torchvision:maxvit"], "torchvision:maxvit_t"),
        (["convert", "swin_v2_t"], "torchvision:swin_v2_t"),
    ],
)
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
    import greenmim_convert.tools.coverage as cov
    from greenmim_convert.tools import models

    every = [
        "torchvision:" + n for n in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t")
    ]
    assert cov.family_models(["torchvision"]) == every
    assert "torchvision" in cov.FAMILIES and cov.family_of("torchvision:swin_v2_t") == "torchvision"
    assert not any(n.startswith("torchvision:") for n in cov.family_models(["swin"]))
    monkeypatch.setattr(models, "TORCHVISION_HIERARCHICAL", ("swin_t",))
    md = tmp_path / "tv.md"
    res = runner.invoke(app, ["list", "--family", "torchvision", "--verify", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    assert "| `torchvision:swin_t` | torchvision | converts | ✓ |" in md.read_text()


def test_list_verifies_smallest_of_each_family_and_fails_on_mismatch(monkeypatch, tmp_path):
    import greenmim_convert.tools.coverage as cov

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


# tagged timm names, hf:TYPE names (transformers model types with random weights), list --model

HF_TINY = [
    "--model-arg",
    "embedding_size=8",
    "--model-arg",
    "hidden_sizes=[8,16]",
    "--model-arg",
    "depths=[1,1]",
    "--img-size",
    "64",
]


def test_tagged_timm_name_converts_and_keeps_its_tag(tmp_path):
    out = tmp_path / "tagged.safetensors"
    name = SWIN + ".ms_in1k"
    res = runner.invoke(app, ["convert", name, *TINY, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert f"passes run on {name}" in flat(res.output)
    from greenmim_convert.api.io import load

    assert load(str(out)).config.model_name == name


def test_tagged_timm_names_resolve_as_timm_does():
    from greenmim_convert.tools import models

    built = models.build("vit_small_patch16_224.dino")
    assert built.model.pretrained_cfg["tag"] == "dino"
    models.check_name("convnext_tiny_in22ft1k")  # deprecated names, which timm maps to a tagged one
    with pytest.raises(models.InvalidInputError, match="downloads nothing"):
        models.check_name("hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k")


@pytest.mark.parametrize(
    "name, expected",
    [
        (SWIN + ".ms_in2k", SWIN + ".ms_in22k"),
        (SWIN + ".", SWIN + ".ms_in1k"),
        ("swin_tinny_patch4_window7_224.ms_in1k", SWIN + ".ms_in1k"),
    ],
)
def test_unknown_timm_tag_suggests(name, expected):
    res = runner.invoke(app, ["convert", name])
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert "Did you mean" in text and expected in text and "Traceback" not in text


def test_hf_model_converts_and_loads(tmp_path):
    out = tmp_path / "hf.safetensors"
    res = runner.invoke(app, ["convert", "hf:resnet", *HF_TINY, "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = flat(res.output)
    assert "passes run on hf:resnet" in text and "mask grid (8, 8) of 8px units" in text
    from greenmim_convert.api.io import load

    green = load(str(out))
    assert green.config.model_name == "hf:resnet" and green.img_size == (64, 64)
    assert green.config.model_kwargs == {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
    assert type(green.source_model).__name__ == "ResNetModel"


def test_hf_verify_hands_over_the_built_model(monkeypatch):
    """The CLI hands verify the built model (in the chosen dtype) and its conversion."""
    import importlib

    verify_mod = importlib.import_module("greenmim_convert.oracle.verify")  # the package's ``verify`` is the function
    seen = {}

    def spy(model, green, images, visible):
        seen.update(model=type(model).__name__, dtype=images.dtype, shape=tuple(images.shape), grid=green.mask_grid)
        report = verify_mod.VerifyReport(rtol=1e-5, dtype="float32")
        report.rows.append(verify_mod.StageError("last", (1, 1), 1, 0.0, 0.0, True))
        return report

    monkeypatch.setattr(verify_mod, "verify", spy)
    res = runner.invoke(app, ["verify", "hf:resnet", *HF_TINY, "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    assert seen == {"model": "ResNetModel", "dtype": torch.float64, "shape": (3, 3, 64, 64), "grid": (8, 8)}


# tiny transformers configs at 64px: 4 stages at strides 4 to 32 (Swin's windows of 2 fit its 2x2 last grid)
HF_SWIN = [
    "--model-arg",
    "embed_dim=8",
    "--model-arg",
    "depths=[1,1,1,1]",
    "--model-arg",
    "num_heads=[1,1,2,2]",
    "--model-arg",
    "window_size=2",
    "--img-size",
    "64",
]
HF_CONVNEXT = ["--model-arg", "hidden_sizes=[8,8,16,16]", "--model-arg", "depths=[1,1,1,1]", "--img-size", "64"]
ALL_STAGES = ["--model-arg", "out_features=[stage1,stage2,stage3,stage4]"]


def _verify_rows(output: str) -> list:
    """The output names of a verify table, each with its ok cell."""
    return [
        (cells[0], cells[-1])
        for line in output.splitlines()
        if len(cells := [c.strip() for c in line.split("│") if c.strip()]) == 6 and cells[0] != "output"
    ]


@pytest.mark.parametrize(
    "name, args, stages",
    [
        ("hf:swin", HF_SWIN, 4),  # a ModelOutput: stages found in the graph, the final features its last_hidden_state
        ("hf:resnet", HF_TINY, 3),  # the stem and the two stages
        ("hf:convnext/backbone", HF_CONVNEXT + ALL_STAGES, 4),  # a BackboneOutput: its feature maps are the stages
    ],
)
def test_hf_verify_matches_the_oracle(name, args, stages):
    """verify on transformers models: every stage and the final features match the oracle in float64."""
    res = runner.invoke(app, ["verify", name, *args, "--mask-ratio", "0.5", "--batch-size", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    rows = _verify_rows(res.output)
    assert [r[0] for r in rows] == [f"stage{i}" for i in range(stages)] + ["last"], res.output
    assert all(ok == "yes" for _, ok in rows) and "OK" in res.output


@pytest.mark.parametrize("name, args", [("hf:convnext", HF_CONVNEXT), ("hf:resnet/backbone", HF_TINY)])
def test_hf_bench_runs(name, args, tmp_path):
    """bench on a ModelOutput and a BackboneOutput: the dense side's loss reads the final features from them."""
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", name, *args, "--batch-size", "2", "--steps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["model"] == name and data["steps"] == 1
    for side in ("dense", "green"):
        assert data[side]["time_median_s"] > 0 and data[side]["saved_bytes"] > 0 and data[side]["flops"] > 0
    assert 0 < data["green"]["flops"] < data["dense"]["flops"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["convert", "hf:swim"], "hf:swin"),
        (["verify", "hf:convnextv3"], "hf:convnextv2"),
        (["bench", "hf:pvt-v2"], "hf:pvt_v2"),
        (["list", "--model", "hf:hierra"], "hf:hiera"),
    ],
)
def test_unknown_hf_type_suggests(args, expected):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert "unknown transformers model type" in text and "Did you mean" in text and expected in text


def test_hf_bad_names_and_config_keys_exit_2():
    for args, words in [
        (["convert", "hf:resnet", "--model-arg", "depth=[1,1]"], ["no config key 'depth'", "depths"]),
        (["convert", "hf:resnet", "--model-arg", "depths=abc"], ["failed", "depths"]),
        (["convert", "hf:resnet/head"], ["unknown suffix /head", "hf:resnet/backbone"]),
        (["convert", "hf:donut-swin/backbone"], ["no backbone for 'donut-swin'", "hf:swin/backbone"]),
        (["convert", "hf:microsoft/swin-tiny-patch4-window7-224"], ["not downloaded"]),
    ]:
        res = runner.invoke(app, args)
        text = flat(res.output)
        assert res.exit_code == 2 and all(w in text for w in words), (args, res.output)


def test_hf_unsupported_model_exits_2_cleanly(monkeypatch):
    from greenmim_convert.errors import UnsupportedOperationError
    from greenmim_convert.tools import cli

    def refuse(model, **kw):
        raise UnsupportedOperationError("an op no pass converts", None)

    monkeypatch.setattr(cli, "convert", refuse)
    res = runner.invoke(app, ["convert", "hf:resnet", *HF_TINY])
    assert res.exit_code == 2 and "UnsupportedOperationError" in flat(res.output), res.output


def test_hf_build_config_and_image_size():
    from greenmim_convert.tools import models

    tiny = {"embedding_size": 8, "hidden_sizes": (8, 16), "depths": (1, 1)}
    built = models.build("hf:resnet", tiny)
    assert built.img_size == models.HF_IMG_SIZE and built.model.config.hidden_sizes == [8, 16]
    assert models.build("hf:resnet", tiny, img_size=96).img_size == 96  # no image_size in ResNet's config
    backbone = models.build("hf:resnet/backbone", {**tiny, "out_features": ("stage1", "stage2")})
    assert type(backbone.model).__name__ == "ResNetBackbone" and backbone.model.out_features == ["stage1", "stage2"]
    swin = {"embed_dim": 8, "depths": (1, 1), "num_heads": (1, 1), "window_size": 4}
    assert models.build("hf:swin", swin).img_size == 224
    sized = models.build("hf:swin", swin, img_size=64)
    assert sized.img_size == 64 and sized.model.config.image_size == 64 and sized.kwargs["image_size"] == 64
    pvt = models.build(
        "hf:pvt_v2",
        {
            "hidden_sizes": (8, 16),
            "depths": (1, 1),
            "num_encoder_blocks": 2,
            "num_attention_heads": (1, 1),
            "sr_ratios": (2, 1),
            "patch_sizes": (7, 3),
            "strides": (4, 2),
            "mlp_ratios": (2, 2),
        },
        img_size=64,
    )
    assert pvt.img_size == 64 and list(pvt.model.config.image_size) == [64, 64]  # a pair in its default config
    assert models.build("hf:mobilevit", {"hidden_sizes": (8, 8, 8), "neck_hidden_sizes": (8,) * 7}).img_size == 256


def test_hf_names_without_transformers(monkeypatch):
    """transformers is optional: hf: names say how to install it; the other names never import it."""
    import subprocess
    import sys

    from greenmim_convert.tools import models

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(models.InvalidInputError, match="pip install transformers"):
        models.build("hf:resnet")
    res = runner.invoke(app, ["convert", "hf:resnet"])
    assert res.exit_code == 2 and "pip install transformers" in flat(res.output)
    assert runner.invoke(app, ["list", "--family", "hf"]).exit_code == 2
    code = (
        "import sys; import greenmim_convert, greenmim_convert.tools.cli, greenmim_convert.tools.coverage; "
        "from greenmim_convert.tools import models; models.build('resnet18'); models.build('torchvision:swin_t'); "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_list_hf_family(monkeypatch, tmp_path):
    """``list --family hf`` has one row per type of HF_VISION_BACKBONES (here two tiny ones), each converting or
    saying why not; --model-arg reaches every listed model."""
    import greenmim_convert.tools.coverage as cov
    from greenmim_convert.tools import models

    assert cov.family_models(["hf"]) == ["hf:" + t for t in models.HF_VISION_BACKBONES]
    assert "hf" in cov.FAMILIES and cov.family_of("hf:swin/backbone") == "hf"
    assert cov.family_of(SWIN + ".ms_in1k") == "swin"
    monkeypatch.setattr(models, "HF_VISION_BACKBONES", ("resnet", "convnext", "swin"))
    md = tmp_path / "hf.md"
    res = runner.invoke(
        app,
        [
            "list",
            "--family",
            "hf",
            "--model-arg",
            "hidden_sizes=[8,16,32,64]",
            "--model-arg",
            "depths=[1,1,1,1]",
            "--verify-smallest",
            "--markdown",
            str(md),
        ],
    )
    assert res.exit_code in (0, 1), res.output
    rows = {line.split("|")[1].strip(" `"): line for line in md.read_text().splitlines()[2:]}
    assert list(rows) == ["hf:resnet", "hf:convnext", "hf:swin"]
    assert "| hf | converts |" in rows["hf:resnet"] and "mask unit 32px" in rows["hf:resnet"]
    assert "| hf | converts |" in rows["hf:convnext"] or "| hf | unsupported |" in rows["hf:convnext"]
    # SwinConfig has no hidden_sizes: the row names the refused key
    assert "| hf | error |" in rows["hf:swin"] and "transformers.AutoModel.from_config failed" in rows["hf:swin"]
    assert "no config key 'hidden_sizes'" in rows["hf:swin"]


def test_list_named_models(monkeypatch, tmp_path):
    import greenmim_convert.tools.coverage as cov

    seen = []

    def fake(name, verify_it=False, seed=0, model_kwargs=None):
        seen.append((name, model_kwargs))
        return cov.CoverageRow(name, cov.family_of(name) or "", "converts", "stub")

    monkeypatch.setattr(cov, "check_model", fake)
    md = tmp_path / "named.md"
    res = runner.invoke(
        app,
        [
            "list",
            "--model",
            SWIN + ".ms_in1k",
            "--models",
            "hf:resnet",
            "--model-arg",
            "depths=[1,1]",
            "--markdown",
            str(md),
        ],
    )
    assert res.exit_code == 0, res.output
    assert seen == [(SWIN + ".ms_in1k", {"depths": (1, 1)}), ("hf:resnet", {"depths": (1, 1)})]
    assert f"| `{SWIN}.ms_in1k` | swin | converts |" in md.read_text()
    res = runner.invoke(app, ["list", "--model", SWIN + ".ms_in2k"])
    assert res.exit_code == 2 and SWIN + ".ms_in22k" in flat(res.output)


def test_model_arg_values():
    from greenmim_convert.tools.model_args import parse_model_args

    got = parse_model_args(
        ["a=[8,16]", "b=[[1,2],[3]]", "c=[stage1, stage2]", "d=gelu", "e=None", "f=(4,4)", "g=1e-3", "h=true", "i=x=y"]
    )
    assert got == {
        "a": (8, 16),
        "b": ((1, 2), (3,)),
        "c": ("stage1", "stage2"),
        "d": "gelu",
        "e": None,
        "f": (4, 4),
        "g": 1e-3,
        "h": True,
        "i": "x=y",
    }


def test_help_names_hf_and_tags():
    text = flat(runner.invoke(app, ["convert", "--help"]).output)
    assert "hf:TYPE" in text and "hf:TYPE/backbone" in text and "ms_in1k" in text
    assert "--models" in flat(runner.invoke(app, ["list", "--help"]).output)
