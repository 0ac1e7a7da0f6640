"""The dense masked reference for Hugging Face transformers vision backbones.

``hooks.masked_dense_hooks`` enters ``install(model, state)`` when the model holds a module of
transformers (this module is imported only then: transformers stays optional). It adds, on the original
module objects, what masked-dense semantics needs beyond the generic hooks of ``hooks`` (convolutions
reading zeros at masked inputs, pooling, training-mode BatchNorm over visible positions):

- the key mask of every attention, derived per family from the visibility map with the model's own
  partition functions (window partition, cyclic shift, padding, Hiera's unroll, MobileViT's unfolding);
- per-sample reductions over visible positions: GroupNorm statistics, ConvNeXt V2's GRN, FocalNet's global
  context, SwiftFormer's token sum; LeViT's token BatchNorm in training mode;
- the visibility of grids whose cells are picked cells of a finer grid (LeViT's subsampled queries, also where the
  step does not tile the grid), recorded on the state for the layers that run on them.

The key mask reaches the softmax in one of three ways, chosen per family (see each installer):
``attention_mask`` argument of the attention module (it takes one and every attention implementation adds
it), the patched ``Tensor.softmax`` (eager attentions written as ``matmul`` + softmax; ``F.softmax`` calls
it too) while a key mask is on the state's stack, or a wrapped attention-interface function
(``ALL_ATTENTION_FUNCTIONS``) where the module passes ``attention_mask=None`` itself.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.oracle.hooks import Family, GivenKeys, HookState


def _mask_value(dtype: torch.dtype) -> float:
    """Additive value of a masked key: finite in ``dtype`` and in float32, which transformers' eager attentions
    cast their logits to before the softmax, so that a query whose keys are all masked (its output is never
    read) gets finite weights, never NaN; exp() of it underflows to exactly 0."""
    return -0.25 * min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)


class _Keys(GivenKeys):
    """Key visibility of one attention call (True = visible), broadcastable to its logits."""

    used = False  # whether a softmax, SDPA or attention function added it

    def added_to(self, attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The module's own additive mask (None, bool: True = attend, or float) plus the key mask."""
        self.used = True
        zero = torch.zeros((), dtype=dtype, device=self.vis.device)
        neg = torch.tensor(_mask_value(dtype), dtype=dtype, device=self.vis.device)
        key = torch.where(self.vis, zero, neg)
        if attn_mask is None:
            return key
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, zero, neg)
        return attn_mask + key


class _HFState:
    """Per-forward state of the transformers hooks, next to the generic ``HookState``."""

    def __init__(self, state: HookState):
        self.state = state
        self.handles: List[Any] = []
        self.masked: List[nn.Module] = []  # attention modules whose keys a hook masks
        self.grids: Dict[nn.Module, Tuple[int, int]] = {}  # a layer's input grid, read by its attention's hook
        self.interface_keys: Dict[nn.Module, _Keys] = {}  # key masks the wrapped attention interface adds
        self.token_rows: List[torch.Tensor] = []  # (rows,) visibility of the token rows a BatchNorm1d normalises
        self.hiera_perm: Optional[torch.Tensor] = None  # raster index of each token of the last ``unroll``
        self.hiera_tokens: Optional[torch.Tensor] = None  # (B, N) visibility of the tokens inside a Hiera encoder

    @property
    def visible(self) -> torch.Tensor:
        return self.state.visible

    def vis(self, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, H, W) bool visibility of a feature grid (a picked grid's: that of the cells it picks)."""
        return self.state.grid_visibility(grid)

    def pre(self, module: nn.Module, hook: Callable, with_kwargs: bool = False, prepend: bool = False) -> None:
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend))

    def post(self, module: nn.Module, hook: Callable) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def push_keys(self, module: nn.Module, keys_of: Callable[..., torch.Tensor], with_kwargs: bool = False) -> None:
        """Key visibility ``keys_of(args, kwargs)`` on the state's stack while ``module`` runs.

        For attentions written as ``matmul`` + softmax, with no ``attention_mask`` argument and no attention
        interface: their softmax is the one place their logits pass, and the patched ``Tensor.softmax`` (which
        ``F.softmax`` calls too) adds the mask there. The hook checks on leaving that it was added.
        """
        self.masked.append(module)
        stack = self.state.key_masks

        def enter(mod, args, kwargs=None):
            stack.append(_Keys(keys_of(args, kwargs or {})))

        def leave(mod, args, out):
            _check_used(module, stack.pop())

        self.pre(module, enter, with_kwargs=with_kwargs)
        self.post(module, leave)


def _check_used(module: nn.Module, keys: _Keys) -> None:
    """A key mask that reached no softmax: the attention no longer computes the way its hook expects."""
    if not keys.used:
        raise InvalidInputError(
            f"the key mask of {type(module).__name__} reached no softmax or attention function: "
            "this transformers version computes it differently; the oracle cannot mask its keys"
        )


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    """A forward argument given by position or by name."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _with_arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, name: str, value: Any):
    """``(args, kwargs)`` with the argument at ``index`` / ``name`` replaced by ``value``."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}


def _modeling(module: nn.Module) -> Any:
    """The transformers modeling module (``modeling_*.py``) that defines ``module``'s class (or the transformers
    class it subclasses): the family's own functions."""
    cls = next(c for c in type(module).__mro__ if c.__module__.startswith("transformers."))
    return sys.modules[cls.__module__]


def _conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# --- window attentions -----------------------------------------------------------------------------------


def _swin_layer(layer: nn.Module, hf: _HFState) -> None:
    """Swin, Swin V2, Donut Swin, MaskFormer Swin: the key mask enters the layer's attention module as its
    ``attention_mask`` argument (the cyclic-shift mask, when the layer has one, plus the key mask).

    Every variant adds that argument to its logits itself, whichever attention implementation runs (Swin's
    goes through ALL_ATTENTION_FUNCTIONS), so this holds for eager and SDPA alike. Key visibility follows the
    layer's own steps, read when its attention is called (Swin and Donut clamp window and shift in
    ``forward`` first): ``maybe_pad`` (padded positions hold zeros: keys the source attends to, kept
    visible), the cyclic shift, and the modeling file's ``window_partition``.
    """
    attention = layer.attention
    hf.masked.append(attention)

    def record(mod, args, kwargs):
        hf.grids[layer] = tuple(_arg(args, kwargs, 1, "input_dimensions"))

    def mask(mod, args, kwargs):
        x = args[0]
        h, w = hf.grids[layer]
        masked = (~hf.vis((h, w)))[..., None].to(x.dtype)  # (B, H, W, 1), 1 = masked
        masked, _ = layer.maybe_pad(masked, h, w)
        if hasattr(layer, "cyclic_shift"):
            masked = layer.cyclic_shift(masked)
        elif layer.shift_size > 0:
            masked = torch.roll(masked, shifts=(-layer.shift_size, -layer.shift_size), dims=(1, 2))
        ws = int(layer.window_size)
        windows = _modeling(layer).window_partition(masked, ws).reshape(-1, 1, ws * ws)  # (B * nW, 1, N)
        base = _arg(args, kwargs, 1, "attention_mask")
        if base is not None:  # (nW, N, N), the same for every sample
            base = base.to(x.dtype).repeat(windows.shape[0] // base.shape[0], 1, 1)
        else:
            base = torch.zeros((windows.shape[0], ws * ws, ws * ws), dtype=x.dtype, device=x.device)
        return _with_arg(args, kwargs, 1, "attention_mask", _Keys(windows < 0.5).added_to(base, x.dtype))

    hf.pre(layer, record, with_kwargs=True)
    hf.pre(attention, mask, with_kwargs=True)


def _vitdet_layer(layer: nn.Module, hf: _HFState) -> None:
    """VitDet window and global attention: logits ``(B * windows * heads, N, N)`` go to ``Tensor.softmax``.

    Windows come from the modeling file's ``window_partition``, whose zero padding the source attends to:
    padded keys stay visible.
    """
    attention = layer.attention

    def record(mod, args):
        hf.grids[layer] = tuple(args[0].shape[-2:])  # the layer's input is (B, C, H, W)

    def keys(args, kwargs):
        x = args[0]
        masked = (~hf.vis(hf.grids[layer]))[..., None].to(x.dtype)
        if layer.window_size > 0:
            masked, _ = _modeling(layer).window_partition(masked, layer.window_size)
        vis = masked.reshape(masked.shape[0], -1) < 0.5  # (B * nW, N)
        return vis.repeat_interleave(attention.num_heads, 0)[:, None, :]  # samples major, heads minor

    hf.pre(layer, record)
    hf.push_keys(attention, keys)


def _sam2_block(block: nn.Module, hf: _HFState) -> None:
    """SAM 2 Hiera: the attention module calls ALL_ATTENTION_FUNCTIONS with ``attention_mask=None`` itself,
    and also computes (and discards) a softmax of its own over other axes, so neither a module argument nor
    the softmax carries the mask: the wrapped attention interface adds it for this module.

    Windows come from the modeling file's ``window_partition`` (zero padding, attended to by the source:
    padded keys stay visible); pooled queries read the same keys.
    """
    attention = block.attn
    hf.masked.append(attention)

    def enter(mod, args, kwargs):
        x = _arg(args, kwargs, 0, "hidden_states")  # (B, H, W, C)
        masked = (~hf.vis(tuple(x.shape[1:3])))[..., None].to(x.dtype)
        if block.window_size > 0:
            masked, _ = _modeling(block).window_partition(masked, block.window_size)
        vis = masked.reshape(masked.shape[0], -1) < 0.5
        hf.interface_keys[attention] = _Keys(vis[:, None, None, :])

    def leave(mod, args, out):
        _check_used(attention, hf.interface_keys.pop(attention))

    hf.pre(block, enter, with_kwargs=True)
    hf.post(block, leave)


# --- global and sub-sampled attentions --------------------------------------------------------------------


def _grid_keys(hf: _HFState, grid: Tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(B, 1, 1, [1 +] H * W) visibility of keys on a grid, after an always-visible class token."""
    vis = hf.vis(grid).reshape(hf.visible.shape[0], -1)
    if cls_token:
        vis = torch.cat([torch.ones_like(vis[:, :1]), vis], 1)
    return vis[:, None, None, :]


def _pvt_attention(module: nn.Module, hf: _HFState) -> None:
    """PVT and PVT v2 spatial-reduction attention (``matmul`` + ``F.softmax``): keys are the reduced grid of
    the stride-``sr`` convolution (a reduced key is visible iff its cell is in a visible unit), PVT v2's
    linear attention the 7x7 adaptive average pool (a pooled key is visible iff its cell holds a visible
    position), PVT's last stage a class token first."""
    linear = getattr(module, "linear_attention", False)
    sr = getattr(module, "spatial_reduction_ratio", getattr(module, "sequences_reduction_ratio", 1))

    def keys(args, kwargs):
        x = _arg(args, kwargs, 0, "hidden_states")
        h, w = int(_arg(args, kwargs, 1, "height")), int(_arg(args, kwargs, 2, "width"))
        if linear:
            share = F.adaptive_avg_pool2d(hf.vis((h, w))[:, None].to(x.dtype), module.pool.output_size)
            return (share > 0).reshape(share.shape[0], 1, 1, -1)
        if sr > 1:
            return _grid_keys(hf, (h // sr, w // sr))
        return _grid_keys(hf, (h, w), cls_token=x.shape[1] == h * w + 1)

    hf.push_keys(module, keys, with_kwargs=True)
    if linear:  # the 1x1 reduction conv acts on the 7x7 pooled map, not on a grid of the image
        hf.pre(module.spatial_reduction, _dense_enter(hf.state), prepend=True)
        hf.post(module.spatial_reduction, _dense_leave(hf.state))


def _dense_enter(state: HookState) -> Callable:
    def hook(mod, args):
        state.dense += 1

    return hook


def _dense_leave(state: HookState) -> Callable:
    def hook(mod, args, out):
        state.dense -= 1

    return hook


def _segformer_attention(module: nn.Module, hf: _HFState) -> None:
    """Segformer: the key mask enters as the attention's ``attention_mask`` argument, which it hands to
    ALL_ATTENTION_FUNCTIONS, so eager and SDPA both add it. Keys: the grid reduced by the stride-``sr``
    convolution."""
    hf.masked.append(module)
    sr = module.sequence_reduction_ratio

    def mask(mod, args, kwargs):
        x = args[0]
        h, w = int(_arg(args, kwargs, 1, "height")), int(_arg(args, kwargs, 2, "width"))
        grid = (h // sr, w // sr) if sr > 1 else (h, w)
        base = _arg(args, kwargs, 3, "attention_mask")
        return _with_arg(args, kwargs, 3, "attention_mask", _Keys(_grid_keys(hf, grid)).added_to(base, x.dtype))

    hf.pre(module, mask, with_kwargs=True)


def _cvt_attention(module: nn.Module, hf: _HFState) -> None:
    """CvT (``einsum`` + ``F.softmax``): keys are the class token (always visible) and the grid of the key
    projection's strided depthwise convolution (which reads zeros at masked inputs like every conv)."""
    projection = getattr(module.convolution_projection_key, "convolution_projection", None)
    conv = projection.convolution if projection is not None else None

    def keys(args, kwargs):
        h, w = int(_arg(args, kwargs, 1, "height")), int(_arg(args, kwargs, 2, "width"))
        if conv is not None:
            h, w = _conv_out(h, conv, 0), _conv_out(w, conv, 1)
        return _grid_keys(hf, (h, w), cls_token=module.with_cls_token)

    hf.push_keys(module, keys, with_kwargs=True)


def _levit_attention(module: nn.Module, hf: _HFState) -> None:
    """LeViT attention and attention with subsampling (``Tensor.softmax``): the keys are every input token of
    the layer's square grid; the subsampled queries need no mask."""

    def keys(args, kwargs):
        return _grid_keys(hf, hf.state.grid_of(args[0].shape[1]))

    hf.push_keys(module, keys)


def _levit_subsample(module: nn.Module, hf: _HFState) -> None:
    """LeViT's query subsampling keeps every ``stride``-th row and column of its square grid, also where the stride
    does not tile it (7 -> 4): the picked cells' visibility is the module's own pick of its input's, recorded for
    the layers that read the picked grid and for the reference's reading of their outputs."""

    def picked(mod, args, out):
        x = args[0]
        b, n, _ = x.shape
        fine = hf.state.grid_of(n)
        vis = hf.vis(fine).reshape(b, n, 1).to(x.dtype)
        side = len(range(0, mod.resolution, mod.stride))
        hf.state.record_pick(fine, mod.forward(vis).reshape(b, side, side) > 0.5, mod.stride)

    hf.post(module, picked)


def _levit_token_batch_norm(module: nn.Module, hf: _HFState) -> None:
    """LeViT's ``Linear`` + ``BatchNorm1d`` over (B * N) token rows: the rows' visibility for the patched
    ``F.batch_norm``, whose training-mode statistics then cover visible tokens only."""

    def enter(mod, args):
        x = args[0]
        hf.token_rows.append(hf.vis(hf.state.grid_of(x.shape[1])).reshape(-1))

    def leave(mod, args, out):
        hf.token_rows.pop()

    hf.pre(module, enter)
    hf.post(module, leave)


def _hiera_encoder(encoder: nn.Module, hf: _HFState) -> None:
    """Hiera: token visibility follows the tokens through the encoder.

    It enters in the order of the modeling file's ``unroll`` (wrapped to record its permutation); every
    layer with a query stride max-pools ``view(B, stride, -1)`` token groups, and the visibility is pooled the
    same way (a group must not mix masked and visible tokens). ``HieraBackbone`` feeds its encoder raster
    tokens that were never unrolled, so its groups span the image: only a mask of whole samples (every token of
    a sample visible, or none) is accepted, else InvalidInputError.
    """

    def enter(mod, args, kwargs):
        x = _arg(args, kwargs, 0, "hidden_states")
        perm, hf.hiera_perm = hf.hiera_perm, None
        if _arg(args, kwargs, 1, "bool_masked_pos") is not None:
            raise InvalidInputError(
                "Hiera in MAE mode drops its own randomly masked units; the oracle runs the "
                "model without them (is_mae=False)"
            )
        size = encoder.schedule[0][1]
        vis = hf.vis(tuple(size)).reshape(x.shape[0], -1)
        if perm is not None and perm.numel() == x.shape[1]:
            hf.hiera_tokens = vis[:, perm]
            return
        if not bool((vis == vis[:, :1]).all()):
            raise InvalidInputError(
                f"{type(encoder).__name__} got raster tokens that did not come from Hiera's unroll (HieraBackbone "
                "skips it): its pooling and mask-unit attention group positions across the image, so only a mask "
                "of whole samples (each all visible or all hidden) has masked-dense semantics"
            )
        hf.hiera_tokens = vis

    hf.pre(encoder, enter, with_kwargs=True)
    for layer in encoder.modules():
        if type(layer).__name__ == "HieraLayer":
            _hiera_layer(layer, hf)


def _hiera_layer(layer: nn.Module, hf: _HFState) -> None:
    """Hiera's mask-unit or global attention (``Tensor.softmax``): keys ``(B, 1, windows, 1, tokens per
    window)``, token ``t`` in window ``t % windows`` as the module's reshape puts it."""
    attention = layer.attn

    def keys(args, kwargs):
        vis = hf.hiera_tokens
        n = vis.shape[1]
        windows = n // (attention.query_stride * attention.window_size) if attention.use_mask_unit_attn else 1
        return vis.view(vis.shape[0], n // windows, windows).transpose(1, 2)[:, None, :, None, :]

    def pooled(mod, args, out):
        stride = layer.query_stride
        if stride > 1:
            groups = hf.hiera_tokens.view(hf.hiera_tokens.shape[0], stride, -1)
            if not bool((groups == groups[:, :1]).all()):
                raise InvalidInputError(
                    "a Hiera query pooling mixes masked and visible tokens: the mask unit is "
                    "not a multiple of the pooled positions"
                )
            hf.hiera_tokens = groups[:, 0]

    hf.push_keys(attention, keys)
    hf.post(layer, pooled)


def _mobilevit_layer(layer: nn.Module, hf: _HFState) -> None:
    """MobileViT: its transformer attends over the pixels at the same position of every 2-D patch; key
    visibility is the visibility map put through the layer's own ``unfolding`` (``(B * patch area, patches)``
    rows), added by ``F.softmax`` to every attention of the transformer."""
    transformer = layer.transformer

    def record(mod, args, out):
        hf.grids[layer] = tuple(out.shape[-2:])  # the map the layer unfolds

    def keys(args, kwargs):
        h, w = hf.grids[layer]
        if h % layer.patch_height or w % layer.patch_width:
            raise InvalidInputError(
                f"MobileViT interpolates a {h}x{w} map to whole {layer.patch_height}x"
                f"{layer.patch_width} patches, mixing masked and visible positions"
            )
        patches, _ = layer.unfolding(hf.vis((h, w))[:, None].to(args[0].dtype))  # (B * area, patches, 1)
        return patches[:, None, None, :, 0] > 0.5

    hf.post(layer.conv_1x1, record)
    hf.push_keys(transformer, keys)


# --- per-sample reductions ------------------------------------------------------------------------------


def _swiftformer_attention(module: nn.Module, hf: _HFState) -> None:
    """SwiftFormer's efficient additive attention recomputed from the module's definition with its token sum
    (the global query) over visible tokens only; the softmax stays on the axis the source uses."""
    hf.masked.append(module)

    def hook(mod, args, out):
        x = args[0]  # (B, N, C)
        b, n, _ = x.shape
        vis = hf.vis(hf.state.grid_of(n)).reshape(b, n, 1)
        query = F.normalize(module.to_query(x), dim=-1)
        key = F.normalize(module.to_key(x), dim=-1)
        weight = ((query @ module.w_g) * module.scale_factor).softmax(dim=-1)
        global_queries = torch.where(vis, weight * query, torch.zeros((), dtype=x.dtype)).sum(dim=1)
        global_queries = global_queries.unsqueeze(1).repeat(1, n, 1)
        return module.final(module.proj(global_queries * key) + query)

    hf.post(module, hook)


def _focalnet_modulation(module: nn.Module, hf: _HFState) -> None:
    """FocalNet's modulation recomputed from the module's definition with its global context
    (``ctx.mean(2).mean(3)`` in the source) averaged over visible positions only; its convolutions keep their
    zero-at-masked-inputs hooks."""

    def hook(mod, args, out):
        hidden = args[0]  # (B, H, W, C)
        channels = hidden.shape[-1]
        x = module.projection_in(hidden).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(x, (channels, channels, module.focal_level + 1), 1)
        ctx_all = 0
        for level in range(module.focal_level):
            ctx = module.focal_layers[level](ctx)
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        vis = hf.vis(tuple(ctx.shape[-2:]))[:, None].to(ctx.dtype)
        mean = (ctx * vis).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True).clamp_min(1)
        ctx_all = ctx_all + module.activation(mean) * gates[:, module.focal_level :]
        if module.normalize_modulator:
            ctx_all = ctx_all / (module.focal_level + 1)
        x_out = (q * module.projection_context(ctx_all)).permute(0, 2, 3, 1).contiguous()
        if module.use_post_layernorm_in_modulation:
            x_out = module.layernorm(x_out)
        return module.projection_dropout(module.projection_out(x_out))

    hf.post(module, hook)


def _convnextv2_grn(module: nn.Module, hf: _HFState) -> None:
    """ConvNeXt V2's GRN (channels-last) recomputed from its definition with the per-channel L2 norm over
    visible positions only (FCMAE's sparse GRN); its eps (1e-6) is the source's constant."""

    def hook(mod, args, out):
        x = args[0]  # (B, H, W, C)
        vis = hf.vis(tuple(x.shape[1:3]))[..., None]
        g = torch.where(vis, x, torch.zeros((), dtype=x.dtype)).pow(2).sum((1, 2), keepdim=True).sqrt()
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return module.weight * (x * n) + module.bias + x

    hf.post(module, hook)


def _group_norm(state: HookState) -> Callable:
    """``nn.GroupNorm`` of a (B, C, H, W) map (PoolFormer's) with per-sample, per-group statistics over visible
    positions only; masked positions are normalised with them too (their values are never read)."""

    def hook(module: nn.GroupNorm, args, out):
        x = args[0]
        if x.dim() != 4 or state.dense or state.per_sample:
            return None
        b, c, h, w = x.shape
        g = module.num_groups
        vis = state.grid_visibility((h, w))[:, None, None].to(x.dtype)  # (B, 1, 1, H, W)
        grouped = x.reshape(b, g, c // g, h, w)
        count = vis.sum((2, 3, 4), keepdim=True) * (c // g)
        mean = (grouped * vis).sum((2, 3, 4), keepdim=True) / count.clamp_min(1)
        var = ((grouped - mean).pow(2) * vis).sum((2, 3, 4), keepdim=True) / count.clamp_min(1)
        y = ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(b, c, h, w)
        if module.affine:
            y = y * module.weight[None, :, None, None] + module.bias[None, :, None, None]
        return y

    return hook


# transformers class name -> installer(module, hf): the per-family knowledge of this oracle
INSTALLERS: Dict[str, Callable[[nn.Module, _HFState], None]] = {
    "SwinLayer": _swin_layer,
    "Swinv2Layer": _swin_layer,
    "DonutSwinLayer": _swin_layer,
    "MaskFormerSwinLayer": _swin_layer,
    "VitDetLayer": _vitdet_layer,
    "Sam2MultiScaleBlock": _sam2_block,
    "PvtEfficientSelfAttention": _pvt_attention,
    "PvtV2SelfAttention": _pvt_attention,
    "SegformerAttention": _segformer_attention,
    "CvtSelfAttention": _cvt_attention,
    "LevitAttention": _levit_attention,
    "LevitAttentionSubsample": _levit_attention,
    "MLPLayerWithBN": _levit_token_batch_norm,
    "LevitSubsample": _levit_subsample,
    "HieraEncoder": _hiera_encoder,
    "MobileViTLayer": _mobilevit_layer,
    "SwiftFormerEfficientAdditiveAttention": _swiftformer_attention,
    "FocalNetModulation": _focalnet_modulation,
    "ConvNextV2GRN": _convnextv2_grn,
}


def _installer(module: nn.Module) -> Optional[Callable[[nn.Module, _HFState], None]]:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ in INSTALLERS:
            return INSTALLERS[cls.__name__]
    return None


def _check_attentions_known(model: nn.Module, masked: List[nn.Module]) -> None:
    """Every transformers module named like an attention is one whose keys a hook masks, or holds one, or
    sits in one: an attention the oracle does not know would silently attend to masked keys."""
    names = {id(m): n for n, m in model.named_modules()}
    covered = [names[id(m)] for m in masked if id(m) in names]
    for name, module in model.named_modules():
        cls = type(module)
        if not cls.__module__.startswith("transformers.") or "Attention" not in cls.__name__:
            continue
        inside = any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in covered)
        if not inside:
            raise InvalidInputError(
                f"the dense masked reference does not know the attention {cls.__name__} "
                f"({name}) of {type(model).__name__}: its keys would not be masked"
            )


def _masked_softmax(state: HookState, softmax: Callable) -> Callable:
    """``Tensor.softmax`` that adds the key mask on top of the state's stack when it is one of this module's."""

    def run(self, *args, **kwargs):
        top = state.key_masks[-1] if state.key_masks else None
        if isinstance(top, _Keys):
            self = self + top.added_to(None, self.dtype)
        return softmax(self, *args, **kwargs)

    return run


def _masked_interface(hf: _HFState, get_interface: Callable) -> Callable:
    """``ALL_ATTENTION_FUNCTIONS.get_interface`` whose functions add the key mask of their calling module."""

    def get(attn_implementation, default):
        function = get_interface(attn_implementation, default)

        def run(module, query, key, value, attention_mask=None, *args, **kwargs):
            keys = hf.interface_keys.get(module)
            if keys is not None:
                attention_mask = keys.added_to(attention_mask, query.dtype)
            return function(module, query, key, value, attention_mask, *args, **kwargs)

        return run

    return get


def _token_batch_norm(hf: _HFState, batch_norm: Callable) -> Callable:
    """``F.batch_norm`` that hands (B * N, C) token rows of a known grid to the (visible-statistics)
    ``batch_norm`` below it as a (B, C, H, W) map."""

    def run(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        rows = hf.token_rows[-1] if hf.token_rows else None
        if not training or rows is None or input.dim() != 2 or input.shape[0] != rows.numel():
            return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        b = hf.visible.shape[0]
        h, w = hf.state.grid_of(input.shape[0] // b)
        grid = input.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        out = batch_norm(grid, running_mean, running_var, weight, bias, training, momentum, eps)
        return out.permute(0, 2, 3, 1).reshape(input.shape)

    return run


def _hiera_unroll(hf: _HFState, unroll: Callable) -> Callable:
    """Hiera's ``unroll``, recording which raster position each output token comes from."""

    def run(hidden_states, image_shape, patch_stride, schedule):
        n = hidden_states.shape[1]
        index = torch.arange(n, dtype=torch.float64, device=hidden_states.device).view(1, n, 1)
        hf.hiera_perm = unroll(index, image_shape, patch_stride, schedule).view(n).long()
        return unroll(hidden_states, image_shape, patch_stride, schedule)

    return run


@contextmanager
def install(model: nn.Module, state: HookState) -> Iterator[None]:
    """The transformers families' masked-dense hooks on ``model`` for one forward (see the module docstring)."""
    hf = _HFState(state)
    patched: List[Tuple[Any, str, Any]] = []  # (owner, attribute, original) to restore

    def patch(owner: Any, name: str, value: Any) -> None:
        patched.append((owner, name, owner.__dict__.get(name, _ABSENT)))
        setattr(owner, name, value)

    try:
        for module in model.modules():
            found = _installer(module)
            if found is not None:
                found(module, hf)
            if isinstance(module, nn.GroupNorm):
                hf.post(module, _group_norm(state))
        _check_attentions_known(model, hf.masked)
        patch(torch.Tensor, "softmax", _masked_softmax(state, torch.Tensor.softmax))
        patch(F, "batch_norm", _token_batch_norm(hf, F.batch_norm))
        if any(type(m).__name__ == "Sam2MultiScaleBlock" for m in model.modules()):
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            patch(
                ALL_ATTENTION_FUNCTIONS, "get_interface", _masked_interface(hf, ALL_ATTENTION_FUNCTIONS.get_interface)
            )
        for module in model.modules():
            if type(module).__name__ == "HieraEncoder":
                modeling = _modeling(module)
                patch(modeling, "unroll", _hiera_unroll(hf, modeling.unroll))
                break
        yield
    finally:
        for owner, name, original in reversed(patched):
            if original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        for handle in hf.handles:
            handle.remove()


_ABSENT = object()


def feature_tensor(model: nn.Module, module: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """A stage (``module``'s output) or the final output (``module`` None) in raster order.

    Hiera's tokens are in its unrolled order inside the encoder and at its output while query strides remain
    unconsumed: they are put back with the encoder's own ``reroll`` and returned as raster (B, N, C) tokens.
    Everything else is returned as it is.
    """
    if x.dim() != 3:
        return x
    for encoder in model.modules():
        if type(encoder).__name__ != "HieraEncoder":
            continue
        if module is not None and not any(module is m for m in encoder.modules()):
            continue
        for stage, (_, size) in encoder.schedule.items():
            if math.prod(size) == x.shape[1]:
                return encoder.reroll(x, stage).flatten(1, 2)
    return x


FAMILY = Family(install=install, feature_tensor=feature_tensor)
