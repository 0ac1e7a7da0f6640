"""A whole converted Swin with the Triton attention forced (CPU interpreter) equals the PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY_SWIN, make_swin

import greenmim_convert as gmc

CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import greenmim_convert as gmc
    from conftest import make_swin, rel_err
    torch.manual_seed({seed})
    cfg = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=64)
    model = make_swin(dtype=torch.float32, **cfg)
    fused = gmc.convert(model, attention_backend="triton")
    plain = gmc.convert(model, attention_backend="torch")
    gen = torch.Generator().manual_seed({seed})
    visible = gmc.random_mask(2, fused.mask_grid, 0.5, generator=gen)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    grads = []
    outs = []
    for green in (fused, plain):
        model.zero_grad()
        out = green(images, visible)
        w = torch.randn(out.last.feats.shape, generator=torch.Generator().manual_seed(1))
        (out.last.feats * w).sum().backward()
        outs.append(out.last.feats.detach())
        grads.append({{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
    assert rel_err(outs[0], outs[1]) <= 1e-5, rel_err(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert rel_err(grads[0][name], grads[1][name]) <= 1e-5, (name, rel_err(grads[0][name], grads[1][name]))
    print("TRITON-SWIN-OK")
    """
)


def test_converted_swin_triton_backend_equals_torch(seed):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where conftest lives
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=here, seed=seed % 1000)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and "TRITON-SWIN-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_triton_forced_on_cpu_without_interpreter_is_an_error():
    model = make_swin(**TINY_SWIN)
    green = gmc.convert(model, attention_backend="triton")
    visible = gmc.random_mask(1, green.mask_grid, 0.5)
    import torch

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        green(torch.randn(1, 3, 128, 128, dtype=torch.float64), visible)
