"""The public API's surface: the source model's name, and what ``import greenmim_convert`` loads."""

import subprocess
import sys

import pytest
import torch
from conftest import TINY_SWIN, make_swin

import greenmim_convert as gmc


def test_source_model_is_the_model_converted():
    """``source_model`` is the very module converted; ``timm_model``, its old name, still answers with a warning."""
    model = make_swin(**TINY_SWIN)
    green = gmc.convert(model)
    assert green.source_model is model
    with pytest.warns(DeprecationWarning, match="source_model"):
        assert green.timm_model is model
    with pytest.warns(DeprecationWarning, match="program"):
        assert green.graph_module is green.program.compute_gm


def test_import_does_not_load_the_oracle():
    """The oracle (hooks that patch torch functions while they run) loads on first use, not on import."""
    code = (
        "import sys, greenmim_convert as g; "
        "assert not [m for m in sys.modules if m.startswith('greenmim_convert.oracle.')], 'oracle imported'; "
        "g.verify; assert 'greenmim_convert.oracle.verify' in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gmc.nope
    assert torch.is_tensor(gmc.random_mask(1, (2, 2), 0.5))
