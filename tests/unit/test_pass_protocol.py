"""The protocol between passes: typed node facts under one meta key, registered rules, checked pass order."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.fx as fx
from conftest import TINY_SWIN
from timm.models.gcvit import _create_gcvit

import greenmim_convert as gmc
from greenmim_convert import passes as P
from greenmim_convert.compiler import annotations as A
from greenmim_convert.compiler.capture import capture, example_images
from greenmim_convert.compiler.pipeline import GreenPassManager, PipelineOrderError, build_pipeline, check_order
from greenmim_convert.passes import layout_analysis, rules

LAYOUT_ORDER = [
    "prefix-tokens",
    "strided-pick",
    "layout-ops",
    "grid-padding",
    "conv",
    "pooling",
    "attention",
    "position-einsum",
    "channel-split",
    "cat",
    "dense-island",
    "token-wise",
]


def _moved(name: str, before: str) -> list:
    """The real pipeline with the pass ``name`` moved in front of the pass ``before``."""
    pipeline = build_pipeline()
    moving = next(p for p in pipeline if p.name == name)
    pipeline.remove(moving)
    pipeline.insert(next(i for i, p in enumerate(pipeline) if p.name == before), moving)
    return pipeline


def test_real_pipeline_validates():
    check_order(build_pipeline(), P.CheckPass())
    manager = GreenPassManager(build_pipeline(), P.CheckPass())
    assert [p.name for p in manager.ran][-1] == "check"
    assert "check" not in [p.name for p in build_pipeline()]


def test_every_property_is_ensured_by_one_pass():
    ensured = [prop for p in build_pipeline() for prop in p.ensures]
    assert sorted(ensured, key=lambda p: p.value) == sorted(A.Property, key=lambda p: p.value)


@pytest.mark.parametrize(
    "name,before,message",
    [
        (
            "layout-ops",
            "attention",
            "pass 10 ('layout-ops') requires 'attention', which does not hold there: "
            "'attention' ensures it and must run before it",
        ),
        ("layout-analysis", "canonicalize", "pass 1 ('layout-analysis') requires 'canonical'"),
        ("prefix-tokens", "attention", "pass 10 ('prefix-tokens') requires 'attention'"),
        ("recompute", "token-wise", "pass 16 ('recompute') requires 'no-layout-ops'"),
    ],
)
def test_misordered_pipeline_is_refused(name: str, before: str, message: str):
    with pytest.raises(PipelineOrderError) as err:
        GreenPassManager(_moved(name, before), P.CheckPass())
    assert message in str(err.value)


def test_incomplete_pipeline_fails_the_postcondition():
    pipeline = [p for p in build_pipeline() if p.name != "row-gather"]
    with pytest.raises(
        PipelineOrderError,
        match="the postcondition requires 'table-rows', which does not hold there: no pass of the pipeline ensures it",
    ):
        check_order(pipeline, P.CheckPass())


def test_layout_rules_in_registered_order():
    assert [r.name for r in layout_analysis.LAYOUT_RULES] == LAYOUT_ORDER
    priorities = [r.priority for r in layout_analysis.LAYOUT_RULES]
    assert priorities == sorted(priorities)


def test_rule_registration_refuses_clashes():
    registry = rules.Registry("test")

    @registry("first", priority=1)
    def first(gm, node):
        return None

    def second(gm, node):
        return None

    with pytest.raises(ValueError, match="clashes with 'first'"):
        registry("second", priority=1)(second)
    with pytest.raises(ValueError, match="clashes with 'first'"):
        registry("first", priority=2)(second)
    registry("second", priority=0)(second)
    assert [r.name for r in registry.ordered()] == ["second", "first"]


def test_empty_facts_are_read_only():
    node = fx.Graph().placeholder("x")
    assert A.peek(node) is A.EMPTY and A.peek(3) is A.EMPTY
    with pytest.raises(AttributeError, match="facts\\(node\\)"):
        A.peek(node).layout_op = True
    A.facts(node).layout_op = True
    assert A.peek(node).layout_op and A.KEY in node.meta


def _graph_modules(gm: fx.GraphModule):
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def _tiny_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN), None


def _gcvit():
    model = _create_gcvit("gcvit_xxtiny", embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8), img_size=96)
    return model, 96


@pytest.mark.parametrize("build", [_tiny_swin, _gcvit], ids=["swin", "gcvit-dense-islands"])
def test_no_project_meta_key_but_the_annotation(build, one_thread):
    """Facts travel in ``NodeFacts`` only: after a conversion every node's meta keys are torch's own (those of the
    captured graph) or ``A.KEY``."""
    torch.manual_seed(0)
    model, size = build()
    green = gmc.convert(model.eval(), img_size=size)
    torch_keys = set()
    for training in (False, True):
        model.train(training)
        example = example_images(model, tuple(green.config.img_size), 2, 3)
        torch_keys |= {k for n in capture(model, example, []).gm.graph.nodes for k in n.meta}
    model.eval()
    assert A.KEY not in torch_keys
    found = {
        k
        for prog in green.programs.values()
        for gm in (prog.plan_gm, prog.compute_gm)
        for m in _graph_modules(gm)
        for n in m.graph.nodes
        for k in n.meta
    }
    assert found - torch_keys == {A.KEY}
    assert not found & {f.name for f in dataclasses.fields(A.NodeFacts)}
    assert vars(A.EMPTY) == vars(A.NodeFacts())
