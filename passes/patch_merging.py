"""Patch merging: gather low spatial digits into channels on the coarser grid.

Swin's PatchMerging reshapes (B, H, W, C) into (B, H/2, W/2, 4C) by views and permutes, then
normalises and projects. The token-wise rule notices that the normalised axis holds spatial digits
and plans a space-to-depth; this pass inserts the gather of the 2x2 (or any) neighbourhood of
every visible coarse site, in exactly the order the dense views produce.
"""
from __future__ import annotations

import torch.fx as fx

from greenmim_convert import ops

from .base import GreenPass, sites_node


class PatchMergingPass(GreenPass):
    name = "patch-merging"
    description = "space-to-depth views -> neighbour gather onto the coarser grid of visible sites"

    def run(self, gm: fx.GraphModule) -> None:
        done = {}
        for node in list(gm.graph.nodes):
            plan = node.meta.get("space_to_depth")
            if plan is None:
                continue
            fine_lay, coarse_lay, factor, features = plan
            src = node.args[0]
            if src not in done:
                offsets = []
                for dh, dw, _ in features:
                    if (dh, dw) not in offsets:
                        offsets.append((dh, dw))
                order = [offsets.index((dh, dw)) * fine_lay.channels + c for dh, dw, c in features]
                index = None if order == list(range(len(order))) else tuple(order)
                fine, coarse = sites_node(gm, fine_lay), sites_node(gm, coarse_lay)
                with gm.graph.inserting_after(src):
                    done[src] = gm.graph.call_function(ops.space_to_depth, (src, fine, coarse, factor, offsets, index))
                done[src].meta["layout"] = coarse_lay
                self.report[f"space-to-depth {factor[0]}x{factor[1]}"] += 1
            node.replace_input_with(src, done[src])
        gm.recompile()
