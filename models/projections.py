"""Projection networks: encoder outputs -> image tokens of the context width.

Attribute names mirror the checkpoints' `image_proj.*` keys so a module's state dict
loads a checkpoint group as is, with strict key checking."""
from __future__ import annotations

import math

import torch
from torch import nn

from .families import HEAD_DIM, AdapterSpec

__all__ = ["LinearTokens", "PerceiverAttention", "Resampler", "TokenMLP", "build_projection"]


class LinearTokens(nn.Module):
    """Base / light / vit-G: one linear map from a pooled embedding to T tokens."""

    def __init__(self, encoder_width: int, tokens: int, context_dim: int):
        super().__init__()
        self.tokens = tokens
        self.context_dim = context_dim
        self.proj = nn.Linear(encoder_width, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) -> (N, T, C)."""
        return self.norm(self.proj(x).reshape(-1, self.tokens, self.context_dim))


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    # Index 2 is the parameter-free GELU, which is why checkpoints jump from .1 to .3.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents]."""

    def __init__(self, dim: int, heads: int, head_dim: int = HEAD_DIM):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.reshape(n, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        n, length, _ = latents.shape
        q = self._split(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)
        # Splitting 1/sqrt(dh) as dh^-1/4 on each side keeps q.k inside fp16 range; the
        # checkpoints were trained with exactly this arithmetic, so keep it.
        scale = 1.0 / math.sqrt(math.sqrt(self.head_dim))
        logits = (q * scale) @ (k * scale).transpose(-2, -1)
        # Softmax in at least fp32: half-precision exp/sum loses the small weights.
        weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights = weights.to(logits.dtype)
        out = (weights @ v).transpose(1, 2).reshape(n, length, self.heads * self.head_dim)
        return self.to_out(out)


class Resampler(nn.Module):
    """Plus / Plus-Face / Composition: T learned latents read the encoder's hidden states
    through `depth` perceiver blocks."""

    def __init__(self, encoder_width: int, dim: int, heads: int, depth: int, tokens: int,
                 context_dim: int, ff_dim: int | None = None, head_dim: int = HEAD_DIM):
        super().__init__()
        ff_dim = 4 * dim if ff_dim is None else ff_dim
        self.latents = nn.Parameter(torch.randn(1, tokens, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(encoder_width, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), _feed_forward(dim, ff_dim)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, T, C)."""
        x = self.proj_in(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class TokenMLP(nn.Module):
    """Full-face: a two-layer MLP applied to every encoder token independently."""

    def __init__(self, encoder_width: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(encoder_width, encoder_width),
            nn.GELU(),
            nn.Linear(encoder_width, context_dim),
            nn.LayerNorm(context_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, L, C)."""
        return self.proj(x)


def build_projection(spec: AdapterSpec) -> nn.Module:
    """An untrained projection shaped for `spec`; load the checkpoint's image_proj into it."""
    if spec.layout == "base":
        return LinearTokens(spec.encoder_width, spec.tokens, spec.context_dim)
    if spec.layout == "plus":
        return Resampler(
            encoder_width=spec.encoder_width,
            dim=spec.resampler_dim,
            heads=spec.resampler_heads,
            depth=spec.resampler_depth,
            tokens=spec.tokens,
            context_dim=spec.context_dim,
            ff_dim=spec.resampler_ff_dim,
        )
    if spec.layout == "full-face":
        return TokenMLP(spec.encoder_width, spec.context_dim)
    if spec.layout in ("faceid", "faceid-plus"):
        from .face_projections import FaceIDMLP, FaceIDPlusProjection  # that module builds on this one

        face = spec.face
        if spec.layout == "faceid":
            return FaceIDMLP(face.embedding_width, spec.proj_hidden_dim, spec.tokens, face.token_width)
        return FaceIDPlusProjection(face.embedding_width, spec.proj_hidden_dim, spec.tokens, face.token_width,
                                    clip_width=spec.encoder_width, heads=spec.resampler_heads,
                                    depth=spec.resampler_depth, ff_dim=spec.resampler_ff_dim)
    raise ValueError(f"no projection for layout {spec.layout!r}")
