"""Projection networks of the DiT adapters: encoder outputs -> image tokens.

Parameter names are the canonical `image_proj.*` names of models/dit_families.py (the InstantX / XLabs
checkpoint names after conversion), so each module loads its checkpoint group with strict key checking."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .families import HEAD_DIM, AdapterSpec
from .projections import LinearTokens, PerceiverAttention, _feed_forward

__all__ = ["MLPTokens", "TimeEmbedding", "TimeResampler", "XLabsTokens", "build_dit_projection", "timestep_features"]


class XLabsTokens(LinearTokens):
    """XLabs Flux: CLIP image_embeds (N, E) -> LayerNorm(Linear(E -> T*C)) as (N, T, C).

    The same network as the UNet base adapter (XLabs took it from there); kept as its own name so a
    Flux projection is never mistaken for a UNet one."""


class MLPTokens(nn.Module):
    """InstantX Flux: SigLIP pooled (N, E) -> Linear(E -> H), exact GELU, Linear(H -> T*C), LayerNorm(C)."""

    def __init__(self, encoder_width: int, hidden: int, tokens: int, context_dim: int):
        super().__init__()
        self.tokens = tokens
        self.context_dim = context_dim
        self.proj = nn.Sequential(nn.Linear(encoder_width, hidden), nn.GELU(), nn.Linear(hidden, tokens * context_dim))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).reshape(-1, self.tokens, self.context_dim))


def timestep_features(t: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps t (N,), cosines first: [cos(t*f_k), sin(t*f_k)], f_k = P^(-k/half).

    The InstantX resampler was trained with frequency shift 0 and the cosine half first; t is the
    scheduler's timestep (1000 x sigma for SD3's flow schedule). Always float32."""
    half = width // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if width % 2:
        out = F.pad(out, (0, 1))
    return out


class TimeEmbedding(nn.Module):
    """Timestep features -> Linear, SiLU, Linear (names as the checkpoint's time_embedding.linear_1/2)."""

    def __init__(self, in_width: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_width, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class _ModulatedPerceiverAttention(PerceiverAttention):
    """The Plus resampler's attention with the latents' LayerNorm modulated by the timestep."""

    def forward(self, x: torch.Tensor, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]
        n, length, _ = latents.shape
        q = self._split(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)
        # dh^-1/4 on each side, softmax in at least fp32: the arithmetic the checkpoint was trained with
        s = 1.0 / math.sqrt(math.sqrt(self.head_dim))
        logits = (q * s) @ (k * s).transpose(-2, -1)
        weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        out = (weights.to(logits.dtype) @ v).transpose(1, 2).reshape(n, length, self.heads * self.head_dim)
        return self.to_out(out)


class TimeResampler(nn.Module):
    """InstantX SD3.5: T learned latents read SigLIP penultimate states (N, L, E) through `depth` perceiver
    blocks whose norms are modulated by a timestep embedding; returns the tokens (N, T, C) and that
    embedding (N, dim), which every joint block's AdaLN also reads.

    Layer i holds [attention, feed-forward, adaLN]: adaLN = SiLU then Linear(dim -> 4 dim), chunked as
    (shift_attn, scale_attn, shift_ff, scale_ff)."""

    def __init__(self, encoder_width: int, dim: int, heads: int, depth: int, tokens: int, context_dim: int,
                 ff_dim: int, time_in: int, head_dim: int = HEAD_DIM):
        super().__init__()
        self.time_in = time_in
        self.latents = nn.Parameter(torch.randn(1, tokens, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(encoder_width, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                _ModulatedPerceiverAttention(dim, heads, head_dim),
                _feed_forward(dim, ff_dim),
                nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim)),
            ])
            for _ in range(depth)
        )
        self.time_embedding = TimeEmbedding(time_in, dim)

    def embed_time(self, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.time_embedding(timestep_features(timestep, self.time_in).to(dtype=like.dtype))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, L, E), timestep (N,) -> tokens (N, T, C), time embedding (N, dim)."""
        temb = self.embed_time(timestep, x)
        x = self.proj_in(x) + temb[:, None]
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff, ada in self.layers:
            shift_a, scale_a, shift_f, scale_f = ada(temb).chunk(4, dim=-1)
            latents = latents + attn(x, latents, shift_a, scale_a)
            norm, up, act, down = ff
            h = norm(latents) * (1 + scale_f[:, None]) + shift_f[:, None]
            latents = latents + down(act(up(h)))
        return self.norm_out(self.proj_out(latents)), temb


def build_dit_projection(spec: AdapterSpec) -> nn.Module:
    """An untrained projection shaped for a DiT spec; load the canonical image_proj group into it."""
    if spec.injection == "xlabs":
        return XLabsTokens(spec.encoder_width, spec.tokens, spec.context_dim)
    if spec.injection == "instantx-flux":
        return MLPTokens(spec.encoder_width, spec.proj_hidden_dim, spec.tokens, spec.context_dim)
    if spec.injection == "instantx-sd3":
        return TimeResampler(
            encoder_width=spec.encoder_width, dim=spec.resampler_dim, heads=spec.resampler_heads,
            depth=spec.resampler_depth, tokens=spec.tokens, context_dim=spec.context_dim,
            ff_dim=spec.resampler_ff_dim, time_in=spec.time_embed_in)
    raise ValueError(f"no DiT projection for injection {spec.injection!r}")
