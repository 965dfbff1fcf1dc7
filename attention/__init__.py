"""The decoupled cross-attention sum, independent of ComfyUI.

    out = Attn(q, K_text, V_text) + sum_j  w_j * m_j[row] * Attn(q, K_j, V_j)
"""
from .contexts import ImageContext
from .reference import decoupled_attention_torch
from .fused_triton import fused_decoupled_attention, MAX_IMAGE_CONTEXTS
from .packing import PackedContexts, pack_image_contexts
from .dispatch import (
    AttentionShape,
    available_backends,
    decoupled_attention,
    select_backend,
    set_prefer_torch_rule,
    triton_available,
)
from .masks import mask_to_patch_tokens, mask_to_tokens, patch_grid
from .merge import (
    attention_routed_merge,
    entity_attention_map,
    entity_token_slice,
    mask_routed_merge,
    mip_merge,
    object_weights,
)

__all__ = [
    "ImageContext",
    "PackedContexts",
    "pack_image_contexts",
    "decoupled_attention",
    "decoupled_attention_torch",
    "fused_decoupled_attention",
    "available_backends",
    "select_backend",
    "set_prefer_torch_rule",
    "triton_available",
    "AttentionShape",
    "MAX_IMAGE_CONTEXTS",
    "mask_to_patch_tokens",
    "mask_to_tokens",
    "patch_grid",
    "attention_routed_merge",
    "entity_attention_map",
    "entity_token_slice",
    "mask_routed_merge",
    "mip_merge",
    "object_weights",
]
