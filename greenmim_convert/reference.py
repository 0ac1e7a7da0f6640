"""The dense masked reference: the independent oracle every converted model is checked against.

It runs the ORIGINAL timm modules on the full image and changes only what masked-dense semantics
changes, through forward hooks: every attention gets the key mask added (masked keys removed), and
every convolution reads zeros at masked input positions. It shares nothing with the passes but the
model's weights; visibility inside a block is derived with timm's own window partition.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import davit, focalnet, pvt_v2, twins
from timm.models import swin_transformer as swin
from timm.models import swin_transformer_v2 as swinv2
from timm.models import swin_transformer_v2_cr as swinv2cr

from .sites import Sites
from .tracing import feature_stages
from .tokens import GreenOutput, VisibleTokens


def _neg(dtype: torch.dtype) -> float:
    """A finite additive mask: exp() of it underflows to exactly 0 and sums never overflow."""
    return -0.25 * torch.finfo(dtype).max


def visibility_map(visible: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` bool visibility of a feature map of the given size."""
    b, uh, uw = visible.shape
    h, w = size
    if h % uh or w % uw:
        raise ValueError(f"feature map {size} is not a multiple of the mask grid {(uh, uw)}")
    return visible.repeat_interleave(h // uh, 1).repeat_interleave(w // uw, 2)


class _HookState:
    def __init__(self, visible: torch.Tensor, img_size: Tuple[int, int]):
        self.visible = visible
        self.img_size = img_size
        self.block_vis: Dict[nn.Module, Tuple[torch.Tensor, nn.Module]] = {}
        self.key_masks: List[Callable] = []

    def grid_of(self, tokens: int) -> Tuple[int, int]:
        """The feature grid with ``tokens`` cells and the image's aspect ratio."""
        h, w = self.img_size
        for stride in range(1, max(h, w) + 1):
            if h % stride == 0 and w % stride == 0 and (h // stride) * (w // stride) == tokens:
                return h // stride, w // stride
        raise ValueError(f"{tokens} keys do not form a grid of a {h}x{w} image")


def _global_keys(state: _HookState, k: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, N) key visibility of a global attention whose N keys tile the image."""
    return visibility_map(state.visible, state.grid_of(k.shape[-2])).reshape(k.shape[0], 1, 1, -1)


def _twins_window_keys(module: nn.Module) -> Callable:
    """(B, windows, 1, 1, ws*ws) key visibility of Twins' locally-grouped attention."""
    def keys(state: _HookState, k: torch.Tensor) -> torch.Tensor:
        b, nw, _, n, _ = k.shape
        ws = module.ws
        h, w = state.grid_of(nw * n)
        vis = visibility_map(state.visible, (h, w)).view(b, h // ws, ws, w // ws, ws).transpose(2, 3)
        return vis.reshape(b, nw, 1, 1, n)
    return keys


def _davit_window_keys(module: nn.Module) -> Callable:
    """(B * windows, 1, 1, wh*ww) key visibility of DaViT's window attention (timm's own partition)."""
    def keys(state: _HookState, k: torch.Tensor) -> torch.Tensor:
        b = state.visible.shape[0]
        n = k.shape[-2]
        vis = visibility_map(state.visible, state.grid_of(k.shape[0] // b * n))
        wins = davit.window_partition(vis[..., None].to(k.dtype), module.window_size)
        return wins.reshape(k.shape[0], 1, 1, n) > 0.5
    return keys


def _channel_attention_post(state: _HookState) -> Callable:
    """DaViT channel attention recomputed with its token sums over visible tokens only.

    Written from the module's definition: the (head_dim x head_dim) logits sum k^T v (V2: q^T k,
    scaled by the visible count) over the tokens; masked tokens are zeroed before the sum.
    """
    def hook(module: nn.Module, args, out):
        x = args[0]
        b, n, c = x.shape
        vis = visibility_map(state.visible, state.grid_of(n)).reshape(b, 1, n, 1)
        v2 = isinstance(module, davit.ChannelAttentionV2)
        heads = module.groups if v2 else module.num_heads
        q, k, v = module.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        zero = torch.zeros((), dtype=x.dtype)
        if v2:
            count = vis.sum(dim=2, keepdim=True).clamp_min(1).to(x.dtype)
            q = torch.where(vis, q * count.pow(-0.5) if module.dynamic_scale else q * module.head_dim ** -0.5, zero)
            attn = torch.matmul(q.transpose(-1, -2), k).softmax(dim=-1)
            y = torch.matmul(attn, v.transpose(-1, -2)).transpose(-1, -2)
        else:
            k = torch.where(vis, k * module.scale, zero)
            attn = torch.matmul(k.transpose(-1, -2), v).softmax(dim=-1)
            y = torch.matmul(attn, q.transpose(-1, -2)).transpose(-1, -2)
        return module.proj(y.transpose(1, 2).reshape(b, n, c))
    return hook


def _focal_modulation_post(state: _HookState) -> Callable:
    """FocalNet's modulation recomputed with its global context averaged over visible positions only.

    The focal convolutions keep their own hooks (they read zeros at masked inputs); only the
    ``mean`` over the grid, which no module hook reaches, is replaced by the visible-only mean.
    """
    def hook(module: nn.Module, args, out):
        q, ctx, gates = torch.split(module.f(args[0]), module.input_split, 1)
        levels = module.focal_level
        modulator = torch.zeros_like(ctx)
        for level, layer in enumerate(module.focal_layers):
            ctx = layer(ctx)
            modulator = modulator + ctx * gates[:, level:level + 1]
        vis = visibility_map(state.visible, ctx.shape[-2:])[:, None].to(ctx.dtype)
        mean = (ctx * vis).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True).clamp_min(1)
        modulator = modulator + module.act(mean) * gates[:, levels:]
        if module.normalize_modulator:
            modulator = modulator / (levels + 1)
        return module.proj_drop(module.proj(module.norm(q * module.h(modulator))))
    return hook


def _attention_pre(keys_for: Callable[[nn.Module], Callable]) -> Callable:
    def factory(state: _HookState) -> Callable:
        def hook(module: nn.Module, args):
            state.key_masks.append(keys_for(module))
        return hook
    return factory


def _attention_post(state: _HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        state.key_masks.pop()
    return hook


def _masked_sdpa(state: _HookState, sdpa: Callable) -> Callable:
    """SDPA that, inside an attention module the oracle knows, removes the keys at masked positions."""
    def run(q, k, v, attn_mask=None, *args, **kwargs):
        if state.key_masks and attn_mask is None:
            vis = state.key_masks[-1](state, k)
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            attn_mask = torch.where(vis, zero, torch.tensor(_neg(q.dtype), dtype=q.dtype))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)
    return run


def _swin_block_pre(state: _HookState) -> Callable:
    def hook(block: nn.Module, args):
        x = args[0]
        state.block_vis[block.attn] = (visibility_map(state.visible, x.shape[1:3]), block)
    return hook


def _swin_attention_pre(state: _HookState) -> Callable:
    def hook(attn: nn.Module, args, kwargs):
        vis, block = state.block_vis[attn]
        x = args[0]
        sh, sw = block.shift_size
        if sh or sw:
            vis = torch.roll(vis, shifts=(-sh, -sw), dims=(1, 2))
        wins = swin.window_partition(vis[..., None].to(x.dtype), block.window_size).reshape(x.shape[0], -1)
        key = torch.where(wins > 0.5, torch.zeros((), dtype=x.dtype), torch.tensor(_neg(x.dtype), dtype=x.dtype))
        key = key[:, None, :].expand(-1, x.shape[1], -1)
        base = kwargs.get("mask")
        if base is not None:
            key = key + base.to(x.dtype).repeat(x.shape[0] // base.shape[0], 1, 1)
        kwargs = dict(kwargs)
        kwargs["mask"] = key
        return args, kwargs
    return hook


def _conv_pre(state: _HookState) -> Callable:
    def hook(conv: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, x.shape[-2:])
        return (torch.where(vis[:, None], x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])
    return hook


def _mean_pool_post(state: _HookState) -> Callable:
    """Adaptive average pooling that averages the visible positions only."""
    def hook(pool: nn.Module, args, out):
        x = args[0]
        vis = visibility_map(state.visible, x.shape[-2:])[:, None].to(x.dtype)
        summed = F.adaptive_avg_pool2d(torch.where(vis > 0, x, torch.zeros((), dtype=x.dtype)), pool.output_size)
        share = F.adaptive_avg_pool2d(vis, pool.output_size)
        return torch.where(share > 0, summed / share.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros((), dtype=x.dtype))
    return hook


# module type -> (hook factory, with kwargs): the per-family knowledge of the oracle
PRE_HOOKS: List[Tuple[Type[nn.Module], Callable, bool]] = [
    (swin.SwinTransformerBlock, _swin_block_pre, False),
    (swin.WindowAttention, _swin_attention_pre, True),
    (swinv2.SwinTransformerV2Block, _swin_block_pre, False),
    (swinv2.WindowAttention, _swin_attention_pre, True),
    (swinv2cr.SwinTransformerV2CrBlock, _swin_block_pre, False),
    (swinv2cr.WindowMultiHeadAttention, _swin_attention_pre, True),
    (nn.Conv2d, _conv_pre, False),
    (pvt_v2.Attention, _attention_pre(lambda m: _global_keys), False),
    (twins.GlobalSubSampleAttn, _attention_pre(lambda m: _global_keys), False),
    (twins.LocallyGroupedAttn, _attention_pre(_twins_window_keys), False),
    (davit.WindowAttention, _attention_pre(_davit_window_keys), False),
]
POST_HOOKS: List[Tuple[Type[nn.Module], Callable]] = [
    (pvt_v2.Attention, _attention_post),
    (twins.GlobalSubSampleAttn, _attention_post),
    (twins.LocallyGroupedAttn, _attention_post),
    (davit.WindowAttention, _attention_post),
    (davit.ChannelAttention, _channel_attention_post),
    (davit.ChannelAttentionV2, _channel_attention_post),
    (focalnet.FocalModulation, _focal_modulation_post),
    (nn.AdaptiveAvgPool2d, _mean_pool_post),
]


# modules whose key mask the patched SDPA adds: they must take timm's fused (SDPA) path, whatever
# TIMM_FUSED_ATTN says, or the mask would never be applied
SDPA_MASKED = (pvt_v2.Attention, twins.GlobalSubSampleAttn, twins.LocallyGroupedAttn, davit.WindowAttention)


@contextmanager
def masked_dense_hooks(model: nn.Module, visible: torch.Tensor, img_size: Tuple[int, int]) -> Iterator[None]:
    """Install the masked-dense hooks on ``model`` for one forward."""
    state = _HookState(visible, img_size)
    handles = []
    sdpa = F.scaled_dot_product_attention
    fused = {mod: mod.fused_attn for mod in model.modules() if isinstance(mod, SDPA_MASKED) and hasattr(mod, "fused_attn")}
    try:
        for mod in fused:
            mod.fused_attn = True
        for mod in model.modules():
            for cls, factory, with_kwargs in PRE_HOOKS:
                if isinstance(mod, cls):
                    handles.append(mod.register_forward_pre_hook(factory(state), with_kwargs=with_kwargs))
            for cls, factory in POST_HOOKS:
                if isinstance(mod, cls):
                    handles.append(mod.register_forward_hook(factory(state)))
        F.scaled_dot_product_attention = _masked_sdpa(state, sdpa)
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for mod, flag in fused.items():
            mod.fused_attn = flag
        for h in handles:
            h.remove()


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


def dense_masked_reference(
    model: nn.Module, images: torch.Tensor, visible: torch.Tensor, fmt: Optional[str] = None
) -> GreenOutput:
    """The original model under masked-dense semantics, read at the visible positions of every stage."""
    fmt = fmt or getattr(model, "output_fmt", "NCHW")
    names, strides = feature_stages(model)
    captured: Dict[str, torch.Tensor] = {}
    handles = [
        _called_module(model.get_submodule(n)).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out))
        for n in names
    ]
    try:
        with masked_dense_hooks(model, visible, tuple(images.shape[-2:])):
            last = model.forward_features(images)
    finally:
        for h in handles:
            h.remove()
    size = tuple(images.shape[-2:])
    stages = [dense_to_tokens(captured[n], visible, s, fmt, size) for n, s in zip(names, strides)]
    return GreenOutput(dense_to_tokens(last, visible, strides[-1], fmt, size), stages)


def _called_module(module: nn.Module) -> nn.Module:
    """The module whose output is a stage's output: a container's last child when it is never called."""
    while isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        module = list(module.children())[-1]
    return module
