"""The decoupled cross-attention sum, independent of ComfyUI.

    out = Attn(q, K_text, V_text) + sum_j  w_j * m_j[row] * Attn(q, K_j, V_j)
"""
from .contexts import ImageContext
from .reference import decoupled_attention_torch
from .dispatch import decoupled_attention, available_backends, select_backend
from .masks import mask_to_tokens

__all__ = [
    "ImageContext",
    "decoupled_attention",
    "decoupled_attention_torch",
    "available_backends",
    "select_backend",
    "mask_to_tokens",
]
