"""FLOP counting that holds for grouped convolutions, and the visible-only ideal a converted model is measured against.

``torch.utils.flop_counter.FlopCounterMode`` (torch 2.14) counts the weight gradient of
``aten.convolution_backward`` as a dense convolution over all input channels, ignoring ``groups``:
a depthwise convolution's backward is overcounted C-fold (dense ConvNeXt-T forward+backward shows
~415 G in ``convolution_backward`` against 4.7 G in ``convolution``). It also has no formula for the
CPU flash-attention kernel that ``F.scaled_dot_product_attention`` runs on the CPU, so fused
attention counts zero, nor for ``addcmul`` (the multiply-add of the plain-autograd sparse depthwise
convolution) and the depthwise gather's own ops (``greenmim_kernels::depthwise_taps`` and its backward).
:func:`flop_counter` is a ``FlopCounterMode`` given correct formulas for
these through its ``custom_mapping`` hook. Like torch, a multiply-add counts 2 FLOPs and bias,
padding and element-wise work are not counted.

:func:`visible_only_ideal` estimates, from the DENSE model only, the FLOPs of a perfect
visible-only implementation, so that the converted model's count can be compared with it.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from math import prod
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from greenmim_convert.kernels import depthwise_gather

aten = torch.ops.aten
Shape = Sequence[int]
# a key whose logit is this far below its row's maximum is absent, as the converter treats constant terms <= -50
SEPARATE_BELOW = -50.0


def conv_forward_flops(
    x_shape: Shape, w_shape: Shape, out_shape: Shape, transposed: bool = False, groups: int = 1
) -> int:
    """FLOPs of a (grouped, possibly transposed) convolution: 2 per multiply-add of every output with its kernel taps.

    Non-transposed: ``2 * N * C_out * prod(out spatial) * (C_in / groups) * prod(kernel)``; the weight is
    ``(C_out, C_in / groups, *kernel)``. Transposed: ``2 * N * C_in * prod(in spatial) * (C_out / groups) *
    prod(kernel)``;
    the weight is ``(C_in, C_out / groups, *kernel)``.
    """
    n, c_in = x_shape[0], x_shape[1]
    lead, per_group, *kernel = w_shape
    if transposed:
        if lead != c_in:
            raise ValueError(f"transposed conv weight {tuple(w_shape)} does not match input {tuple(x_shape)}")
        return 2 * n * c_in * prod(x_shape[2:]) * per_group * prod(kernel)
    if per_group * groups != c_in:
        raise ValueError(f"conv weight {tuple(w_shape)} with groups={groups} does not match input {tuple(x_shape)}")
    return 2 * n * lead * prod(out_shape[2:]) * per_group * prod(kernel)


def conv_flop(
    x_shape: Shape,
    w_shape: Shape,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any = None,
    groups: int = 1,
    *args: Any,
    out_shape: Shape,
    **kwargs: Any,
) -> int:
    """``aten.convolution`` / ``aten._convolution``: :func:`conv_forward_flops`."""
    return conv_forward_flops(x_shape, w_shape, out_shape, bool(transposed), int(groups))


def conv_backward_flop(
    grad_out_shape: Shape,
    x_shape: Shape,
    w_shape: Shape,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    groups: int,
    output_mask: Sequence[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """``aten.convolution_backward``: each requested gradient (input, weight) costs what the forward costs.

    Every multiply-add ``out += x * w`` of the forward becomes one of ``grad_x += grad_out * w`` and one of
    ``grad_w += grad_out * x``, within its group; the bias gradient is a sum and is not counted.
    """
    fwd = conv_forward_flops(x_shape, w_shape, grad_out_shape, bool(transposed), int(groups))
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _attention_sizes(q: Shape, k: Shape, v: Shape) -> Tuple[int, int, int, int, int]:
    """(batch x query heads, queries, keys, q/k dim, v dim) of an SDPA call with any number of leading dims."""
    return prod(q[:-2]), q[-2], k[-2], q[-1], v[-1]


def sdpa_cpu_flop(
    q_shape: Shape, k_shape: Shape, v_shape: Shape, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """CPU flash attention forward: ``q @ k^T`` and ``p @ v``."""
    bh, lq, lk, d, dv = _attention_sizes(q_shape, k_shape, v_shape)
    return 2 * bh * lq * lk * (d + dv)


def sdpa_cpu_backward_flop(
    _grad_out: Shape, q_shape: Shape, k_shape: Shape, v_shape: Shape, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """CPU flash attention backward: ``dv = p^T do``, ``dp = do v^T``, ``dq = ds k``, ``dk = ds^T q``."""
    bh, lq, lk, d, dv = _attention_sizes(q_shape, k_shape, v_shape)
    return 2 * bh * lq * lk * (2 * d + 2 * dv)


def addcmul_flop(_input: Any, tensor1: Any, tensor2: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``aten.addcmul`` (the sparse depthwise convolution's multiply-add per tap): 2 per output element, and
    2 more per output element for the gradient of each factor that requires one; integer index arithmetic is free.

    The gradients are element-wise products and sums that no formula sees, so they are counted here, at the
    forward, as for a convolution (each multiply-add of the forward is one of every requested gradient).
    """
    if not out_val.is_floating_point():
        return 0  # index arithmetic
    factors = (tensor1, tensor2) if torch.is_grad_enabled() else ()
    grads = sum(1 for t in factors if isinstance(t, torch.Tensor) and t.requires_grad)
    return 2 * out_val.numel() * (1 + grads)


addcmul_flop._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes tensors, not shapes

FLOP_FORMULAS: Dict[Any, Callable[..., int]] = {
    aten.convolution: conv_flop,
    aten._convolution: conv_flop,
    aten.convolution_backward: conv_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flop,
    aten.addcmul: addcmul_flop,
    torch.ops.greenmim_kernels.depthwise_taps: depthwise_gather.depthwise_taps_flop,
    torch.ops.greenmim_kernels.depthwise_taps_backward: depthwise_gather.depthwise_taps_backward_flop,
}

# ops whose FLOPs are products of token pairs when they compute attention (else token contractions)
PAIR_OPS: Set[Any] = {
    aten.bmm,
    aten.baddbmm,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_efficient_attention_backward,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_cudnn_attention_backward,
    aten._flash_attention_forward,
    aten._flash_attention_backward,
    aten._efficient_attention_forward,
    aten._efficient_attention_backward,
}


def flop_counter(display: bool = False, **kwargs: Any) -> FlopCounterMode:
    """A ``FlopCounterMode`` with :data:`FLOP_FORMULAS` (grouped conv backward, CPU flash attention, addcmul)."""
    return FlopCounterMode(display=display, custom_mapping=dict(FLOP_FORMULAS), **kwargs)


def count_flops(fn: Callable[[], Any]) -> Dict[Any, int]:
    """FLOPs per op (``OpOverloadPacket``) of running ``fn`` under :func:`flop_counter`."""
    with flop_counter() as fc:
        fn()
    return dict(fc.get_flop_counts().get("Global", {}))


# ------------------------------------------------------------------------------------ visible-only ideal


def _tensors(tree: Any) -> List[torch.Tensor]:
    """The tensors in a pytree of op arguments or results."""
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


TAG = "_greenmim_pair_tags"
# ops that mix channels: their outputs are new values, not the attention's logits or probabilities
MIXING_OPS: Set[Any] = {aten.mm, aten.addmm, aten.convolution, aten._convolution}


class _PairProbe(TorchDispatchMode):
    """Follows the dense model's forward and finds its attention: a softmax over a batched product ``q @ k^T``,
    the product consuming its probabilities (``p @ v``), and the visible (query, key) pairs of each softmax.

    Values are followed by tensor object (a tag attribute, so reused memory never carries a stale tag): a
    ``bmm`` output is tagged with that ``bmm``; an op that does not mix channels (views, element-wise ops,
    copies) passes the tags of its inputs to its outputs; a softmax links the ``bmm`` tags of its input (its
    logits) to itself and tags its output with itself, so the ``bmm`` that reads the probabilities is linked to
    it too. Under the oracle's hooks a masked key's logit is at most ``_threshold``, so the softmax input tells
    which keys of each row are visible.
    """

    def __init__(self, visible: torch.Tensor):
        super().__init__()
        self.batch = visible.shape[0]
        self.sample_fraction = visible.flatten(1).to(torch.float64).mean(1)
        self.bmm_flops: List[int] = []
        self.bmm_softmax: Dict[int, int] = {}
        self.softmax_pairs: List[Tuple[float, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        inputs = frozenset().union(*(getattr(t, TAG, frozenset()) for t in _tensors((args, kwargs))))
        if packet in (aten.bmm, aten.baddbmm):
            a, b = (args[1], args[2]) if packet is aten.baddbmm else (args[0], args[1])
            index = len(self.bmm_flops)
            self.bmm_flops.append(2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
            for tag in inputs:
                if tag[0] == "softmax":
                    self.bmm_softmax[index] = tag[1]
            new = frozenset({("bmm", index)})
        elif packet in (aten._softmax, aten._safe_softmax):
            logits, dim = args[0], args[1]
            pairs = (
                self._pairs(logits) if dim % logits.dim() == logits.dim() - 1 and self._is_attention(logits) else None
            )
            if pairs is None:
                new = inputs
            else:
                sid = len(self.softmax_pairs)
                self.softmax_pairs.append(pairs)
                for tag in inputs:
                    if tag[0] == "bmm":
                        self.bmm_softmax[tag[1]] = sid
                new = frozenset({("softmax", sid)})
        else:
            new = frozenset() if packet in MIXING_OPS else inputs
        for t in _tensors(out):
            if new:
                setattr(t, TAG, new)
            elif hasattr(t, TAG):
                delattr(t, TAG)
        return out

    @staticmethod
    def _threshold(dtype: torch.dtype) -> float:
        """Logits at or below this are masked keys (the oracle adds ``-finfo.max / 4``; a module's own -inf counts
        too)."""
        return -0.125 * torch.finfo(dtype).max

    def _is_attention(self, logits: torch.Tensor) -> bool:
        """A softmax over keys some of which the oracle masked."""
        return logits.is_floating_point() and bool((logits <= self._threshold(logits.dtype)).any())

    def _pairs(self, logits: torch.Tensor) -> Optional[Tuple[float, int]]:
        """(visible query x visible key pairs, all pairs) of one attention softmax.

        Keys: not masked in the row, and not more than 50 below the row's largest unmasked logit (a constant
        region mask, such as the -100 between the regions of a shifted window, which the converter treats as
        keys of another window). Queries: with as many queries as keys (self-attention in windows or over a
        sample) row ``i`` and key ``i`` are one position, so the diagonal says which rows are visible; otherwise
        (keys on a reduced grid) the rows are the positions of a sample, the batch outermost, and a sample's
        visible fraction of rows is its fraction of visible positions. None (with a warning: the attention then
        counts as token-wise work) when neither holds.
        """
        live = logits > self._threshold(logits.dtype)
        top = torch.where(live, logits, torch.full((), float("-inf"), dtype=logits.dtype)).amax(-1, keepdim=True)
        live &= logits - top > SEPARATE_BELOW
        keys = live.sum(-1).to(torch.float64)
        if logits.shape[-1] == logits.shape[-2]:
            needed = float((keys * live.diagonal(dim1=-2, dim2=-1)).sum())
        elif logits.shape[0] == self.batch:
            needed = float((keys.reshape(self.batch, -1).sum(1) * self.sample_fraction).sum())
        else:
            warnings.warn(
                f"cannot tell the queries of attention logits {tuple(logits.shape)} apart by sample: "
                "their products count as token-wise work in the visible-only ideal",
                stacklevel=2,
            )
            return None
        return needed, logits.numel()

    def pair_fraction(self, rho: float) -> float:
        """FLOP-weighted fraction of the batched products' work an ideal model does: visible pairs / pairs for the
        products of an attention, ``rho`` for any other batched product (a contraction over tokens)."""
        total = sum(self.bmm_flops)
        if not total:
            return rho
        frac = {sid: needed / allp for sid, (needed, allp) in enumerate(self.softmax_pairs)}
        done = sum(f * frac.get(self.bmm_softmax.get(i, -1), rho) for i, f in enumerate(self.bmm_flops))
        return done / total


def attention_pair_fraction(
    model: nn.Module,
    images: torch.Tensor,
    visible: torch.Tensor,
    forward: Callable[[], Any],
    img_size: Tuple[int, int],
    key_mask_for: Optional[Callable] = None,
) -> float:
    """:meth:`_PairProbe.pair_fraction` of one no-grad forward ``forward()`` of ``model`` under the oracle's hooks.

    The math SDPA backend is forced, so fused attention shows its products and softmax. The model's buffers
    (training-mode BatchNorm statistics) and the global random state are restored afterwards.
    ``key_mask_for``: as in ``dense_masked_reference``, for attention the oracle does not know.
    """
    from greenmim_convert.oracle.reference import masked_dense_hooks

    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    probe = _PairProbe(visible)
    try:
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []), torch.no_grad():
            with masked_dense_hooks(model, visible, img_size, key_mask_for), sdpa_kernel(SDPBackend.MATH), probe:
                forward()
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        for t in list(model.parameters()) + list(model.buffers()):
            if hasattr(t, TAG):
                delattr(t, TAG)
    return probe.pair_fraction(visible_fraction(visible))


def visible_fraction(visible: torch.Tensor) -> float:
    """Visible units over all units of a ``(B, gh, gw)`` mask (exactly, as a Python float)."""
    return int(visible.sum()) / visible.numel()


def visible_only_ideal(dense_counts: Dict[Any, int], rho: float, pair_fraction: float) -> int:
    """The FLOPs of an ideal visible-only model, from the dense model's FLOPs per op.

    - Token-wise work (``mm``/``addmm`` of Linear layers, convolutions and their backward) scales with the
      visible fraction of positions ``rho`` (:func:`visible_fraction`): the mask unit is a multiple of every stride,
      so every
      stage grid has that fraction of visible positions, and an ideal convolution is evaluated at the visible
      output sites only (all its taps, masked inputs reading zero, as a submanifold convolution).
    - Batched products and fused attention (:data:`PAIR_OPS`) scale with ``pair_fraction``
      (:func:`attention_pair_fraction`): an attention needs only the (visible query, visible key) pairs of each
      window or sample — sum over windows of ``v_w^2`` against ``n_w^2`` — and any other batched product
      contracts over tokens, so it scales as token-wise work. The forward's fraction is applied to the
      backward's products too (each attention product's gradients are products over the same pairs).

    Limits: per-sample work on pooled values (squeeze-excite's 1x1 convs, a classifier head) is scaled as
    token-wise work although it does not shrink; attention the oracle does not know (no masked keys in its
    softmax) counts as token-wise work.
    """
    pairs = sum(v for k, v in dense_counts.items() if k in PAIR_OPS)
    tokenwise = sum(dense_counts.values()) - pairs
    return int(round(rho * tokenwise + pair_fraction * pairs))


def split_counts(counts: Dict[Any, int]) -> Dict[str, int]:
    """FLOPs grouped as ``pairs`` (:data:`PAIR_OPS`) and ``tokenwise`` (the rest)."""
    out: Dict[str, int] = defaultdict(int)
    for k, v in counts.items():
        out["pairs" if k in PAIR_OPS else "tokenwise"] += v
    return dict(out)
