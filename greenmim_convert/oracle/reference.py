"""The dense masked reference: the independent oracle every converted model is checked against.

It runs the ORIGINAL modules on the full image and changes only what masked-dense semantics
changes, through forward hooks: every attention gets the key mask added (masked keys removed),
every convolution reads zeros at masked input positions, and per-sample statistics (GRN,
squeeze-excite, training-mode BatchNorm, global pools) are taken over visible positions. It shares nothing with the passes but the
model's weights; visibility inside a block is derived with timm's own window partition. timm models
are known by class; torchvision's Swin by its module-level ``shifted_window_attention`` (replaced for
the forward by an independent masked implementation); transformers' vision backbones by ``reference_hf``
(an ``EXTENSIONS`` entry, imported only for a model holding transformers modules); any other model's SDPA
attention through a ``key_mask_for`` callback.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
import importlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm import layers as timm_layers
from timm.layers.grn import GlobalResponseNorm
from timm.layers.squeeze_excite import SEModule
from timm.layers.pos_embed_rel import RelPosBias
from timm.models import davit, eva, focalnet, gcvit, hiera, maxxvit, mvitv2, nest, pvt_v2, twins
from timm.models import swin_transformer as swin
from timm.models import swin_transformer_v2 as swinv2
from timm.models import swin_transformer_v2_cr as swinv2cr
from torchvision.models import maxvit as tv_maxvit
from torchvision.models import swin_transformer as tv_swin
from torchvision.ops import SqueezeExcitation as TvSqueezeExcitation

from greenmim_convert.errors import InvalidInputError
from greenmim_convert.runtime.plan.sites import Sites
from greenmim_convert.compiler.capture import module_tensor, timm_stages as feature_stages
from greenmim_convert.runtime.tokens import GreenOutput, VisibleTokens


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
        self.key_masks: List[Any] = []  # innermost attention module's key visibility: a function, or _GivenKeys
        self.per_sample = 0  # > 0 inside a module whose inner convs act on one value per sample (squeeze-excite)
        self.dense = 0  # > 0 inside a module computed densely at every position (GC ViT's global-query generator)
        self.masked_rel_pos: List[bool] = []  # per MViTv2 attention being run: its keys were masked

    def grid_of(self, tokens: int) -> Tuple[int, int]:
        """The feature grid with ``tokens`` cells and the image's aspect ratio."""
        h, w = self.img_size
        for stride in range(1, max(h, w) + 1):
            if h % stride == 0 and w % stride == 0 and (h // stride) * (w // stride) == tokens:
                return h // stride, w // stride
        raise ValueError(f"{tokens} keys do not form a grid of a {h}x{w} image")


def _global_keys(state: _HookState, k: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, N) key visibility of a global attention whose N keys tile the image, or whose last keys tile
    it after a few leading prefix tokens (class, distillation or register tokens: always visible)."""
    n = k.shape[-2]
    prefix = next((p for p in range(n) if _grid_tokens(n - p, state.img_size)), None)
    if prefix is None:
        raise ValueError(f"{n} keys do not form a grid of a {state.img_size} image after prefix tokens")
    grid = visibility_map(state.visible, state.grid_of(n - prefix)).reshape(k.shape[0], -1)
    return torch.cat([grid.new_ones(k.shape[0], prefix), grid], 1).reshape(k.shape[0], 1, 1, -1)


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
    scaled by ``N ** -0.5`` with N the dense token count, a number the module reads from the input's
    shape) over the tokens; masked tokens are zeroed before the sum.
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
            q = torch.where(vis, q * (n ** -0.5 if module.dynamic_scale else module.head_dim ** -0.5), zero)
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


def _grn_post(state: _HookState) -> Callable:
    """Global response normalisation with its per-sample L2 norm over visible positions only (FCMAE's sparse GRN).

    From the definition: ``g = ||x||_2`` over the grid per channel, ``n = g / (mean over channels of g + eps)``,
    output ``x + bias + weight * x * n``; masked positions add nothing to ``g`` (their output is never read).
    """
    def hook(module: nn.Module, args, out):
        x = args[0]
        spatial = list(module.spatial_dim)
        grid = [x.shape[d] for d in spatial]
        vis = visibility_map(state.visible, tuple(grid))
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        for d, size in zip(spatial, grid):
            shape[d] = size
        vis = vis.reshape(shape)
        g = torch.where(vis, x, torch.zeros((), dtype=x.dtype)).pow(2).sum(spatial, keepdim=True).sqrt()
        n = g / (g.mean(dim=module.channel_dim, keepdim=True) + module.eps)
        wb = [1] * x.dim()
        wb[module.channel_dim] = -1
        return x + module.bias.view(wb) + module.weight.view(wb) * (x * n)
    return hook


def _partition_keys_pre(state: _HookState) -> Callable:
    """MaxViT's block or grid attention: key visibility partitioned by timm's own partition functions."""
    def hook(module: nn.Module, args):
        x = args[0]
        nchw = isinstance(module, maxxvit.PartitionAttention2d)
        grid = tuple(x.shape[-2:]) if nchw else tuple(x.shape[1:3])
        vis = visibility_map(state.visible, grid).to(x.dtype)
        if nchw:
            part = maxxvit.window_partition_nchw if module.partition_block else maxxvit.grid_partition_nchw
            wins = part(vis[:, None], module.partition_size)
        else:
            part = maxxvit.window_partition if module.partition_block else maxxvit.grid_partition
            wins = part(vis[..., None], module.partition_size)
        state.key_masks.append(_GivenKeys(wins.reshape(wins.shape[0], 1, 1, -1) > 0.5))
    return hook


def _nest_block_keys(module: nn.Module) -> Callable:
    """(B, 1, T, 1, N) key visibility of NesT's attention inside its T blocks of N tokens (timm's ``blockify``)."""
    def keys(state: _HookState, k: torch.Tensor) -> torch.Tensor:
        b, _, t, n, _ = k.shape
        vis = visibility_map(state.visible, state.grid_of(t * n))
        blocks = nest.blockify(vis[..., None].to(k.dtype), math.isqrt(n))
        return blocks.reshape(b, 1, t, 1, n) > 0.5
    return keys


def _masked_inputs_pre(fill: float) -> Callable[[_HookState], Callable]:
    """A pre-hook giving masked input positions the value ``fill``: 0 for convolutions (masked-dense), -inf for
    max pooling (the maximum over visible positions, as the pool's own padding); off inside per-sample modules."""
    def factory(state: _HookState) -> Callable:
        def hook(module: nn.Module, args):
            if state.per_sample or state.dense:
                return None
            x = args[0]
            vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None]
            vis = vis.repeat_interleave(x.shape[0] // vis.shape[0], 0)  # heads folded into the batch, samples major
            return (torch.where(vis, x, torch.tensor(fill, dtype=x.dtype)),) + tuple(args[1:])
        return hook
    return factory


def _max_pool_post(state: _HookState) -> Callable:
    """Outputs in masked units are not computed: zero, not the -inf of an all-masked window."""
    def hook(pool: nn.Module, args, out):
        if state.dense:
            return None
        vis = visibility_map(state.visible, tuple(out.shape[-2:]))[:, None]
        return torch.where(vis, out, torch.zeros((), dtype=out.dtype))
    return hook


def _mvit_rel_pos(state: _HookState, rel_pos: Callable) -> Callable:
    """MViTv2's relative-position step, then the key mask: the logits (B, heads, Nq, Nk) leave it for the softmax,
    the keys are the class token (always visible) and the ``k_size`` grid of pooled keys."""
    def run(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w):
        attn = rel_pos(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w)
        vis = visibility_map(state.visible, tuple(k_size)).reshape(attn.shape[0], -1)
        if has_cls_token:
            vis = torch.cat([torch.ones_like(vis[:, :1]), vis], 1)
        state.masked_rel_pos[-1] = True
        neg = torch.tensor(_neg(attn.dtype), dtype=attn.dtype)
        return attn + torch.where(vis, torch.zeros((), dtype=attn.dtype), neg)[:, None, None, :]
    return run


def _mvit_attention_pre(state: _HookState) -> Callable:
    def hook(module: nn.Module, args):
        state.masked_rel_pos.append(False)
    return hook


def _mvit_attention_post(state: _HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        if not state.masked_rel_pos.pop():
            raise InvalidInputError(f"{type(module).__name__} with rel_pos_type={module.rel_pos_type!r}: the oracle masks "
                                    "MViTv2's keys where it adds its spatial relative positions")
    return hook


def _squeeze_excite_pre(state: _HookState) -> Callable:
    def hook(module: nn.Module, args):
        if not state.dense:
            state.per_sample += 1
    return hook


def _squeeze_excite_post(state: _HookState) -> Callable:
    """timm's ``SEModule`` recomputed from its definition with the squeeze (mean, and max when ``add_maxpool``)
    over visible positions only; its 1x1 convs act on one value per sample."""
    def hook(module: nn.Module, args, out):
        if state.dense:
            return None
        state.per_sample -= 1
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None]
        zero = torch.zeros((), dtype=x.dtype)
        x_se = torch.where(vis, x, zero).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True).clamp_min(1)
        if module.add_maxpool:
            low = torch.tensor(float("-inf"), dtype=x.dtype)
            x_se = 0.5 * x_se + 0.5 * torch.where(vis, x, low).amax((2, 3), keepdim=True)
        state.per_sample += 1
        try:
            x_se = module.fc2(module.act(module.bn(module.fc1(x_se))))
        finally:
            state.per_sample -= 1
        return x * module.gate(x_se)
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
        top = state.key_masks[-1] if state.key_masks else None
        if isinstance(top, _GivenKeys):
            attn_mask = top.added_to(attn_mask, q.dtype)
        elif top is not None and attn_mask is None:
            vis = top(state, k)
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            attn_mask = torch.where(vis, zero, torch.tensor(_neg(q.dtype), dtype=q.dtype))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)
    return run


KeyMaskFn = Callable[[Tuple[Any, ...], torch.Tensor], torch.Tensor]


class _GivenKeys:
    """Key visibility a ``key_mask_for`` callback computed for one call of an attention module."""

    def __init__(self, vis: torch.Tensor):
        self.vis = vis

    def added_to(self, attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The module's own mask (None, bool: True = attend, or float) plus the key mask, as a float mask."""
        zero = torch.zeros((), dtype=dtype, device=self.vis.device)
        key = torch.where(self.vis, zero, torch.tensor(_neg(dtype), dtype=dtype, device=self.vis.device))
        if attn_mask is None:
            return key
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, zero, torch.tensor(float("-inf"), dtype=dtype, device=zero.device))
        return attn_mask + key


def _given_keys_pre(state: "_HookState", keys: KeyMaskFn) -> Callable:
    def hook(module: nn.Module, args):
        state.key_masks.append(_GivenKeys(keys(args, state.visible)))
    return hook


class _SoftmaxKeys(_GivenKeys):
    """Key visibility added to the logits by the patched ``F.softmax`` (attentions that do not call SDPA)."""


def _tv_partition_keys_pre(state: _HookState) -> Callable:
    """torchvision MaxViT's window or grid attention: key visibility partitioned and swapped by the layer's own ops."""
    def hook(layer: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None].to(x.dtype)
        parts = layer.partition_swap(layer.partition_op(vis, layer.p))  # (B, G, P, 1)
        state.key_masks.append(_SoftmaxKeys(parts.permute(0, 1, 3, 2)[:, :, None] > 0.5))  # (B, G, 1, 1, P)
    return hook


def _masked_softmax(state: "_HookState", softmax: Callable) -> Callable:
    """``F.softmax`` over attention logits that, inside an attention the oracle knows, removes the masked keys."""
    def run(input, dim=None, *args, **kwargs):
        top = state.key_masks[-1] if state.key_masks else None
        if isinstance(top, _SoftmaxKeys):
            input = input + top.added_to(None, input.dtype)
        return softmax(input, dim, *args, **kwargs)
    return run


def _per_sample_post(state: _HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        if not state.dense:
            state.per_sample -= 1
    return hook


def _masked_batch_norm(state: "_HookState", batch_norm: Callable) -> Callable:
    """``F.batch_norm`` whose training-mode statistics are taken over the visible positions of the batch only
    (the sparse BatchNorm of SparK and FCMAE), running statistics updated from them; eval mode is unchanged.

    From the definition: per channel, mean and biased variance over the visible positions normalise;
    the running mean and the unbiased variance are blended in with ``momentum``.
    """
    def run(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if not training or input.dim() != 4 or state.per_sample or state.dense:
            return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        vis = visibility_map(state.visible, tuple(input.shape[-2:]))[:, None].to(input.dtype)
        n = vis.sum()
        mean = (input * vis).sum((0, 2, 3)) / n
        centred = (input - mean[None, :, None, None]) * vis
        var = centred.pow(2).sum((0, 2, 3)) / n
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean)
                running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
        out = (input - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
        if weight is not None:
            out = out * weight[None, :, None, None]
        if bias is not None:
            out = out + bias[None, :, None, None]
        return out
    return run


def _tv_shifted_window_attention(state: "_HookState") -> Callable:
    """torchvision's ``shifted_window_attention`` (Swin V1, and V2 when ``logit_scale`` is given) plus the key mask.

    Written from torchvision's definition: pad the (B, H, W, C) map to whole windows, roll by the
    shift (no shift along an axis whose padded size fits in one window), attend inside windows with
    the bias, the seam mask (-100 between regions the roll made neighbours) and the key mask, then
    undo the roll and crop. Key visibility follows the same pad/roll/partition; the padding is the
    model's own and stays visible (it is no image position, like a conv's zero padding).
    """
    def attention(
        input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, relative_position_bias: torch.Tensor,
        window_size: Sequence[int], num_heads: int, shift_size: Sequence[int], attention_dropout: float = 0.0,
        dropout: float = 0.0, qkv_bias: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
        logit_scale: Optional[torch.Tensor] = None, training: bool = True,
    ) -> torch.Tensor:
        b, h, w, c = input.shape
        wh, ww = int(window_size[0]), int(window_size[1])
        ph, pw = (-h) % wh, (-w) % ww
        hp, wp = h + ph, w + pw
        sh = int(shift_size[0]) if wh < hp else 0
        sw = int(shift_size[1]) if ww < wp else 0
        x = F.pad(input, (0, 0, 0, pw, 0, ph))
        vis = F.pad(visibility_map(state.visible, (h, w)), (0, pw, 0, ph), value=True)
        if sh or sw:
            x = torch.roll(x, (-sh, -sw), (1, 2))
            vis = torch.roll(vis, (-sh, -sw), (1, 2))
        gh, gw, n, d = hp // wh, wp // ww, wh * ww, c // num_heads

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, Hp, Wp, ...) -> (B, gh*gw, wh*ww, ...)
            t = t.reshape(t.shape[0], gh, wh, gw, ww, *t.shape[3:]).transpose(2, 3)
            return t.reshape(t.shape[0], gh * gw, n, *t.shape[5:])

        tokens = windows(x)  # (B, nW, N, C)
        if logit_scale is not None and qkv_bias is not None:
            qkv_bias = torch.cat([qkv_bias[:c], torch.zeros_like(qkv_bias[c:2 * c]), qkv_bias[2 * c:]])
        qkv = F.linear(tokens, qkv_weight, qkv_bias).reshape(b, gh * gw, n, 3, num_heads, d)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each (B, nW, heads, N, d)
        if logit_scale is None:
            logits = (q * d ** -0.5) @ k.transpose(-1, -2)
        else:
            cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            logits = cos * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        logits = logits + relative_position_bias  # (B, nW, heads, N, N) + (1, heads, N, N)
        if sh or sw:
            # the strips the roll wrapped around (last sh rows, last sw cols) are regions of their own;
            # torchvision's other region border (at -window) falls between windows and changes nothing
            rows = (torch.arange(hp, device=x.device) >= hp - sh).long()
            cols = (torch.arange(wp, device=x.device) >= wp - sw).long()
            region = windows((rows[:, None] * 2 + cols[None, :])[None])[0]  # (nW, N)
            seam = torch.where(region[:, :, None] != region[:, None, :], -100.0, 0.0).to(logits.dtype)
            logits = logits + seam[None, :, None]
        keys = windows(vis)  # (B, nW, N)
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        neg = torch.tensor(_neg(logits.dtype), dtype=logits.dtype)
        logits = logits + torch.where(keys, zero, neg)[:, :, None, None, :]
        attn = F.dropout(logits.softmax(-1), p=attention_dropout, training=training)
        y = (attn @ v).transpose(2, 3).reshape(b, gh, gw, wh, ww, c)  # heads back next to channels
        y = F.dropout(F.linear(y, proj_weight, proj_bias), p=dropout, training=training)
        y = y.transpose(2, 3).reshape(b, hp, wp, c)
        if sh or sw:
            y = torch.roll(y, (sh, sw), (1, 2))
        return y[:, :h, :w].contiguous()
    return attention


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


def _mean_pool_post(state: _HookState) -> Callable:
    """Adaptive average pooling that averages the visible positions only."""
    def hook(pool: nn.Module, args, out):
        x = args[0]
        vis = visibility_map(state.visible, x.shape[-2:])[:, None].to(x.dtype)
        summed = F.adaptive_avg_pool2d(torch.where(vis > 0, x, torch.zeros((), dtype=x.dtype)), pool.output_size)
        share = F.adaptive_avg_pool2d(vis, pool.output_size)
        return torch.where(share > 0, summed / share.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros((), dtype=x.dtype))
    return hook


def _avg_pool_post(state: _HookState) -> Callable:
    """``nn.AvgPool2d`` recomputed as window sums over the visible positions divided by their number (plus the
    pool's own padding positions when it counts them); outputs in masked units are zero."""
    def hook(pool: nn.Module, args, out):
        if state.per_sample or state.dense:
            return None
        x = args[0]
        vis = visibility_map(state.visible, x.shape[-2:])[:, None].to(x.dtype)
        k, s, p = pool.kernel_size, pool.stride, pool.padding
        def window_sum(t: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(t, k, s, p, pool.ceil_mode, True, divisor_override=1)
        summed = window_sum(torch.where(vis > 0, x, torch.zeros((), dtype=x.dtype)))
        if pool.divisor_override:
            count = torch.full_like(summed[:, :1], float(pool.divisor_override))
        else:
            count = window_sum(vis)
            if pool.count_include_pad:  # its zero padding counts: the window's area minus its cells on the grid
                area = math.prod(nn.modules.utils._pair(k))
                count = count + area - window_sum(torch.ones_like(vis[:1]))
        shown = visibility_map(state.visible, tuple(out.shape[-2:]))[:, None]
        return torch.where(shown, summed / count.clamp_min(1), torch.zeros((), dtype=x.dtype))
    return hook


def _dense_generator_pre(state: _HookState) -> Callable:
    """GC ViT's global-query generator runs densely at every position of its input, which reads zeros at masked
    positions; inside it no other hook changes anything."""
    def hook(module: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[-2:]))[:, None]
        state.dense += 1
        return (torch.where(vis, x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])
    return hook


def _dense_generator_post(state: _HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        state.dense -= 1
    return hook


def _gcvit_block_pre(state: _HookState) -> Callable:
    """GC ViT block: the key mask of its window attention (local or global queries) from timm's own
    ``window_partition`` of the (B, H, W) visibility, added to the logits after the position bias."""
    def hook(block: nn.Module, args):
        x = args[0]
        vis = visibility_map(state.visible, tuple(x.shape[1:3]))[..., None].to(x.dtype)
        wins = gcvit.window_partition(vis, block.window_size)
        keys = wins.reshape(wins.shape[0], 1, 1, -1) > 0.5
        zero = torch.zeros((), dtype=x.dtype)
        state.block_vis[block.attn.rel_pos] = (torch.where(keys, zero, torch.tensor(_neg(x.dtype), dtype=x.dtype)), block)
    return hook


def _gcvit_logits_post(state: _HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        if module not in state.block_vis:
            return None
        return out + state.block_vis.pop(module)[0]
    return hook


# module type -> (hook factory, with kwargs): the per-family knowledge of the oracle
PRE_HOOKS: List[Tuple[Type[nn.Module], Callable, bool]] = [
    (swin.SwinTransformerBlock, _swin_block_pre, False),
    (swin.WindowAttention, _swin_attention_pre, True),
    (swinv2.SwinTransformerV2Block, _swin_block_pre, False),
    (swinv2.WindowAttention, _swin_attention_pre, True),
    (swinv2cr.SwinTransformerV2CrBlock, _swin_block_pre, False),
    (swinv2cr.WindowMultiHeadAttention, _swin_attention_pre, True),
    (nn.Conv2d, _masked_inputs_pre(0.0), False),
    (pvt_v2.Attention, _attention_pre(lambda m: _global_keys), False),
    (timm_layers.Attention, _attention_pre(lambda m: _global_keys), False),
    (eva.EvaAttention, _attention_pre(lambda m: _global_keys), False),
    (twins.GlobalSubSampleAttn, _attention_pre(lambda m: _global_keys), False),
    (twins.LocallyGroupedAttn, _attention_pre(_twins_window_keys), False),
    (davit.WindowAttention, _attention_pre(_davit_window_keys), False),
    (maxxvit.PartitionAttentionCl, _partition_keys_pre, False),
    (maxxvit.PartitionAttention2d, _partition_keys_pre, False),
    (SEModule, _squeeze_excite_pre, False),
    (nest.Attention, _attention_pre(_nest_block_keys), False),
    (nn.MaxPool2d, _masked_inputs_pre(float("-inf")), False),
    (nn.AvgPool2d, _masked_inputs_pre(0.0), False),
    (tv_maxvit.PartitionAttentionLayer, _tv_partition_keys_pre, False),
    (TvSqueezeExcitation, _squeeze_excite_pre, False),
    (gcvit.FeatureBlock, _dense_generator_pre, False),
    (gcvit.GlobalContextVitBlock, _gcvit_block_pre, False),
    (mvitv2.MultiScaleAttention, _mvit_attention_pre, False),
    (mvitv2.MultiScaleAttentionPoolFirst, _mvit_attention_pre, False),
]
POST_HOOKS: List[Tuple[Type[nn.Module], Callable]] = [
    (pvt_v2.Attention, _attention_post),
    (timm_layers.Attention, _attention_post),
    (eva.EvaAttention, _attention_post),
    (twins.GlobalSubSampleAttn, _attention_post),
    (twins.LocallyGroupedAttn, _attention_post),
    (davit.WindowAttention, _attention_post),
    (davit.ChannelAttention, _channel_attention_post),
    (davit.ChannelAttentionV2, _channel_attention_post),
    (focalnet.FocalModulation, _focal_modulation_post),
    (nn.AdaptiveAvgPool2d, _mean_pool_post),
    (GlobalResponseNorm, _grn_post),
    (maxxvit.PartitionAttentionCl, _attention_post),
    (maxxvit.PartitionAttention2d, _attention_post),
    (SEModule, _squeeze_excite_post),
    (nest.Attention, _attention_post),
    (nn.MaxPool2d, _max_pool_post),
    (nn.AvgPool2d, _avg_pool_post),
    (tv_maxvit.PartitionAttentionLayer, _attention_post),
    (TvSqueezeExcitation, _per_sample_post),
    (gcvit.FeatureBlock, _dense_generator_post),
    (RelPosBias, _gcvit_logits_post),
    (mvitv2.MultiScaleAttention, _mvit_attention_post),
    (mvitv2.MultiScaleAttentionPoolFirst, _mvit_attention_post),
]


# modules whose key mask the patched SDPA adds: they must take timm's fused (SDPA) path, whatever
# TIMM_FUSED_ATTN says, or the mask would never be applied
SDPA_MASKED = (pvt_v2.Attention, timm_layers.Attention, eva.EvaAttention, twins.GlobalSubSampleAttn,
               twins.LocallyGroupedAttn, davit.WindowAttention, maxxvit.AttentionCl, maxxvit.Attention2d,
               nest.Attention)


# module-name prefix of a library -> the module of this package that adds that library's families: its
# ``install(model, state)`` context manager hooks them for one forward, its ``feature_tensor(model, module, x)``
# puts a captured stage (module None: the final output) into the layout the oracle reads. Imported only for a
# model holding a module of that library, so that the library stays an optional dependency.
EXTENSIONS: Dict[str, str] = {"transformers.": ".transformers"}


def _extensions(model: nn.Module) -> List[Any]:
    """The ``EXTENSIONS`` modules of the libraries that ``model``'s modules come from."""
    origins = {type(m).__module__ for m in model.modules()}
    return [importlib.import_module(name, __package__) for prefix, name in EXTENSIONS.items()
            if any(origin.startswith(prefix) for origin in origins)]


@contextmanager
def masked_dense_hooks(
    model: nn.Module,
    visible: torch.Tensor,
    img_size: Tuple[int, int],
    key_mask_for: Optional[Callable[[nn.Module], Optional[KeyMaskFn]]] = None,
) -> Iterator[None]:
    """Install the masked-dense hooks on ``model`` for one forward (``key_mask_for``: as in ``dense_masked_reference``)."""
    state = _HookState(visible, img_size)
    handles = []
    sdpa = F.scaled_dot_product_attention
    batch_norm = F.batch_norm
    tv_attention = tv_swin.shifted_window_attention
    softmax = F.softmax
    mvit_rel_pos = mvitv2.cal_rel_pos_type
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
            keys = key_mask_for(mod) if key_mask_for is not None else None
            if keys is not None:
                handles.append(mod.register_forward_pre_hook(_given_keys_pre(state, keys)))
                handles.append(mod.register_forward_hook(_attention_post(state)))
        F.scaled_dot_product_attention = _masked_sdpa(state, sdpa)
        F.batch_norm = _masked_batch_norm(state, batch_norm)
        tv_swin.shifted_window_attention = _tv_shifted_window_attention(state)
        F.softmax = _masked_softmax(state, softmax)
        mvitv2.cal_rel_pos_type = _mvit_rel_pos(state, mvit_rel_pos)
        with ExitStack() as extensions:
            for extension in _extensions(model):
                extensions.enter_context(extension.install(model, state))
            yield
    finally:
        F.scaled_dot_product_attention = sdpa
        F.batch_norm = batch_norm
        tv_swin.shifted_window_attention = tv_attention
        F.softmax = softmax
        mvitv2.cal_rel_pos_type = mvit_rel_pos
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
    raise InvalidInputError(f"the model returned {type(out).__name__}, which holds no tensor, feature_maps or "
                            "last_hidden_state: pass last=[the module whose output is the final features]")


def _grid_tokens(n: int, img_size: Tuple[int, int]) -> bool:
    """Whether ``n`` tokens form a grid of the image at an integer stride."""
    h, w = img_size
    return any(h % s == 0 and w % s == 0 and (h // s) * (w // s) == n for s in range(1, max(h, w) + 1))


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
    if isinstance(model, hiera.Hiera) and stages is None and last is None and not stages_from_output:
        return hiera_reference(model, images, visible)
    fmt = fmt or getattr(model, "output_fmt", "NCHW")
    size = (int(images.shape[-2]), int(images.shape[-1]))
    strides: Optional[List[int]] = None
    if stages_from_output:
        if stages is not None or last is not None:
            raise InvalidInputError("stages_from_output reads the stages and the final features from the model's "
                                    "output: pass no stages= or last=")
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
        _called_module(modules[n]).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, module_tensor(out)))
        for n in hooked
    ]
    try:
        with masked_dense_hooks(model, visible, size, key_mask_for):
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
    extensions = _extensions(model)

    def extended(module: Optional[nn.Module], dense: torch.Tensor) -> torch.Tensor:
        for extension in extensions:
            dense = extension.feature_tensor(model, module, dense)
        return dense

    maps: List[torch.Tensor] = []
    if stages_from_output:
        maps = [extended(None, t) for t in _output_maps(out) or []]
        if not maps:
            raise InvalidInputError(f"stages_from_output: {type(model).__name__} returned {type(out).__name__}, "
                                    "which holds no feature_maps or tuple of tensors")
        final = maps[-1]
    elif last is not None:
        final = extended(modules[last], captured[last])
    else:
        final = extended(None, _output_final(out))

    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)  # timm: class tokens before the grid tokens

    def read(dense: torch.Tensor, stride: Optional[int]) -> VisibleTokens:
        if dense.dim() == 3 and prefix:
            dense = dense[:, prefix:]  # the class token is no grid position: left out, as forward_intermediates does
        elif dense.dim() == 3 and not _grid_tokens(dense.shape[1], size) and _grid_tokens(dense.shape[1] - 1, size):
            dense = dense[:, 1:]  # a class token before the grid (CvT's and PVT's last stage)
        if stride is not None:  # timm's feature_info: its stride and the model's output_fmt, as always
            return dense_to_tokens(dense, visible, stride, fmt, size)
        layout, stride = feature_layout(dense, size, fmt)
        return dense_to_tokens(dense, visible, stride, layout, size)

    if stages_from_output:
        outs = [read(t, None) for t in maps]
    else:
        outs = [read(extended(modules[n], captured[n]), strides[i] if strides else None) for i, n in enumerate(names)]
    timm_last = strides is not None and last is None and hasattr(model, "forward_features")
    return GreenOutput(read(final, strides[-1] if timm_last else None), outs)


def hiera_reference(model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> GreenOutput:
    """Hiera's own masked forward (MAE-style: masked mask units discarded), one sample at a time so that
    samples may keep unequal numbers of units; stage outputs rerolled by its own ``Reroll``.

    Hiera computes only on its visible mask units by construction, so the model itself is the oracle
    when the conversion's mask unit is Hiera's.
    """
    if tuple(visible.shape[1:]) != tuple(model.mask_spatial_shape):
        raise InvalidInputError(f"Hiera masks its own {tuple(model.mask_spatial_shape)} mask units; the mask grid is "
                                f"{tuple(visible.shape[1:])}")
    size = (int(images.shape[-2]), int(images.shape[-1]))
    stage_tokens: List[List[torch.Tensor]] = [[] for _ in model.stage_ends]
    last: List[torch.Tensor] = []
    for i in range(images.shape[0]):
        mask = visible[i].reshape(1, -1)
        final, units = model.forward_intermediates(images[i:i + 1], mask=mask, output_fmt="NHWC")
        for j, rolled in enumerate(units):
            stage_tokens[j].append(_unit_maps_to_tokens(rolled[0], visible[i]))
        last.append(_unit_maps_to_tokens(model.reroll(final, model.stage_ends[-1], mask=mask)[0], visible[i]))

    def tokens(rows: List[torch.Tensor], stage: int) -> VisibleTokens:
        uh, uw = _unit_shape(model, stage)
        grid = (visible.shape[1] * uh, visible.shape[2] * uw)
        return VisibleTokens(torch.cat(rows), Sites.from_mask(visible, grid, size[0] // grid[0]))

    stages = [tokens(rows, j) for j, rows in enumerate(stage_tokens)]
    return GreenOutput(tokens(last, len(stage_tokens) - 1), stages)


def _unit_shape(model: nn.Module, stage: int) -> Tuple[int, int]:
    """Positions per mask unit along each axis at a stage: Hiera's mask unit shrinks by its query stride per stage."""
    _, size = model.reroll.schedule[model.stage_ends[stage]]
    return (size[0] // model.mask_spatial_shape[0], size[1] // model.mask_spatial_shape[1])


def _unit_maps_to_tokens(units: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``(visible units, uh, uw, C)`` maps of one sample's visible units (raster unit order) -> its visible
    positions' rows in raster order of the whole grid."""
    n, uh, uw, c = units.shape
    gh, gw = visible.shape
    canvas = units.new_zeros(gh * gw, uh, uw, c)
    canvas = canvas.index_copy(0, visible.reshape(-1).nonzero().squeeze(1), units)
    dense = canvas.view(gh, gw, uh, uw, c).permute(0, 2, 1, 3, 4).reshape(gh * uh, gw * uw, c)
    vis = visible.repeat_interleave(uh, 0).repeat_interleave(uw, 1)
    return dense[vis]


def _called_module(module: nn.Module) -> nn.Module:
    """The module whose output is a stage's output: a container's last child when it is never called."""
    while isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        module = list(module.children())[-1]
    return module
