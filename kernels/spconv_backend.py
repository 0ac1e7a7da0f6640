"""Optional spconv backend for dense (``groups == 1``) sparse convolutions on CUDA.

spconv (``spconv.pytorch``, the ``spconv-cu120`` wheel or a build matching the local CUDA) has
tuned implicit-GEMM kernels for sparse convolutions with many channels, such as a patch-merging or
downsampling conv. It is used only when installed, on CUDA tensors, for ``groups == 1``.

Why it is not the default backend:
- its CPU backward fails on CUDA builds of torch running without a GPU (the op asks for the current
  CUDA stream), so it cannot serve the CPU path that development and CI machines run;
- the Triton port (spconv-triton) accepts GPU tensors only;
- it has no efficient depthwise or grouped convolution (its modules assert ``groups == 1``), and
  depthwise convs are the common convolution of hierarchical ViTs;
- it cannot combine stride > 1 with dilation > 1.
The built-in gather-GEMM (:func:`greenmim_convert.kernels.sparse_conv.sparse_conv2d_reference`) and
the Triton depthwise kernel cover every case; spconv is an accelerator for one of them.

Semantics are those of the other backends: masked inputs read zero, and the output is read at the
coordinates of ``out_sites``. A stride-1 conv with ``out_sites`` = ``in_sites`` and centred padding is
spconv's submanifold conv; any other conv runs as a regular sparse conv, whose output set (every
cell with a visible input in its receptive field) is then looked up at ``out_sites``; a site it
lacks has no visible input, so its value is the bias.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from greenmim_convert.kernels.sparse_conv import (
    BackendUnavailableError,
    IntPair,
    Padding,
    as_pair,
    is_asymmetric,
    resolve_padding,
)
from greenmim_convert.runtime.plan.sites import Sites

_SPCONV: Optional[Any] = None
_SPCONV_CHECKED = False
_MODULES: Dict[Tuple[Any, ...], torch.nn.Module] = {}


def _import_spconv() -> Optional[Any]:
    """``spconv.pytorch`` or None; import failures of any kind (missing CUDA libraries, ABI) mean absent."""
    global _SPCONV, _SPCONV_CHECKED
    if not _SPCONV_CHECKED:
        _SPCONV_CHECKED = True
        try:
            import spconv.pytorch as spconv_torch
        except Exception:
            spconv_torch = None
        _SPCONV = spconv_torch
    return _SPCONV


def spconv_available() -> bool:
    """Whether ``spconv.pytorch`` imports in this environment."""
    return _import_spconv() is not None


def torch_weight_to_spconv(weight: torch.Tensor, layout: str = "KRSC") -> torch.Tensor:
    """Reorder a ``Conv2d`` weight ``(C_out, C_in, kh, kw)`` to an spconv layout (differentiable view + copy).

    spconv >= 2.2 stores every weight as KRSC ``(C_out, kh, kw, C_in)``; older native-algorithm
    modules used RSKC ``(kh, kw, C_out, C_in)`` or RSCK ``(kh, kw, C_in, C_out)``.
    """
    order = {"KRSC": (0, 2, 3, 1), "RSKC": (2, 3, 0, 1), "RSCK": (2, 3, 1, 0)}
    if layout not in order:
        raise ValueError(f"unknown spconv weight layout {layout!r}")
    return weight.permute(*order[layout]).contiguous()


def _layout_of(module: torch.nn.Module, c_out: int, c_in: int, kernel: Tuple[int, int]) -> str:
    """The weight layout an spconv module expects, read off its parameter shape."""
    shape = tuple(module.weight.shape)
    for layout, expected in (
        ("KRSC", (c_out, *kernel, c_in)),
        ("RSKC", (*kernel, c_out, c_in)),
        ("RSCK", (*kernel, c_in, c_out)),
    ):
        if shape == expected:
            return layout
    raise RuntimeError(f"unrecognised spconv weight shape {shape} for a {c_in}->{c_out} {kernel} conv")


def _module(
    subm: bool,
    c_in: int,
    c_out: int,
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    has_bias: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """A cached spconv conv module of this geometry; its parameters are replaced at every call."""
    key = (subm, c_in, c_out, kernel, stride, padding, dilation, has_bias, str(device), dtype)
    if key not in _MODULES:
        sp = _import_spconv()
        cls = sp.SubMConv2d if subm else sp.SparseConv2d
        module = cls(
            c_in,
            c_out,
            list(kernel),
            stride=list(stride),
            padding=list(padding),
            dilation=list(dilation),
            bias=has_bias,
        )
        _MODULES[key] = module.to(device=device, dtype=dtype).train()
    return _MODULES[key]


def spconv_conv2d(
    feats: torch.Tensor,
    in_sites: Sites,
    out_sites: Sites,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """``groups == 1`` sparse conv through spconv: ``(T_in, C_in) -> (T_out, C_out)``, gradients included."""
    sp = _import_spconv()
    if sp is None:
        raise BackendUnavailableError("spconv is not importable")
    c_out, c_in, kh, kw = weight.shape
    kernel = (int(kh), int(kw))
    s, d = as_pair(stride, "stride"), as_pair(dilation, "dilation")
    pad = resolve_padding(padding, kernel, s, d)
    if is_asymmetric(padding):
        raise BackendUnavailableError(f"spconv cannot express the asymmetric padding {tuple(padding)}")
    if padding == "same" and any(2 * p != di * (k - 1) for p, k, di in zip(pad, kernel, d)):
        raise BackendUnavailableError("spconv cannot express the asymmetric padding of 'same' with an even extent")
    same_sites = out_sites is in_sites or (
        out_sites.grid == in_sites.grid
        and out_sites.num_tokens == in_sites.num_tokens
        and torch.equal(out_sites.batch, in_sites.batch)
        and torch.equal(out_sites.coords, in_sites.coords)
    )
    centred = all(k % 2 == 1 and p == di * (k - 1) // 2 for k, p, di in zip(kernel, pad, d))
    subm = s == (1, 1) and same_sites and centred
    module = _module(subm, int(c_in), int(c_out), kernel, s, pad, d, bias is not None, feats.device, feats.dtype)
    params = {"weight": torch_weight_to_spconv(weight, _layout_of(module, int(c_out), int(c_in), kernel))}
    if bias is not None:
        params["bias"] = bias
    indices = torch.cat([in_sites.batch[:, None], in_sites.coords], dim=1).int().contiguous()
    x = sp.SparseConvTensor(feats.contiguous(), indices, list(in_sites.grid), in_sites.batch_size)
    y = torch.func.functional_call(module, params, (x,))
    if subm:
        return y.features
    ho, wo = out_sites.grid
    if tuple(int(v) for v in y.spatial_shape) != (ho, wo):
        raise RuntimeError(f"spconv produced a {tuple(y.spatial_shape)} grid, expected {(ho, wo)}")
    out_idx = y.indices.long()
    lookup = torch.full((out_sites.batch_size * ho * wo,), -1, dtype=torch.long, device=feats.device)
    lookup[(out_idx[:, 0] * ho + out_idx[:, 1]) * wo + out_idx[:, 2]] = torch.arange(
        out_idx.shape[0], device=feats.device
    )
    rows = lookup[(out_sites.batch * ho + out_sites.coords[:, 0]) * wo + out_sites.coords[:, 1]]
    fill = bias if bias is not None else y.features.new_zeros(int(c_out))
    padded = torch.cat([y.features, fill.to(y.features.dtype)[None]], dim=0)
    return padded.index_select(0, torch.where(rows >= 0, rows, torch.full_like(rows, y.features.shape[0])))
