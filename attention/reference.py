"""Plain torch evaluation of the decoupled sum: one attention per context, a mask
multiply and an add. It is the reference every other backend is tested against and the
path used wherever the fused kernel cannot run (CPU, MPS, no Triton)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .contexts import ImageContext

# attention_fn(q, k, v, heads) -> out, all in the caller's layout. ComfyUI's
# optimized_attention has this shape for the "blc" layout; passing it makes the torch
# path bit-identical to what the host would compute for each term.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: str = "blc") -> torch.Tensor:
    if layout == "bhld":
        return F.scaled_dot_product_attention(q, k, v)
    b, lq, c = q.shape
    d = c // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, lq, c)


def _row_mask(mask: torch.Tensor, batch: int, layout: str) -> torch.Tensor:
    if mask.dim() != 2 or mask.shape[0] not in (1, batch):
        raise ValueError(f"context mask must be (B, Lq) or (1, Lq) with B={batch}, got {tuple(mask.shape)}")
    return mask[:, :, None] if layout == "blc" else mask[:, None, :, None]


def decoupled_attention_torch(
    q: torch.Tensor,
    k_text: Optional[torch.Tensor],
    v_text: Optional[torch.Tensor],
    contexts: Sequence[ImageContext],
    heads: int,
    layout: str = "blc",
    attention_fn: Optional[AttentionFn] = None,
) -> torch.Tensor:
    """Attn(q, K_text, V_text) + sum_j w_j * m_j * Attn(q, K_j, V_j).

    q: (B, Lq, H*D) for layout "blc", (B, H, Lq, D) for "bhld". Without a text context
    (k_text None) only the image terms are summed. The result has q's dtype and layout.
    """
    if layout not in ("blc", "bhld"):
        raise ValueError(f"layout must be 'blc' or 'bhld', got {layout!r}")
    if attention_fn is None:
        def attention_fn(q_, k_, v_, h_):
            return sdpa_attention(q_, k_, v_, h_, layout)

    batch = q.shape[0]
    out = None
    if k_text is not None:
        out = attention_fn(q, k_text, v_text, heads)
    for ctx in contexts:
        k, v = ctx.rows_for(batch)
        term = attention_fn(q, k.to(q.dtype), v.to(q.dtype), heads)
        if ctx.weight != 1.0:
            term = term * ctx.weight
        if ctx.mask is not None:
            term = term * _row_mask(ctx.mask, batch, layout).to(term.dtype)
        out = term if out is None else out + term
    if out is None:
        out = torch.zeros_like(q)
    return out.to(q.dtype)
