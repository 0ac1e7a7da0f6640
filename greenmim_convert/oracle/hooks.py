"""The oracle's machinery: hook state, key masks, the generic masked-dense hooks, and the family registry.

Masked-dense semantics changes three things in a dense forward: every attention removes the keys at masked
positions, every convolution (and pooling) reads masked positions as zeros (as -inf for max pooling), and
per-sample statistics are taken over visible positions. The hooks here do that for what every model shares
(``nn.Conv2d``, pools, ``F.scaled_dot_product_attention``, ``F.softmax``, ``F.batch_norm``); what a family's
modules need beyond it lives in one module per family under ``families/``, registered in ``FAMILY_MODULES`` by
the library module its classes come from, and imported only for a model that holds such a module.
"""

from __future__ import annotations

import importlib
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

PreHook = Tuple[Type[nn.Module], Callable, bool]  # (module class, factory(state) -> hook, hook takes kwargs)
PostHook = Tuple[Type[nn.Module], Callable]


def hidden_logit(dtype: torch.dtype) -> float:
    """A finite additive mask: exp() of it underflows to exactly 0 and sums never overflow."""
    return -0.25 * torch.finfo(dtype).max


def visibility_map(visible: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` bool visibility of a feature map of the given size."""
    b, uh, uw = visible.shape
    h, w = size
    if h % uh or w % uw:
        raise ValueError(f"feature map {size} is not a multiple of the mask grid {(uh, uw)}")
    return visible.repeat_interleave(h // uh, 1).repeat_interleave(w // uw, 2)


class HookState:
    def __init__(self, visible: torch.Tensor, img_size: Tuple[int, int]):
        self.visible = visible
        self.img_size = img_size
        self.block_vis: Dict[nn.Module, Tuple[torch.Tensor, nn.Module]] = {}
        self.key_masks: List[Any] = []  # innermost attention module's key visibility: a function, or GivenKeys
        self.per_sample = 0  # > 0 inside a module whose inner convs act on one value per sample (squeeze-excite)
        self.dense = 0  # > 0 inside a module computed densely at every position (GC ViT's global-query generator)
        self.masked_rel_pos: List[bool] = []  # per MViTv2 attention being run: its keys were masked
        # grid -> ((B, H, W) visibility, stride) of a grid whose cells are picked cells of a finer grid (LeViT's
        # subsampled queries): a cell is visible exactly when the cell it picks is, whatever the mask unit
        self.picked: Dict[Tuple[int, int], Tuple[torch.Tensor, int]] = {}

    def grid_of(self, tokens: int) -> Tuple[int, int]:
        """The feature grid with ``tokens`` cells: a picked grid (``picked``) with that many, else the grid of the
        image at an integer stride."""
        found = next((g for g in self.picked if g[0] * g[1] == tokens), None)
        if found is not None:
            return found
        h, w = self.img_size
        for stride in range(1, max(h, w) + 1):
            if h % stride == 0 and w % stride == 0 and (h // stride) * (w // stride) == tokens:
                return h // stride, w // stride
        raise ValueError(f"{tokens} keys do not form a grid of a {h}x{w} image")

    def grid_visibility(self, grid: Tuple[int, int]) -> torch.Tensor:
        """``(B, H, W)`` bool visibility of a feature grid: a picked grid's recorded one, else the mask units'."""
        grid = (int(grid[0]), int(grid[1]))
        if grid in self.picked:
            return self.picked[grid][0]
        return visibility_map(self.visible, grid)

    def grid_stride(self, grid: Tuple[int, int]) -> int:
        """Pixels per cell of a feature grid: a picked grid's recorded stride, else the image's size over the grid."""
        grid = (int(grid[0]), int(grid[1]))
        return self.picked[grid][1] if grid in self.picked else self.img_size[0] // grid[0]

    def record_pick(self, fine: Tuple[int, int], picked: torch.Tensor, step: int) -> Tuple[int, int]:
        """Record the ``(B, H, W)`` visibility of the cells a module picked, every ``step``-th of the ``fine`` grid's;
        returns the picked grid."""
        grid = (int(picked.shape[1]), int(picked.shape[2]))
        self.picked[grid] = (picked, self.grid_stride(fine) * step)
        return grid


def grid_tokens(n: int, img_size: Tuple[int, int]) -> bool:
    """Whether ``n`` tokens form a grid of the image at an integer stride."""
    h, w = img_size
    return any(h % s == 0 and w % s == 0 and (h // s) * (w // s) == n for s in range(1, max(h, w) + 1))


def global_keys(state: HookState, k: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, N) key visibility of a global attention whose N keys tile the image, or whose last keys tile
    it after a few leading prefix tokens (class, distillation or register tokens: always visible)."""
    n = k.shape[-2]
    prefix = next((p for p in range(n) if grid_tokens(n - p, state.img_size)), None)
    if prefix is None:
        raise ValueError(f"{n} keys do not form a grid of a {state.img_size} image after prefix tokens")
    grid = state.grid_visibility(state.grid_of(n - prefix)).reshape(k.shape[0], -1)
    return torch.cat([grid.new_ones(k.shape[0], prefix), grid], 1).reshape(k.shape[0], 1, 1, -1)


KeyMaskFn = Callable[[Tuple[Any, ...], torch.Tensor], torch.Tensor]


class GivenKeys:
    """Key visibility a ``key_mask_for`` callback computed for one call of an attention module."""

    def __init__(self, vis: torch.Tensor):
        self.vis = vis

    def added_to(self, attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The module's own mask (None, bool: True = attend, or float) plus the key mask, as a float mask."""
        zero = torch.zeros((), dtype=dtype, device=self.vis.device)
        key = torch.where(self.vis, zero, torch.tensor(hidden_logit(dtype), dtype=dtype, device=self.vis.device))
        if attn_mask is None:
            return key
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, zero, torch.tensor(float("-inf"), dtype=dtype, device=zero.device))
        return attn_mask + key


class SoftmaxKeys(GivenKeys):
    """Key visibility added to the logits by the patched ``F.softmax`` (attentions that do not call SDPA)."""


def given_keys_pre(state: "HookState", keys: KeyMaskFn) -> Callable:
    def hook(module: nn.Module, args):
        state.key_masks.append(GivenKeys(keys(args, state.visible)))

    return hook


def attention_pre(keys_for: Callable[[nn.Module], Callable]) -> Callable:
    def factory(state: HookState) -> Callable:
        def hook(module: nn.Module, args):
            state.key_masks.append(keys_for(module))

        return hook

    return factory


def attention_post(state: HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        state.key_masks.pop()

    return hook


def masked_sdpa(state: HookState, sdpa: Callable) -> Callable:
    """SDPA that, inside an attention module the oracle knows, removes the keys at masked positions."""

    def run(q, k, v, attn_mask=None, *args, **kwargs):
        top = state.key_masks[-1] if state.key_masks else None
        if isinstance(top, GivenKeys):
            attn_mask = top.added_to(attn_mask, q.dtype)
        elif top is not None and attn_mask is None:
            vis = top(state, k)
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            attn_mask = torch.where(vis, zero, torch.tensor(hidden_logit(q.dtype), dtype=q.dtype))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    return run


def masked_softmax(state: "HookState", softmax: Callable) -> Callable:
    """``F.softmax`` over attention logits that, inside an attention the oracle knows, removes the masked keys."""

    def run(input, dim=None, *args, **kwargs):
        top = state.key_masks[-1] if state.key_masks else None
        if isinstance(top, SoftmaxKeys):
            input = input + top.added_to(None, input.dtype)
        return softmax(input, dim, *args, **kwargs)

    return run


def masked_batch_norm(state: "HookState", batch_norm: Callable) -> Callable:
    """``F.batch_norm`` whose training-mode statistics are taken over the visible positions of the batch only
    (the sparse BatchNorm of SparK and FCMAE), running statistics updated from them; eval mode is unchanged.

    From the definition: per channel, mean and biased variance over the visible positions normalise;
    the running mean and the unbiased variance are blended in with ``momentum``.
    """

    def run(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if not training or input.dim() != 4 or state.per_sample or state.dense:
            return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        vis = state.grid_visibility(tuple(input.shape[-2:]))[:, None].to(input.dtype)
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


def masked_inputs_pre(fill: float) -> Callable[[HookState], Callable]:
    """A pre-hook giving masked input positions the value ``fill``: 0 for convolutions (masked-dense), -inf for
    max pooling (the maximum over visible positions, as the pool's own padding); off inside per-sample modules."""

    def factory(state: HookState) -> Callable:
        def hook(module: nn.Module, args):
            if state.per_sample or state.dense:
                return None
            x = args[0]
            vis = state.grid_visibility(tuple(x.shape[-2:]))[:, None]
            vis = vis.repeat_interleave(x.shape[0] // vis.shape[0], 0)  # heads folded into the batch, samples major
            return (torch.where(vis, x, torch.tensor(fill, dtype=x.dtype)),) + tuple(args[1:])

        return hook

    return factory


def max_pool_post(state: HookState) -> Callable:
    """Outputs in masked units are not computed: zero, not the -inf of an all-masked window."""

    def hook(pool: nn.Module, args, out):
        if state.dense:
            return None
        vis = state.grid_visibility(tuple(out.shape[-2:]))[:, None]
        return torch.where(vis, out, torch.zeros((), dtype=out.dtype))

    return hook


def mean_pool_post(state: HookState) -> Callable:
    """Adaptive average pooling that averages the visible positions only."""

    def hook(pool: nn.Module, args, out):
        x = args[0]
        vis = state.grid_visibility(x.shape[-2:])[:, None].to(x.dtype)
        summed = F.adaptive_avg_pool2d(torch.where(vis > 0, x, torch.zeros((), dtype=x.dtype)), pool.output_size)
        share = F.adaptive_avg_pool2d(vis, pool.output_size)
        return torch.where(
            share > 0, summed / share.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros((), dtype=x.dtype)
        )

    return hook


def avg_pool_post(state: HookState) -> Callable:
    """``nn.AvgPool2d`` recomputed as window sums over the visible positions divided by their number (plus the
    pool's own padding positions when it counts them); outputs in masked units are zero."""

    def hook(pool: nn.Module, args, out):
        if state.per_sample or state.dense:
            return None
        x = args[0]
        vis = state.grid_visibility(x.shape[-2:])[:, None].to(x.dtype)
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
        shown = state.grid_visibility(tuple(out.shape[-2:]))[:, None]
        return torch.where(shown, summed / count.clamp_min(1), torch.zeros((), dtype=x.dtype))

    return hook


def squeeze_excite_pre(state: HookState) -> Callable:
    def hook(module: nn.Module, args):
        if not state.dense:
            state.per_sample += 1

    return hook


def per_sample_post(state: HookState) -> Callable:
    def hook(module: nn.Module, args, out):
        if not state.dense:
            state.per_sample -= 1

    return hook


@dataclass(frozen=True)
class Family:
    """What one family of modules needs under masked-dense semantics, beyond the generic hooks.

    ``pre`` / ``post``: forward (pre-)hooks by module class; ``fused``: attention classes that must take the fused
    SDPA path (where the patched SDPA adds the key mask); ``install(model, state)``: a context manager for
    anything else (module-level functions replaced for the forward); ``feature_tensor(model, module, x)``: puts a
    captured stage (module None: the final output) into the layout the reference reads.
    """

    pre: Sequence[PreHook] = ()
    post: Sequence[PostHook] = ()
    fused: Tuple[Type[nn.Module], ...] = ()
    install: Optional[Callable[[nn.Module, HookState], ContextManager[None]]] = None
    feature_tensor: Optional[Callable[[nn.Module, Optional[nn.Module], torch.Tensor], torch.Tensor]] = None


GENERIC = Family(
    pre=[
        (nn.Conv2d, masked_inputs_pre(0.0), False),
        (nn.MaxPool2d, masked_inputs_pre(float("-inf")), False),
        (nn.AvgPool2d, masked_inputs_pre(0.0), False),
    ],
    post=[(nn.AdaptiveAvgPool2d, mean_pool_post), (nn.MaxPool2d, max_pool_post), (nn.AvgPool2d, avg_pool_post)],
)

# library module (prefix) of a model's module class -> the oracle module whose ``FAMILY`` handles it
FAMILY_MODULES: Dict[str, str] = {
    "timm.models.swin_transformer": "greenmim_convert.oracle.families.swin",
    "timm.models.swin_transformer_v2": "greenmim_convert.oracle.families.swin",
    "timm.models.swin_transformer_v2_cr": "greenmim_convert.oracle.families.swin",
    "timm.layers.attention": "greenmim_convert.oracle.families.global_attention",
    "timm.models.eva": "greenmim_convert.oracle.families.global_attention",
    "timm.models.pvt_v2": "greenmim_convert.oracle.families.global_attention",
    "timm.models.twins": "greenmim_convert.oracle.families.twins",
    "timm.models.davit": "greenmim_convert.oracle.families.davit",
    "timm.models.focalnet": "greenmim_convert.oracle.families.focalnet",
    "timm.layers.grn": "greenmim_convert.oracle.families.grn",
    "timm.models.maxxvit": "greenmim_convert.oracle.families.maxvit",
    "timm.layers.squeeze_excite": "greenmim_convert.oracle.families.squeeze_excite",
    "timm.models.nest": "greenmim_convert.oracle.families.nest",
    "timm.models.gcvit": "greenmim_convert.oracle.families.gcvit",
    "timm.models.mvitv2": "greenmim_convert.oracle.families.mvit",
    "torchvision.": "greenmim_convert.oracle.families.torchvision",
    "transformers.": "greenmim_convert.oracle.transformers",
}


def replaced(
    owner: Any, name: str, make: Callable[[HookState, Callable], Callable]
) -> Callable[[nn.Module, HookState], Any]:
    """A family's ``install``: ``owner.name`` replaced by ``make(original)`` for the forward, restored after."""

    @contextmanager
    def install(model: nn.Module, state: HookState) -> Iterator[None]:
        original = getattr(owner, name)
        setattr(owner, name, make(state, original))
        try:
            yield
        finally:
            setattr(owner, name, original)

    return install


def families_of(model: nn.Module) -> List[Family]:
    """The generic family, then the registered families of the libraries ``model``'s modules come from."""
    origins = {type(m).__module__ for m in model.modules()}
    names = sorted(
        {
            mod
            for prefix, mod in FAMILY_MODULES.items()
            if any(o == prefix or o.startswith(prefix if prefix.endswith(".") else prefix + ".") for o in origins)
        }
    )
    return [GENERIC] + [importlib.import_module(name).FAMILY for name in names]


@contextmanager
def masked_dense_hooks(
    model: nn.Module,
    visible: torch.Tensor,
    img_size: Tuple[int, int],
    key_mask_for: Optional[Callable[[nn.Module], Optional[KeyMaskFn]]] = None,
) -> Iterator[HookState]:
    """Install the masked-dense hooks on ``model`` for one forward (``key_mask_for``: as in
    ``dense_masked_reference``), yielding their state; every hook and patched function is restored on exit."""
    state = HookState(visible, img_size)
    families = families_of(model)
    fused_classes = tuple(c for fam in families for c in fam.fused)
    handles = []
    sdpa, batch_norm, softmax = F.scaled_dot_product_attention, F.batch_norm, F.softmax
    fused = {
        mod: mod.fused_attn
        for mod in model.modules()
        if fused_classes and isinstance(mod, fused_classes) and hasattr(mod, "fused_attn")
    }
    try:
        for mod in fused:
            mod.fused_attn = True
        for mod in model.modules():
            for fam in families:
                for cls, factory, with_kwargs in fam.pre:
                    if isinstance(mod, cls):
                        handles.append(mod.register_forward_pre_hook(factory(state), with_kwargs=with_kwargs))
                for cls, factory in fam.post:
                    if isinstance(mod, cls):
                        handles.append(mod.register_forward_hook(factory(state)))
            keys = key_mask_for(mod) if key_mask_for is not None else None
            if keys is not None:
                handles.append(mod.register_forward_pre_hook(given_keys_pre(state, keys)))
                handles.append(mod.register_forward_hook(attention_post(state)))
        F.scaled_dot_product_attention = masked_sdpa(state, sdpa)
        F.batch_norm = masked_batch_norm(state, batch_norm)
        F.softmax = masked_softmax(state, softmax)
        with ExitStack() as installed:
            for fam in families:
                if fam.install is not None:
                    installed.enter_context(fam.install(model, state))
            yield state
    finally:
        F.scaled_dot_product_attention, F.batch_norm, F.softmax = sdpa, batch_norm, softmax
        for mod, flag in fused.items():
            mod.fused_attn = flag
        for h in handles:
            h.remove()


def feature_tensor(
    families: Sequence[Family], model: nn.Module, module: Optional[nn.Module], x: torch.Tensor
) -> torch.Tensor:
    """A captured stage (``module`` None: the final output) through the ``feature_tensor`` of every family of
    ``families`` (``families_of(model)``, found once per forward)."""
    for fam in families:
        if fam.feature_tensor is not None:
            x = fam.feature_tensor(model, module, x)
    return x
