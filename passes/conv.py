"""Convolutions -> convolutions over the visible sites (masked-dense semantics).

A Conv2d on a packed NCHW layout reads zeros at masked input positions and is evaluated at the
visible sites of its output grid. A 1x1 convolution is a Linear on every token (or per-sample
value). Kernel == stride convolutions (no padding or dilation, groups 1) never straddle a mask unit,
so they become a per-unit gather + linear with no neighbour map; every other geometry (depthwise,
overlapping, strided, dilated) runs ``kernels.sparse_conv``. A conv on the image itself that is not a patchify conv (e.g. PVT v2's overlapping 7x7 stride-4 embedding) reads
the visible pixels as packed sites. The original weight and bias Parameters are used.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from greenmim_convert import ops
from greenmim_convert.kernels.sparse_conv import conv_output_grid
from greenmim_convert.layout import Layout, LayoutError

from .base import GreenPass, context_of, layout_of, module_ref, replace_with_call, sites_node
from .patch_embed import is_patchify


def _conv(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Conv2d]:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    return mod if type(mod) is nn.Conv2d else None


def _is_nchw(lay: Layout) -> bool:
    kinds = [[a.kind for a in ax] for ax in lay.axes]
    return kinds == [["b"], ["c"], ["h"], ["w"]] and lay.offset == (0, 0) and all(
        a.inner == 1 for ax in lay.axes for a in ax
    ) and lay.shape[2:] == lay.grid


def is_pointwise(conv: nn.Conv2d) -> bool:
    """1x1, stride 1, no padding, one group: a Linear over the channels of every position."""
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid") and conv.groups == 1


def _image_layout(gm: fx.GraphModule) -> Layout:
    ctx = context_of(gm)
    return Layout.nchw(ctx.trace_batch, ctx.img_size, 3, 1)


def _output_layout(conv: nn.Conv2d, lay: Layout) -> Layout:
    if conv.padding_mode != "zeros":
        raise LayoutError(f"padding_mode={conv.padding_mode!r}: only zero padding has masked-dense semantics")
    sh, sw = conv.stride
    if sh != sw:
        raise LayoutError(f"anisotropic stride {conv.stride}")
    grid = conv_output_grid(lay.grid, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if sh > 1 and (lay.grid[0] != grid[0] * sh or lay.grid[1] != grid[1] * sw):
        raise LayoutError(f"strided conv from grid {lay.grid} to {grid} does not keep the grid aligned")
    return Layout.nchw(lay.axes[0][0].size if lay.axes[0] else 1, grid, conv.out_channels, lay.stride * sh)


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    conv = _conv(gm, node)
    if conv is None:
        return None
    src = node.args[0]
    if isinstance(src, fx.Node) and src.meta.get("image"):
        if is_patchify(conv):
            return None  # the patch-embed rule owns it
        return _output_layout(conv, _image_layout(gm))
    lay = layout_of(src)
    if lay is None:
        return None
    if is_pointwise(conv) and lay.channel_axis() == 1 and len(lay.axes) == 4:
        return lay.with_channels(conv.out_channels)
    if not _is_nchw(lay):
        raise LayoutError(f"convolution input is not an NCHW feature map (layout {lay.shape})")
    return _output_layout(conv, lay)


class ConvPass(GreenPass):
    name = "conv"
    description = "convolutions -> per-unit linears (kernel == stride) or sparse convolutions on visible sites"

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        for node in list(gm.graph.nodes):
            conv = _conv(gm, node)
            if conv is None or "layout" not in node.meta:
                continue
            src = node.args[0]
            ref = module_ref(gm, node.target, node)
            if is_pointwise(conv) and not src.meta.get("image"):
                replace_with_call(gm, node, ops.pointwise_conv, (src, ref))
                self.report["pointwise linear 1x1"] += 1
                continue
            out_lay = node.meta["layout"]
            out_sites = sites_node(gm, out_lay)
            if isinstance(src, fx.Node) and src.meta.get("image"):
                pixels = sites_node(gm, _image_layout(gm))
                args, fn, kind = (ctx.images, pixels, out_sites, ref), ops.image_sparse_conv, "image sparse conv"
            elif is_patchify(conv):
                in_sites = sites_node(gm, layout_of(src))
                args, fn, kind = (src, in_sites, out_sites, ref), ops.conv_per_unit, "per-unit linear"
            else:
                in_sites = sites_node(gm, layout_of(src))
                args, fn, kind = (src, in_sites, out_sites, ref), ops.sparse_conv, "sparse conv"
            replace_with_call(gm, node, fn, args)
            depthwise = conv.groups == conv.in_channels and conv.groups > 1
            self.report[f"{kind}{' (depthwise)' if depthwise else ''} {conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]}"] += 1
        gm.recompile()
