"""The dense masked reference: the independent oracle every converted model is checked against.

It runs the ORIGINAL modules on the full image and changes only what masked-dense semantics changes, through
forward hooks (``hooks.py``: the generic ones, and one module per family under ``families/``, imported only for a
model that holds that family's modules): every attention gets the key mask added (masked keys removed), every
convolution reads zeros at masked input positions, and per-sample statistics (GRN, squeeze-excite, training-mode
BatchNorm, global pools) are taken over visible positions. It shares nothing with the passes but the model's
weights; visibility inside a block is derived with the model's own window partition. Any other model's SDPA
attention is masked through a ``key_mask_for`` callback. This module reads the stages and the final features of
that forward at the visible positions.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from greenmim_convert.compiler.capture import module_tensor
from greenmim_convert.compiler.capture import timm_stages as feature_stages
from greenmim_convert.errors import InvalidInputError
from greenmim_convert.oracle.hooks import (
    HookState,
    KeyMaskFn,
    families_of,
    feature_tensor,
    grid_tokens,
    masked_dense_hooks,
    visibility_map,
)
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens

__all__ = [
    "KeyMaskFn",
    "dense_masked_reference",
    "dense_to_tokens",
    "feature_layout",
    "masked_dense_hooks",
    "visibility_map",
]


def dense_to_tokens(
    dense: torch.Tensor, visible: torch.Tensor, stride: int, fmt: str, img_size: Tuple[int, int]
) -> VisibleTokens:
    """Read a dense feature map (NCHW, NHWC, or (B, N, C) tokens) at the visible positions, in canonical order."""
    if dense.dim() == 3:
        dense = dense.reshape(dense.shape[0], img_size[0] // stride, img_size[1] // stride, dense.shape[-1])
    elif fmt == "NCHW":
        dense = dense.permute(0, 2, 3, 1)
    sites = Sites.from_mask(visible, tuple(dense.shape[1:3]), stride)
    return VisibleTokens(dense[sites.batch, sites.coords[:, 0], sites.coords[:, 1]], sites)


def feature_layout(dense: torch.Tensor, img_size: Tuple[int, int], fmt: Optional[str] = None) -> Tuple[str, int]:
    """``(layout, stride)`` of a feature map of an ``img_size`` image, read from its shape.

    layout is "NCHW", "NHWC" or "NLC" ((B, N, C) tokens in raster order). A 4-D map is NCHW when
    dims 2, 3 form a grid of the image at one integer stride, NHWC when dims 1, 2 do; when both do,
    ``fmt`` decides (default NCHW).
    """
    h, w = img_size

    def stride_of(gh: int, gw: int) -> Optional[int]:
        if gh and gw and h % gh == 0 and w % gw == 0 and h // gh == w // gw:
            return h // gh
        return None

    shape = tuple(dense.shape)
    if dense.dim() == 3:
        for stride in range(1, max(h, w) + 1):
            if h % stride == 0 and w % stride == 0 and (h // stride) * (w // stride) == shape[1]:
                return "NLC", stride
    elif dense.dim() == 4:
        nchw, nhwc = stride_of(*shape[2:4]), stride_of(*shape[1:3])
        if nchw and nhwc:
            return ("NHWC", nhwc) if fmt == "NHWC" else ("NCHW", nchw)
        if nchw or nhwc:
            return ("NCHW", nchw) if nchw else ("NHWC", nhwc)
    raise InvalidInputError(f"a feature of shape {shape} is no NCHW, NHWC or (B, N, C) map of a {h}x{w} image")


def _output_maps(out: Any) -> Optional[List[torch.Tensor]]:
    """The feature maps a model returned: a BackboneOutput's ``feature_maps``, or a tuple/list of tensors."""
    maps = getattr(out, "feature_maps", None)
    if maps is None and isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        maps = out
    return list(maps) if maps is not None else None


def _output_final(out: Any) -> torch.Tensor:
    """The final features in a model's output: the tensor itself, the last of its feature maps, or a
    ModelOutput's ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out
    maps = _output_maps(out)
    if maps:
        return maps[-1]
    final = getattr(out, "last_hidden_state", None)
    if isinstance(final, torch.Tensor):
        return final
    raise InvalidInputError(
        f"the model returned {type(out).__name__}, which holds no tensor, feature_maps or "
        "last_hidden_state: pass last=[the module whose output is the final features]"
    )


def dense_masked_reference(
    model: nn.Module,
    images: torch.Tensor,
    visible: torch.Tensor,
    fmt: Optional[str] = None,
    *,
    stages: Optional[Sequence[str]] = None,
    last: Optional[str] = None,
    key_mask_for: Optional[Callable[[nn.Module], Optional[KeyMaskFn]]] = None,
    stages_from_output: bool = False,
) -> GreenOutput:
    """The original model under masked-dense semantics, read at the visible positions of every stage.

    ``stages``: module names (as in ``named_modules()``) whose outputs are the stages; default: timm's
    ``feature_info``. ``last``: the module whose output is the final features; default:
    ``model.forward_features(images)``, else ``model(images)``: a tensor, the last of a BackboneOutput's
    ``feature_maps`` (or of a returned tuple/list of tensors), or a ModelOutput's ``last_hidden_state``.
    ``stages_from_output``: the stages are the entries of the output's ``feature_maps`` (or of the returned
    tuple/list of tensors) and the final features the last of them; ``stages`` and ``last`` stay unset.
    A stage output may be NCHW, NHWC or (B, N, C); its layout and stride are read from its shape
    (``feature_layout``; ``fmt`` breaks ties). Leading class tokens of (B, N, C) features are left out: timm's
    ``num_prefix_tokens``, else one token when N - 1 tokens, and not N, form a grid of the image.
    ``key_mask_for(module)`` lets a model the oracle does not know mask its attention: for a module
    that calls ``F.scaled_dot_product_attention``, return ``fn(args, visible) -> bool`` key visibility
    (True = visible) broadcastable to that call's logits (..., L, S), computed from the module's
    forward args and the (B, H/u, W/u) unit mask (``visibility_map`` gives it on a feature grid); it
    is added to the call's own ``attn_mask``. Return None for every other module.
    """
    if type(model).__module__ == "timm.models.hiera" and stages is None and last is None and not stages_from_output:
        from greenmim_convert.oracle.families.hiera import hiera_reference

        return hiera_reference(model, images, visible)
    fmt = fmt or getattr(model, "output_fmt", "NCHW")
    size = (int(images.shape[-2]), int(images.shape[-1]))
    strides: Optional[List[int]] = None
    if stages_from_output:
        if stages is not None or last is not None:
            raise InvalidInputError(
                "stages_from_output reads the stages and the final features from the model's "
                "output: pass no stages= or last="
            )
        names: List[str] = []
    elif stages is None:
        if not getattr(model, "feature_info", None):
            raise InvalidInputError(
                f"{type(model).__name__} has no timm feature_info: pass stages=[the module names whose outputs are "
                "the stages], or stages_from_output=True for a model that returns its feature maps"
            )
        names, strides = feature_stages(model)
    else:
        names = list(stages)
    modules = dict(model.named_modules())
    for n in names + ([last] if last is not None else []):
        if n not in modules:
            raise InvalidInputError(f"{type(model).__name__} has no module named '{n}'")
    captured: Dict[str, torch.Tensor] = {}
    hooked = names + ([last] if last is not None and last not in names else [])
    handles = [
        _called_module(modules[n]).register_forward_hook(
            lambda m, a, out, n=n: captured.__setitem__(n, module_tensor(out))
        )
        for n in hooked
    ]
    try:
        with masked_dense_hooks(model, visible, size, key_mask_for) as state:
            if last is None and hasattr(model, "forward_features") and not stages_from_output:
                out = model.forward_features(images)
            else:
                out = model(images)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in hooked if n not in captured]
    if missing:
        raise InvalidInputError(f"modules {missing} of {type(model).__name__} did not run in its forward")

    families = families_of(model)

    def extended(module: Optional[nn.Module], dense: torch.Tensor) -> torch.Tensor:
        return feature_tensor(families, model, module, dense)

    maps: List[torch.Tensor] = []
    if stages_from_output:
        maps = [extended(None, t) for t in _output_maps(out) or []]
        if not maps:
            raise InvalidInputError(
                f"stages_from_output: {type(model).__name__} returned {type(out).__name__}, "
                "which holds no feature_maps or tuple of tensors"
            )
        final = maps[-1]
    elif last is not None:
        final = extended(modules[last], captured[last])
    else:
        final = extended(None, _output_final(out))

    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)  # timm: class tokens before the grid tokens

    def read(dense: torch.Tensor, stride: Optional[int]) -> VisibleTokens:
        if dense.dim() == 3 and prefix:
            dense = dense[:, prefix:]  # the class token is no grid position: left out, as forward_intermediates does
        elif dense.dim() == 3 and not grid_tokens(dense.shape[1], size) and grid_tokens(dense.shape[1] - 1, size):
            dense = dense[:, 1:]  # a class token before the grid (CvT's and PVT's last stage)
        if stride is not None:  # timm's feature_info: its stride and the model's output_fmt, as always
            return dense_to_tokens(dense, visible, stride, fmt, size)
        picked = _picked_tokens(state, dense, fmt)
        if picked is not None:
            return picked
        layout, stride = feature_layout(dense, size, fmt)
        return dense_to_tokens(dense, visible, stride, layout, size)

    if stages_from_output:
        outs = [read(t, None) for t in maps]
    else:
        outs = [read(extended(modules[n], captured[n]), strides[i] if strides else None) for i, n in enumerate(names)]
    timm_last = strides is not None and last is None and hasattr(model, "forward_features")
    return GreenOutput(read(final, strides[-1] if timm_last else None), outs)


def _picked_tokens(state: HookState, dense: torch.Tensor, fmt: str) -> Optional[VisibleTokens]:
    """A feature map on a grid of picked cells (``HookState.picked``: (B, N, C) tokens of one with N cells, or a map
    of its shape) read at its visible cells, whose visibility is that of the cells they pick; None for any other."""
    if dense.dim() == 3:
        grid = next((g for g in state.picked if g[0] * g[1] == dense.shape[1]), None)
        if grid is None:
            return None
        dense = dense.reshape(dense.shape[0], *grid, dense.shape[-1])
    elif dense.dim() == 4:
        if fmt == "NCHW":
            dense = dense.permute(0, 2, 3, 1)
        grid = tuple(dense.shape[1:3])
        if grid not in state.picked:
            return None
    else:
        return None
    vis, stride = state.picked[grid]
    nz = vis.nonzero()
    sites = Sites(nz[:, 0], nz[:, 1:], grid, vis.shape[0], stride)
    return VisibleTokens(dense[sites.batch, sites.coords[:, 0], sites.coords[:, 1]], sites)


def _called_module(module: nn.Module) -> nn.Module:
    """The module whose output is a stage's output: a container's last child when it is never called."""
    while isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        module = list(module.children())[-1]
    return module
