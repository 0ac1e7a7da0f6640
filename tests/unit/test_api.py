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


def _swinv2():
    """A tiny Swin V2: float buffers (``relative_coords_table``, ``k_bias``) that ``.double()`` replaces."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)
    ).eval()


def test_dtype_and_assigned_weights_reach_the_converted_graphs():
    """The graphs read the source model's own modules: ``.double()`` after conversion (which replaces buffers) and
    ``load_state_dict(assign=True)`` on the source (which replaces Parameters) both reach the converted model."""
    model = _swinv2()
    green = gmc.convert(model).eval().double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    every = torch.ones(2, *green.mask_grid, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(
            green(images, every).last.to_dense(),
            model.forward_features(images).permute(0, 3, 1, 2),
            rtol=1e-10,
            atol=1e-12,
        )
        fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(fresh, assign=True)
        want = model.forward_features(images).permute(0, 3, 1, 2)  # NHWC -> the tokens' NCHW
        got = green(images, every).last.to_dense()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
