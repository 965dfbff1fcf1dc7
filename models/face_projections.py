"""Projection networks of the face-identity families: face embedding (+ CLIP hidden states of the face
crop) -> image tokens.

Attribute names mirror the checkpoints' `image_proj.*` keys (models/face_families.py says where each
layout comes from), so a module's state dict loads the checkpoint group as is, strictly. The
face-embedding resampler (InstantID, FaceID Portrait unnorm) is the Plus Resampler of
models/projections.py reading the embedding as a one-token sequence."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .families import HEAD_DIM
from .projections import PerceiverAttention, _feed_forward

__all__ = ["FaceIDMLP", "FacePerceiver", "FaceIDPlusProjection"]


class FaceIDMLP(nn.Module):
    """FaceID / Portrait: embedding (N, E) -> Linear(E, H), GELU, Linear(H, T*C) -> T tokens, LayerNorm(C)."""

    def __init__(self, embedding_width: int, hidden: int, tokens: int, token_width: int):
        super().__init__()
        self.tokens = tokens
        self.token_width = token_width
        self.proj = nn.Sequential(nn.Linear(embedding_width, hidden), nn.GELU(),
                                  nn.Linear(hidden, tokens * token_width))
        self.norm = nn.LayerNorm(token_width)

    def face_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, E) -> (N, T, C)."""
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.token_width))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.face_tokens(embeds)


class FacePerceiver(nn.Module):
    """FaceID Plus' perceiver: given latents (the MLP's tokens) attend to [proj_in(CLIP states); latents]
    through `depth` [attention, feed-forward] blocks with residuals; then proj_out and norm_out."""

    def __init__(self, clip_width: int, dim: int, heads: int, depth: int, ff_dim: int, out_dim: int,
                 head_dim: int = HEAD_DIM):
        super().__init__()
        self.proj_in = nn.Linear(clip_width, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), _feed_forward(dim, ff_dim)]) for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, clip_hidden: torch.Tensor) -> torch.Tensor:
        """latents (N, T, D), clip_hidden (N, L, E) -> (N, T, out_dim)."""
        x = self.proj_in(clip_hidden)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class FaceIDPlusProjection(FaceIDMLP):
    """FaceID Plus / Plus V2 / Kolors FaceID-Plus: the FaceID MLP gives x, the perceiver refines it with
    the CLIP states of the face crop; V2 adds the shortcut x + s * out (V1: out alone)."""

    def __init__(self, embedding_width: int, hidden: int, tokens: int, token_width: int, clip_width: int,
                 heads: int, depth: int, ff_dim: int):
        super().__init__(embedding_width, hidden, tokens, token_width)
        self.perceiver_resampler = FacePerceiver(clip_width, token_width, heads, depth, ff_dim, token_width)

    def forward(self, embeds: torch.Tensor, clip_hidden: torch.Tensor,
                shortcut_scale: Optional[float] = None) -> torch.Tensor:
        """embeds (N, E), clip_hidden (N, L, W) (a batch of 1 on either side is shared) -> (N, T, C)."""
        x = self.face_tokens(embeds)
        if x.shape[0] != clip_hidden.shape[0]:
            n = max(x.shape[0], clip_hidden.shape[0])
            x, clip_hidden = x.expand(n, -1, -1), clip_hidden.expand(n, -1, -1)
        out = self.perceiver_resampler(x, clip_hidden)
        if shortcut_scale is None:
            return out
        return x + shortcut_scale * out
