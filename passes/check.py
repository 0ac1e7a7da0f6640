"""Final check: nothing dense is left on the path from the images to the outputs."""
from __future__ import annotations

import torch.fx as fx

from greenmim_convert.runtime import is_runtime_function

from .base import GreenPass, context_of, layout_of

class CheckPass(GreenPass):
    name = "check"
    description = "every op reading the images runs on visible patches only"

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        for user in ctx.images.users:
            if not (user.op == "call_function" and is_runtime_function(user.target)):
                self.fail(user, "the images are read by an op that is not a visible-patch op")
        for node in gm.graph.nodes:
            if node.meta.get("layout_op"):
                self.fail(node, "layout op left in the converted graph")
            lay = layout_of(node)
            if lay is not None and lay.is_pair():
                self.fail(node, "attention logits left in the converted graph")
        self.report["ok"] += 1
