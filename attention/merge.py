"""Merging the attention terms of several reference images at each query position.

Several image prompts normally add their terms everywhere (the decoupled sum). When the
references are different objects ("the cat from image 1 wearing the jacket from image 2"),
adding them everywhere blends them. The merges here weight each object's term per query
position instead:

- mip_merge: MIP-Adapter ("Resolving Multi-Condition Confusion for Finetuning-Free
  Personalized Image Generation", github.com/hqhQAQ/MIP-Adapter,
  ip_adapter/attention_processor_multi.py, IPAttnProcessor.__call__ lines 211-231):
  weights = entity text-attention maps normalised across objects, times the learned gate
  sigmoid(text_to_weight(O_text)) normalised by its mean over positions.
- attention_routed_merge: the same without the gate, for any adapter.
- mask_routed_merge: weights from user masks already on the layer's token grid.

entity_attention_map computes the per-object maps the first two take. Everything runs in
float32 and returns the terms' dtype; all functions are plain torch, no host imports.
Line numbers refer to MIP-Adapter commit ef01c847 (2024-10-14)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = [
    "entity_attention_map",
    "entity_token_slice",
    "object_weights",
    "mip_merge",
    "attention_routed_merge",
    "mask_routed_merge",
]

Stackable = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stack(x: Stackable, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if len(x) == 0:
        raise ValueError(f"{name}: no objects given")
    try:  # a (1, Lq) map or mask serves every batch row
        return torch.stack(torch.broadcast_tensors(*x), dim=0)
    except RuntimeError as e:
        raise ValueError(f"{name} of shapes {[tuple(t.shape) for t in x]} do not fit together") from e


def entity_token_slice(token_count: int, seq_len: int) -> slice:
    """The rows of an entity word encoded on its own: BOS at row 0, then its `token_count`
    tokens. MIP-Adapter reads rows 1 .. token_count of the entity's own encoding
    (attention_processor_multi.py line 220: `[1:1+batch_object_token_len]`, the length from
    the CLIP tokenizer without BOS/EOS, inference.py get_token_len lines 62-64)."""
    if token_count < 1:
        raise ValueError(f"an entity word needs at least one token, got {token_count}")
    if 1 + token_count > seq_len:
        raise ValueError(f"an entity of {token_count} tokens does not fit an encoding of {seq_len} rows "
                         "(row 0 is the start token)")
    return slice(1, 1 + token_count)


def entity_attention_map(q: torch.Tensor, k_entity: torch.Tensor, heads: int,
                         token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Where in the latent one entity word looks: a (B, Lq) map per batch row.

    q: (B, Lq, H*D) the layer's query (after to_q). k_entity: (B, T, H*D), the layer's text
    keys (to_k) of the entity word's tokens only, T >= 1 (see entity_token_slice).
    token_mask: optional (B, T), 1 for the rows that belong to the word in each batch row
    (words of different token counts padded to one T); every row needs at least one.

    As in MIP-Adapter (cross_attention_attn, lines 125-138, called at line 208), the
    attention runs with the text tokens as queries and the latent positions as keys:
    per head, softmax over the Lq positions of (k_t . q_l) / sqrt(D). It is then averaged
    over heads (line 214) and over the word's tokens (line 220). Each token's softmax is
    independent of the others, so passing only the word's rows gives the same maps as
    computing all 77 and selecting. Each map sums to 1 over positions."""
    if q.dim() != 3 or k_entity.dim() != 3:
        raise ValueError(f"q and k_entity must be (B, L, heads*dim), got {tuple(q.shape)} and {tuple(k_entity.shape)}")
    b, lq, c = q.shape
    if k_entity.shape[-1] != c or heads < 1 or c % heads:
        raise ValueError(f"q width {c}, k_entity width {k_entity.shape[-1]} and {heads} heads do not fit")
    if k_entity.shape[0] not in (1, b):
        raise ValueError(f"k_entity has {k_entity.shape[0]} rows; expected 1 or the query batch {b}")
    t = k_entity.shape[1]
    if t < 1:
        raise ValueError("k_entity holds no token rows")
    d = c // heads
    qh = q.float().reshape(b, lq, heads, d).transpose(1, 2)                      # (B, H, Lq, D)
    kh = k_entity.float().reshape(k_entity.shape[0], t, heads, d).transpose(1, 2)  # (B|1, H, T, D)
    probs = torch.softmax((kh @ qh.transpose(-1, -2)) * d ** -0.5, dim=-1)     # (B, H, T, Lq), over Lq
    per_token = probs.mean(dim=1)                                                # (B, T, Lq)
    if token_mask is None:
        return per_token.mean(dim=1)
    m = token_mask.to(per_token.dtype)
    if m.dim() != 2 or m.shape[1] != t or m.shape[0] not in (1, b):
        raise ValueError(f"token_mask must be (B, {t}) or (1, {t}), got {tuple(token_mask.shape)}")
    counts = m.sum(dim=1, keepdim=True)
    if bool((counts <= 0).any()):
        raise ValueError("token_mask marks no token for some batch row; every entity word needs one")
    return (per_token * m[:, :, None]).sum(dim=1) / counts


def object_weights(maps: Stackable, gate_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-object weights at each position, (N, B, Lq).

    maps: N entity maps (B, Lq) (a list or an (N, B, Lq) tensor). They are normalised across
    objects at each position (line 224: `maps / maps.sum(dim=objects)`). With gate_logits
    (B, Lq, 1) or (B, Lq), each object's weight is multiplied by g / mean_Lq(g), g =
    sigmoid(gate_logits) (lines 226-228), so the gate moves weight between positions and
    averages 1 over a row. Where every map is 0 (underflow only: softmax maps are positive)
    the weights are 0 instead of the reference's NaN."""
    m = _stack(maps, "maps").float()
    if m.dim() != 3:
        raise ValueError(f"maps must be N maps of shape (B, Lq), got {tuple(m.shape)}")
    total = m.sum(dim=0, keepdim=True)
    w = m / total.clamp_min(torch.finfo(torch.float32).tiny)
    if gate_logits is None:
        return w
    g = gate_logits.float()
    if g.dim() == 3:
        if g.shape[-1] != 1:
            raise ValueError(f"gate_logits must be (B, Lq, 1) or (B, Lq), got {tuple(gate_logits.shape)}")
        g = g[..., 0]
    if g.dim() != 2 or g.shape[-1] != m.shape[-1] or g.shape[0] not in (1, m.shape[1]):
        raise ValueError(f"gate_logits of shape {tuple(gate_logits.shape)} do not fit maps of shape "
                         f"{tuple(m.shape[1:])}")
    g = torch.sigmoid(g)
    g = g / g.mean(dim=-1, keepdim=True)
    return w * g[None]


def _weighted_sum(terms: Stackable, w: torch.Tensor, weights: Optional[Sequence[float]]) -> torch.Tensor:
    t = _stack(terms, "terms")
    if t.dim() != 4:
        raise ValueError(f"terms must be N terms of shape (B, Lq, C), got {tuple(t.shape)}")
    n = t.shape[0]
    if w.shape[0] != n:
        raise ValueError(f"{n} terms but {w.shape[0]} routing maps; give one per object")
    if w.shape[-1] != t.shape[2] or w.shape[1] not in (1, t.shape[1]):
        raise ValueError(f"routing maps of shape {tuple(w.shape[1:])} do not fit terms of shape {tuple(t.shape[1:])}")
    if weights is not None:
        if len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} objects")
        w = w * torch.tensor([float(x) for x in weights], dtype=w.dtype, device=w.device)[:, None, None]
    w = w.to(t.device)
    return (w[..., None] * t.float()).sum(dim=0).to(t.dtype)


def mip_merge(terms: Stackable, maps: Stackable, gate_logits: Optional[torch.Tensor] = None,
              weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """MIP-Adapter's merge of N object terms into one (B, Lq, C) term.

    terms: N image-attention outputs (B, Lq, C) (heads joined, before the output projection),
    each already scaled by the adapter weight as the reference does (line 204,
    `self.scale * cur_ip_hidden_states`). maps: N entity maps (B, Lq) from
    entity_attention_map. gate_logits: (B, Lq, 1) = text_to_weight(O_text), O_text the same
    layer's text attention output before to_out (models IPAdapterWeights.gate_logits).
    weights: optional extra per-object factors (not in the reference; 1 each reproduces it).

        out[b, l] = sum_i  w_i * maps_i[b, l] / sum_j maps_j[b, l] * g[b, l] / mean_l' g[b, l'] * terms_i[b, l]

    The caller adds the result to O_text before to_out (line 231)."""
    return _weighted_sum(terms, object_weights(maps, gate_logits), weights)


def attention_routed_merge(terms: Stackable, maps: Stackable,
                           weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """MIP-Adapter's routing without its learned gate, for adapters that have none:

        out[b, l] = sum_i  w_i * maps_i[b, l] / sum_j maps_j[b, l] * terms_i[b, l]

    At each position the object weights sum to 1 (times w_i), so N objects together add as much
    as one reference would, split by where each entity word attends."""
    return _weighted_sum(terms, object_weights(maps, None), weights)


def mask_routed_merge(terms: Stackable, masks: Stackable, weights: Optional[Sequence[float]] = None,
                      normalize: bool = True) -> torch.Tensor:
    """Route N object terms by user masks on the layer's token grid (masks.mask_to_tokens).

    masks: N masks of shape (B, Lq) or (1, Lq), values in [0, 1]. With normalize, where masks
    overlap (sum > 1) they are divided by their sum so the objects share the position instead
    of stacking; elsewhere a mask weights its term as is (soft edges stay soft, and outside
    every mask the result is exactly 0):

        out[b, l] = sum_i  w_i * m_i[b, l] / max(1, sum_j m_j[b, l]) * terms_i[b, l]

    Without normalize it is the plain masked sum sum_i w_i m_i terms_i."""
    m = _stack(masks, "masks").float()
    if m.dim() != 3:
        raise ValueError(f"masks must be N masks of shape (B, Lq), got {tuple(m.shape)}")
    if normalize:
        m = m / m.sum(dim=0, keepdim=True).clamp_min(1.0)
    return _weighted_sum(terms, m, weights)
