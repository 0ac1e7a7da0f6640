"""Patch embedding: a Conv2d with kernel == stride on the image runs only on visible patches."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from greenmim_convert import ops
from greenmim_convert.layout import Layout

from .base import GreenPass, context_of, module_ref, replace_with_call, sites_node


def _image_conv(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Conv2d]:
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if not node.args[0].meta.get("image"):
        return None
    mod = gm.get_submodule(node.target)
    return mod if isinstance(mod, nn.Conv2d) else None


def is_patchify(conv: nn.Conv2d) -> bool:
    """Kernel == stride, no padding, no dilation, no groups: each output reads one patch."""
    return (
        tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def layout_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Layout]:
    conv = _image_conv(gm, node)
    if conv is None or not is_patchify(conv):
        return None
    ctx = context_of(gm)
    ph, pw = conv.kernel_size
    if ph != pw:
        return None
    grid = (ctx.img_size[0] // ph, ctx.img_size[1] // pw)
    return Layout.nchw(ctx.trace_batch, grid, conv.out_channels, ph)


class PatchEmbedPass(GreenPass):
    name = "patch-embed"
    description = "kernel == stride convolutions on the image become per-patch linears on visible patches"

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        for node in list(gm.graph.nodes):
            conv = _image_conv(gm, node)
            if conv is None or not is_patchify(conv) or "layout" not in node.meta:
                continue
            sites = sites_node(gm, node.meta["layout"])
            ref = module_ref(gm, node.target, node)
            replace_with_call(gm, node, ops.patch_embed, (ctx.images, sites, ref))
            self.report[type(conv).__name__] += 1
        gm.recompile()
