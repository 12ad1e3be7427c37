"""Segmentation models (Flax NNX), chosen by name.

`get_model(name, ...)` builds one of `list_models()`: "unet" (the paper's), "resunet",
"attention_unet", "deepseg", its random draws made together (`build`), for slices
[N, H, W, C] (`spatial_dims=2`, the default) or volumes [N, D, H, W, C] (`spatial_dims=3`).
`functional(model)` gives the pure `(apply_fn, params, state)` view that influence
computations transform. See `tracin_jax.models.unet` for the architecture.
"""

from tracin_jax.models.layers import SPATIAL_DIMS
from tracin_jax.models.unet import (
    LAST_HIDDEN,
    AttentionUNet,
    DeepSeg,
    ResUNet,
    UNet,
    apply_channel_mask,
    build,
    count_params,
    functional,
    get_model,
    get_model_cls,
    list_models,
    register_model,
)

__all__ = [
    "LAST_HIDDEN",
    "SPATIAL_DIMS",
    "AttentionUNet",
    "DeepSeg",
    "ResUNet",
    "UNet",
    "apply_channel_mask",
    "build",
    "count_params",
    "functional",
    "get_model",
    "get_model_cls",
    "list_models",
    "register_model",
]
