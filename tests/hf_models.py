"""Small random-weight transformers vision backbones for the oracle tests (64x64 images, a few layers each)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

IMG = 64

# one shifted-window block (the first stage's second): the rules for it are the same at every stage
_SWIN = dict(
    image_size=IMG,
    patch_size=4,
    embed_dim=16,
    depths=[2, 1, 1, 1],
    num_heads=[1, 2, 2, 4],
    window_size=4,
    mlp_ratio=2.0,
)
_CVT_STAGES = 3
_SAM2 = dict(
    hidden_size=16,
    num_attention_heads=1,
    image_size=[IMG, IMG],
    blocks_per_stage=[1, 1, 2, 1],
    embed_dim_per_stage=[16, 32, 48, 64],
    num_attention_heads_per_stage=[1, 2, 2, 4],
    window_size_per_stage=[4, 4, 2, 2],
    global_attention_blocks=[4],
    window_positional_embedding_background_size=[4, 4],
    num_query_pool_stages=2,
    mlp_ratio=2.0,
)

# test case (a model type, or a name in MODEL_TYPES) -> AutoConfig.for_model kwargs
CONFIGS: Dict[str, Dict[str, Any]] = {
    # Swin and Donut clamp a window to a smaller grid but keep the bias table of their configured window, so at
    # 64x64 their windows are 2; Swin V2 clamps at construction, MaskFormer Swin pads its 2x2 grid to a window
    "swin": dict(_SWIN, window_size=2),
    "swinv2": _SWIN,
    "donut-swin": dict(_SWIN, window_size=2),
    "maskformer-swin": _SWIN,
    # windows of 3 pad every grid (16, 8, 4, 2 -> 18, 9, 6, 3), and every second block shifts the padded grid by one
    "maskformer-swin-window3": dict(_SWIN, depths=[2, 2, 2, 2], window_size=3),
    "focalnet": dict(
        image_size=IMG,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        hidden_sizes=[32, 64, 128, 128],
        focal_levels=[2, 2, 2, 2],
        focal_windows=[3, 3, 3, 3],
        use_conv_embed=True,
        use_layerscale=True,
        normalize_modulator=True,
        mlp_ratio=2.0,
    ),
    "convnext": dict(image_size=IMG, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "convnextv2": dict(image_size=IMG, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "pvt": dict(
        image_size=IMG,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 2, 4],
        mlp_ratios=[2, 2, 2, 2],
    ),
    "pvt_v2": dict(
        image_size=IMG,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 2, 4],
        mlp_ratios=[2, 2, 2, 2],
    ),
    "segformer": dict(
        hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2]
    ),
    # 3 stages, 2 query pools: the final tokens are back in raster order; stage 2's second layer attends globally
    "hiera": dict(
        image_size=[IMG, IMG],
        embed_dim=16,
        depths=[1, 2, 1],
        num_heads=[1, 2, 4],
        num_query_pool=2,
        masked_unit_size=[8, 8],
        masked_unit_attention=[True, False, False],
        query_stride=[2, 2],
        mlp_ratio=2.0,
    ),
    # CvT's drop-path schedule indexes stage i of a depth-long list: depth[i] > i
    "cvt": dict(
        patch_sizes=[7, 3, 3],
        patch_stride=[4, 2, 2],
        patch_padding=[2, 1, 1],
        embed_dim=[16, 32, 48],
        num_heads=[1, 2, 3],
        depth=[1, 2, 3],
        mlp_ratio=[2.0] * _CVT_STAGES,
        attention_drop_rate=[0.0] * _CVT_STAGES,
        drop_rate=[0.0] * _CVT_STAGES,
        qkv_bias=[True] * _CVT_STAGES,
        cls_token=[False, False, True],
        qkv_projection_method=["dw_bn"] * _CVT_STAGES,
        kernel_qkv=[3] * _CVT_STAGES,
        padding_kv=[1] * _CVT_STAGES,
        stride_kv=[2] * _CVT_STAGES,
        padding_q=[1] * _CVT_STAGES,
        stride_q=[1] * _CVT_STAGES,
    ),
    "poolformer": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], mlp_ratio=2.0),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic"),
    # the last transformer's 2x2 grid is one patch: each in-patch position attends to itself. No element dropout:
    # the converted model draws it per visible element, so one seed cannot give the dense model's draws
    "mobilevit": dict(
        image_size=IMG,
        hidden_sizes=[16, 16, 24],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2,
        mlp_ratio=2.0,
        expand_ratio=2.0,
        hidden_dropout_prob=0.0,
    ),
    # 4x4 tokens at stride 16, subsampled to 2x2
    "levit": dict(
        image_size=IMG,
        patch_size=16,
        hidden_sizes=[16, 32],
        num_attention_heads=[2, 2],
        depths=[1, 1],
        key_dim=[4, 4],
        mlp_ratio=[2, 2],
        attention_ratio=[2, 2],
        down_ops=[["Subsample", 4, 2, 2, 2, 2]],
    ),
    # LeViT's default geometry at tiny widths: 224 px, 14x14 tokens at stride 16, subsampled to 7x7, then every second
    # row and column of 7 (0, 2, 4, 6) to 4x4, a step that does not tile the grid
    "levit-224": dict(
        image_size=224,
        patch_size=16,
        hidden_sizes=[16, 24, 32],
        num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1],
        key_dim=[4, 4, 4],
        mlp_ratio=[2, 2, 2],
        attention_ratio=[2, 2, 2],
        down_ops=[["Subsample", 4, 2, 2, 2, 2], ["Subsample", 4, 2, 2, 2, 2]],
    ),
    # a stage of depth d: d - 1 convolutional encoders, then the attention block
    "swiftformer": dict(depths=[2, 1, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratio=2),
    # windows of 3 on a 4x4 grid: the layer pads them
    "vitdet": dict(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMG,
        pretrain_image_size=IMG,
        patch_size=16,
        window_block_indices=[0, 2],
        residual_block_indices=[1],
        use_relative_position_embeddings=True,
        window_size=3,
        mlp_ratio=2,
    ),
    # blocks 1 and 2 pool their queries 2x2 inside 4x4 windows folded into the batch; block 4 attends globally
    "sam2_hiera_det_model": _SAM2,
    # block 3's windows of 3 pad its 4x4 grid
    "sam2-padded-windows": dict(_SAM2, window_size_per_stage=[4, 4, 3, 2]),
    # SAM 2's default geometry (1024: windows of 14 pad the third stage's 64x64 grid to 70x70, and the last stage's
    # first block pools its queries 2x2 in them onto a 35x35 grid, cropped to 32x32): windows of 6 pad the third
    # stage's 4x4 grid to 6x6, block 4 pools its queries onto a 3x3 grid, cropped to 2x2, then windows of 3 pad it
    "sam2-pooled-padding": dict(
        _SAM2, window_size_per_stage=[4, 4, 6, 3], num_query_pool_stages=3, global_attention_blocks=[]
    ),
}

# test cases that are a second configuration of one transformers model type: case name -> model type
MODEL_TYPES: Dict[str, str] = {
    "sam2-padded-windows": "sam2_hiera_det_model",
    "sam2-pooled-padding": "sam2_hiera_det_model",
    "maskformer-swin-window3": "maskformer-swin",
    "levit-224": "levit",
}

# model types whose AutoBackbone the tests build, with config kwargs that differ from the model's
BACKBONES: Dict[str, Dict[str, Any]] = {
    "swin": dict(window_size=4),  # the backbone partitions always: its 2x2 grid is padded to a window
    "swinv2": {},
    "maskformer-swin": {},
    "focalnet": {},
    "convnext": {},
    "convnextv2": {},
    "pvt_v2": {},
    "hiera": {},
    "resnet": {},
    "vitdet": {},
}


def image_size(case: str) -> int:
    """The side of the square images of a test case: its config's ``image_size``, else ``IMG``."""
    size = CONFIGS[case].get("image_size", IMG)
    return int(size if isinstance(size, int) else size[0])


def import_transformers() -> Any:
    """transformers, with the installed ``kernels`` package imported first under its name: this checkout's
    top-level ``kernels/`` folder shadows it when the checkout's root is on sys.path, and transformers'
    modeling files import it."""
    if "kernels" not in sys.modules:
        root = Path(__file__).resolve().parents[1]
        saved = list(sys.path)
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass
        finally:
            sys.path[:] = saved
    return importlib.import_module("transformers")


def _drop_path_kwargs(config: Any, drop_path: float) -> Dict[str, Any]:
    """The config's drop-path field set to ``drop_path`` (per stage where it is a list; an int field is left to
    ``_set_drop_rates``)."""
    current = getattr(config, "drop_path_rate", None)
    if isinstance(current, list):
        return {"drop_path_rate": [drop_path] * len(current)}
    if isinstance(current, float):
        return {"drop_path_rate": drop_path}
    return {}


def _set_drop_rates(model: nn.Module, config: Any, drop_path: float) -> None:
    """LeViT's config types ``drop_path_rate`` as an int (0 or 1 only); its residual layers copy it into their
    ``drop_rate``, which is set to ``drop_path`` here."""
    current = getattr(config, "drop_path_rate", None)
    if not isinstance(current, int) or isinstance(current, bool):
        return
    for module in model.modules():
        if getattr(module, "drop_rate", None) == current:
            module.drop_rate = drop_path


def randomise(model: nn.Module) -> nn.Module:
    """PyTorch's default initialisation for convolutions and linear layers (transformers' 0.02 standard
    deviation makes convolution outputs so small that BatchNorm's eps, not their variance, sets the scale, and
    the image fades from deep outputs), then random values for every parameter that starts constant
    (relative-position tables and biases, layer-scale, GRN gamma/beta, norm affines), so that nothing is an
    identity, a constant or negligible."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                module.reset_parameters()
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                continue
            value = float(flat[0])
            if name.endswith("logit_scale"):
                p.uniform_(1.0, 3.5)
            elif value == 1.0:
                p.normal_(1.0, 0.1)
            elif value == 0.0:
                relative = any(k in name for k in ("relative_position", "rel_pos", "attention_biases", "pos_embed"))
                p.normal_(0.0, 0.5 if relative else 0.1)
            else:  # layer-scale: a small constant would make its branch negligible
                p.uniform_(0.5, 1.0)
    return model


def build_hf(
    model_type: str,
    backbone: bool = False,
    drop_path: float = 0.1,
    dtype: torch.dtype = torch.float64,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """``AutoModel`` (``AutoBackbone`` with every stage as an output feature) of ``CONFIGS[model_type]`` (with
    ``overrides``), random weights (``randomise``), BatchNorm statistics of random images, in ``dtype`` and eval
    mode. ``model_type`` is a test case: a transformers model type or a name in ``MODEL_TYPES``."""
    transformers = import_transformers()
    case = model_type
    kwargs = {**CONFIGS[model_type], **(BACKBONES[model_type] if backbone else {}), **overrides}
    model_type = MODEL_TYPES.get(model_type, model_type)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    extra = _drop_path_kwargs(config, drop_path)
    if backbone:
        extra["out_features"] = [s for s in config.stage_names if s != "stem"]
    if extra:
        config = transformers.AutoConfig.for_model(model_type, **{**kwargs, **extra})
    auto = transformers.AutoBackbone if backbone else transformers.AutoModel
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = randomise(auto.from_config(config, **options)).to(dtype)
    _set_drop_rates(model, config, drop_path)
    return calibrate_batch_norms(model, size=image_size(case)).eval()


def clear_caches(model: nn.Module) -> nn.Module:
    """Empty LeViT's eval-mode cache of its attention biases, which holds them with the graph of the forward that
    computed them: a backward after another one through that graph would fail."""
    for module in model.modules():
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            module.attention_bias_cache.clear()
    return model


def calibrate_batch_norms(model: nn.Module, batch: int = 4, size: int = IMG) -> nn.Module:
    """BatchNorm running statistics of a training-mode forward on random images: normalised layers keep the
    signal's scale, which the small initialisations of transformers would let fade to nothing in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    dtype = next(model.parameters()).dtype
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of this one batch
        model.train()
        with torch.no_grad():
            model(torch.randn(batch, 3, size, size, dtype=dtype))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model
