"""Convolutions (``aten.conv2d``) -> convolutions over the visible sites (masked-dense semantics).

A conv reads zeros at masked input positions and is evaluated at the visible sites of its output
grid. On the image, a kernel == stride conv (patch embedding) reads only visible patches; any other
image conv (an overlapping stem) reads the visible pixels as sites. On features, a 1x1 conv is a
Linear on every token; a kernel == stride conv never straddles a mask unit and becomes a per-unit
gather + GEMM; every other geometry (depthwise, overlapping, strided, dilated) runs
``kernels.sparse_conv``; a depthwise conv whose batch axis holds heads (channel digits folded into the
batch) is one depthwise conv over every packed column, its filters repeated per head. The original weight and bias
Parameters are read by the new ops.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, peek
from greenmim_convert.compiler.layout import Atom, Layout, LayoutError
from greenmim_convert.kernels.sparse_conv import conv_output_grid
from greenmim_convert.runtime import ops

from . import rules
from .base import GreenPass, args_of, aten, context_of, is_op, layout_of, replace_with_call, shape_of, sites_node
from .layout_ops import with_absorbed_pad


def _pair(v) -> Tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def conv_args(node: fx.Node) -> dict:
    """kernel, stride, padding, dilation and groups of an ``aten.conv2d`` node; a zero pad feeding it
    (``absorbed_pad``) joins its padding as ``(top, bottom, left, right)``."""
    a = args_of(node)
    shape = shape_of(a["weight"])
    pad = a["padding"]
    if isinstance(pad, str):
        if peek(a["input"]).absorbed_pad is not None:
            raise LayoutError(f"a zero pad before a convolution with padding={pad!r}")
    else:
        pad = with_absorbed_pad(a["input"], _pair(pad))
    return dict(
        out_channels=shape[0],
        kernel=(shape[2], shape[3]),
        stride=_pair(a["stride"]),
        padding=pad,
        dilation=_pair(a["dilation"]),
        groups=int(a["groups"]),
        weight=a["weight"],
        bias=a["bias"],
    )


def is_patchify(c: dict) -> bool:
    """Kernel == stride, no padding, no dilation, one group: each output reads one patch."""
    return (
        c["kernel"] == c["stride"]
        and c["padding"] in ((0, 0), "valid")
        and c["dilation"] == (1, 1)
        and c["groups"] == 1
    )


def is_pointwise(c: dict) -> bool:
    """1x1, stride 1, no padding, one group: a Linear over the channels of every position."""
    return (
        c["kernel"] == (1, 1)
        and c["stride"] == (1, 1)
        and c["padding"] in ((0, 0), "valid", "same")
        and c["groups"] == 1
    )


def is_nchw(lay: Layout) -> bool:
    kinds = [[a.kind for a in ax] for ax in lay.axes]
    return (
        kinds == [["b"], ["c"], ["h"], ["w"]]
        and lay.offset == (0, 0)
        and all(a.inner == 1 for ax in lay.axes for a in ax)
        and lay.shape[2:] == lay.grid
    )


def folded_heads(lay: Layout) -> Optional[Tuple[Atom, ...]]:
    """Channel digits folded into the batch axis of an otherwise NCHW map (MViTv2 pools q, k and v with heads
    folded into the batch), or None when the layout is not such a map."""
    first = lay.axes[0] if lay.axes else ()
    if len(first) < 2 or first[0].kind != "b" or any(a.kind != "c" for a in first[1:]) or len(lay.axes) != 4:
        return None
    rest = lay.axes[1:]
    if [[a.kind for a in ax] for ax in rest] != [["c"], ["h"], ["w"]] or lay.offset != (0, 0):
        return None
    if any(a.inner != 1 for ax in rest[1:] for a in ax) or lay.shape[2:] != lay.grid:
        return None
    return first[1:]


def folded_channel_index(lay: Layout) -> Tuple[int, ...]:
    """For every packed column of a map with heads folded into its batch, the conv channel it holds."""
    conv_atom = lay.axes[1][0]
    index = torch.zeros(1, dtype=torch.long)
    for a in lay.channel_atoms():
        digit = torch.arange(a.size) * (1 if a == conv_atom else 0)
        index = (index[:, None] * (a.size if a == conv_atom else 1) + digit).reshape(-1)
    return tuple(index.tolist())


def image_layout(gm: fx.GraphModule) -> Layout:
    ctx = context_of(gm)
    return Layout.nchw(ctx.trace_batch, ctx.img_size, ctx.channels, 1)


def _output_layout(c: dict, lay: Layout) -> Layout:
    sh, sw = c["stride"]
    if sh != sw:
        raise LayoutError(f"anisotropic stride {c['stride']}")
    grid = conv_output_grid(lay.grid, c["kernel"], c["stride"], c["padding"], c["dilation"])
    if sh > 1 and (lay.grid[0] != grid[0] * sh or lay.grid[1] != grid[1] * sw):
        raise LayoutError(f"strided conv from grid {lay.grid} to {grid} does not keep the grid aligned")
    return Layout.nchw(lay.axes[0][0].size if lay.axes[0] else 1, grid, c["out_channels"], lay.stride * sh)


@rules.layout("conv", priority=50)
def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    if not is_op(node, aten.conv2d):
        return None
    src = node.args[0]
    c = conv_args(node)
    if layout_of(c["weight"]) is not None:
        raise LayoutError("convolution whose weight is computed from the images")
    if peek(src).image:
        if is_patchify(c):
            ph, pw = c["kernel"]
            size = context_of(gm).img_size
            if ph != pw or size[0] % ph or size[1] % pw:
                raise LayoutError(f"patch embedding {c['kernel']} does not tile the image {size}")
            return Layout.nchw(context_of(gm).trace_batch, (size[0] // ph, size[1] // pw), c["out_channels"], ph)
        return _output_layout(c, image_layout(gm))
    lay = layout_of(src)
    if lay is None:
        return None
    if is_pointwise(c) and lay.channel_axis() == 1 and len(lay.axes) == 4:
        return lay.with_channels(c["out_channels"])
    if folded_heads(lay) is not None:
        return _folded_output_layout(c, lay)
    if not is_nchw(lay):
        raise LayoutError(f"convolution input is not an NCHW feature map (layout {lay.shape})")
    return _output_layout(c, lay)


def _folded_output_layout(c: dict, lay: Layout) -> Layout:
    """A depthwise conv on a map whose batch axis holds heads: the same conv on every head's channels."""
    chans = lay.axes[1][0].size
    if not (c["groups"] == chans == c["out_channels"]):
        raise LayoutError(
            "a convolution over a batch axis holding channels that is not depthwise (one filter per channel)"
        )
    out = _output_layout(c, Layout.nchw(1, lay.grid, chans, lay.stride))
    h, w = out.grid
    return Layout((lay.axes[0], lay.axes[1], (Atom("h", h),), (Atom("w", w),)), out.grid, out.stride)


class ConvPass(GreenPass):
    name = "conv"
    description = "convolutions -> patch linears, per-unit linears or sparse convolutions on visible sites"
    requires = frozenset({Property.LAYOUTS, Property.OUTPUTS})
    ensures = frozenset({Property.CONVS})

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.conv2d) or layout_of(node) is None:
                continue
            src, c = node.args[0], conv_args(node)
            w, b = c["weight"], c["bias"]
            out_sites = sites_node(gm, layout_of(node))
            on_image = peek(src).image
            if on_image and is_patchify(c):
                args, fn, kind = (ctx.images, out_sites, w, b), ops.patch_embed, "patch embedding"
            elif on_image:
                pixels = sites_node(gm, image_layout(gm))
                args = (ctx.images, pixels, out_sites, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
                fn, kind = ops.image_sparse_conv, "image sparse conv"
            elif is_pointwise(c):
                args, fn, kind = (src, w, b), ops.pointwise_conv, "pointwise linear"
            elif is_patchify(c):
                args, fn, kind = (
                    (src, sites_node(gm, layout_of(src)), out_sites, w, b),
                    ops.conv_per_unit,
                    "per-unit linear",
                )
            elif folded_heads(layout_of(src)) is not None:
                index = folded_channel_index(layout_of(src))
                args = (
                    src,
                    sites_node(gm, layout_of(src)),
                    out_sites,
                    w,
                    b,
                    index,
                    c["stride"],
                    c["padding"],
                    c["dilation"],
                )
                fn, kind = ops.folded_depthwise_conv, "sparse conv, heads in the batch"
            else:
                in_sites = sites_node(gm, layout_of(src))
                args = (src, in_sites, out_sites, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
                fn, kind = ops.sparse_conv, "sparse conv"
            replace_with_call(gm, node, fn, args)
            depthwise = c["groups"] > 1 and c["groups"] == shape_of(w)[0]
            self.report[
                f"{kind}{' (depthwise)' if depthwise else ''} {c['kernel'][0]}x{c['kernel'][1]}/{c['stride'][0]}"
            ] += 1
