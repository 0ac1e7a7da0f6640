"""The pipeline's postcondition: nothing dense is left on the path from the images to the outputs.

The pass manager runs it after every pass of the pipeline, not as one of them; it requires every property, so a
pipeline that leaves a rewrite out is refused before it runs.
"""

from __future__ import annotations

import torch.fx as fx

from greenmim_convert.compiler.annotations import Property, peek
from greenmim_convert.runtime import is_runtime_function

from .base import GreenPass, context_of, layout_of


class CheckPass(GreenPass):
    name = "check"
    description = "every op reading the images runs on visible patches only"
    requires = frozenset(Property)

    def run(self, gm: fx.GraphModule) -> None:
        ctx = context_of(gm)
        for user in ctx.images.users:
            if not (user.op == "call_function" and is_runtime_function(user.target)):
                self.fail(user, "the images are read by an op that is not a visible-patch op")
        for node in gm.graph.nodes:
            if peek(node).layout_op:
                self.fail(node, "layout op left in the converted graph")
            lay = layout_of(node)
            if lay is not None and lay.is_pair():
                self.fail(node, "attention logits left in the converted graph")
        self.report["ok"] += 1
