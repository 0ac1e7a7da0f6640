"""Attention over every token of a sample (timm's ``Attention``, EVA's, PVT v2's): keys masked at hidden
positions, prefix tokens always visible."""

from __future__ import annotations

from timm import layers as timm_layers
from timm.models import eva, pvt_v2

from greenmim_convert.oracle.hooks import Family, attention_post, attention_pre, global_keys

_CLASSES = (timm_layers.Attention, eva.EvaAttention, pvt_v2.Attention)
FAMILY = Family(
    pre=[(c, attention_pre(lambda m: global_keys), False) for c in _CLASSES],
    post=[(c, attention_post) for c in _CLASSES],
    fused=_CLASSES,
)
