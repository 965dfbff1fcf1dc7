"""The few host (ComfyUI) functions the patch calls at sampling time, imported lazily so
that the rest of the pack can be imported and tested without the host."""
from __future__ import annotations

import inspect

import torch

_attention_module = None
_accepts_options = None


def _attention():
    global _attention_module, _accepts_options
    if _attention_module is None:
        import comfy.ldm.modules.attention as attention_module
        _attention_module = attention_module
        params = inspect.signature(inspect.unwrap(attention_module.optimized_attention)).parameters
        _accepts_options = "transformer_options" in params or any(
            p.kind is p.VAR_KEYWORD for p in params.values())
    return _attention_module


def host_attention_fn(extra_options: dict):
    """The host's attention for (B, L, H*D) tensors, as CrossAttention itself would call it,
    so the text term is bit-identical to an unpatched model."""
    module = _attention()
    precision = extra_options.get("attn_precision")

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        # Looked up at call time: the host rebinds optimized_attention by its own flags.
        if _accepts_options:
            return module.optimized_attention(q, k, v, heads, attn_precision=precision,
                                              transformer_options=extra_options)
        return module.optimized_attention(q, k, v, heads, attn_precision=precision)

    return fn
