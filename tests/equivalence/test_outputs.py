"""Model outputs in any container: a tensor, a tuple or list of stage maps, a ModelOutput-like mapping
(``last_hidden_state``, or a BackboneOutput's ``feature_maps``), or anything else through ``output=``."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from conftest import rel_err

import greenmim_convert as gmc
from greenmim_convert.api.masking import random_mask


class TwoStage(nn.Module):
    """Two conv stages (strides 4 and 8); ``kind`` chooses the container its forward returns."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.s1 = nn.Conv2d(3, 8, 4, 4)
        self.s2 = nn.Conv2d(8, 16, 2, 2)

    def forward(self, x):
        a = self.s1(x)
        b = self.s2(torch.relu(a))
        if self.kind == "tuple":
            return a, b
        if self.kind == "list":
            return [a, b]
        if self.kind == "backbone":
            return OrderedDict(feature_maps=(a, b))
        if self.kind == "hidden":
            return OrderedDict(last_hidden_state=b.flatten(2).transpose(1, 2), pooler_output=b.mean((2, 3)))
        if self.kind == "odd":
            return {"maps": [a, b], "size": 3}
        return b


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "backbone", "hidden", "odd"])
def test_outputs_in_any_container(kind: str):
    torch.manual_seed(0)
    model = TwoStage(kind).double().eval()
    pick = (lambda out: out["maps"]) if kind == "odd" else None
    green = gmc.convert(model, img_size=64, mask_unit=16, output=pick)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = green(images, torch.ones(2, 4, 4, dtype=torch.bool))
    a = model.s1(images)
    b = model.s2(torch.relu(a))
    assert rel_err(out.last.to_dense(), b) <= 1e-12
    if kind in ("tuple", "list", "backbone", "odd"):  # the stages are the maps the output holds
        assert [s.grid for s in out.stages] == [(16, 16), (8, 8)]
        assert rel_err(out.stages[0].to_dense(), a) <= 1e-12
    masked = green(images, random_mask(2, (4, 4), 0.5))
    assert masked.last.feats.shape[0] < 2 * 64


def test_unreadable_output_names_the_way_out():
    model = TwoStage("odd").double()
    with pytest.raises(gmc.TraceError, match="output="):
        gmc.convert(model, img_size=64, mask_unit=16)
    with pytest.raises(gmc.InvalidInputError, match="output must be a function"):
        gmc.convert(model, img_size=64, mask_unit=16, output="maps")
