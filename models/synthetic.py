"""Random-weight adapter checkpoints with the real key names and layouts.

They let the tests, the pack's self-check and host-side tests exercise loading, detection
and patching without downloading gigabytes; they encode nothing, so images made with them
are meaningless."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .families import HEAD_DIM, AdapterSpec, expected_shapes

__all__ = [
    "synthetic_adapter_state",
    "save_synthetic_adapter",
    "nest_state",
    "sd15_layer_dims",
    "sdxl_layer_dims",
]

_DEFAULT_TOKENS = {"base": 4, "plus": 16, "full-face": 257}


def sd15_layer_dims(model_channels: int = 320) -> list[int]:
    """Widths of SD1.5's 16 cross-attention layers in the adapter's processor order:
    input blocks 1,2,4,5,7,8; output blocks 3..11; middle block."""
    c = model_channels
    down = [c, c, 2 * c, 2 * c, 4 * c, 4 * c]
    up = [4 * c] * 3 + [2 * c] * 3 + [c] * 3
    return down + up + [4 * c]


def sdxl_layer_dims(model_channels: int = 320) -> list[int]:
    """Widths of SDXL's 70 cross-attention layers in the adapter's processor order:
    input 4,5 (2 transformers each, 2c); input 7,8 (10 each, 4c); output 0,1,2 (10 each, 4c);
    output 3,4,5 (2 each, 2c); middle (10, 4c)."""
    c = model_channels
    down = [2 * c] * (2 * 2) + [4 * c] * (2 * 10)
    up = [4 * c] * (3 * 10) + [2 * c] * (3 * 2)
    return down + up + [4 * c] * 10


def _spec_for(layout, layer_dims, context_dim, encoder_width, tokens, resampler_dim, resampler_heads, depth):
    if layout not in _DEFAULT_TOKENS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {tuple(_DEFAULT_TOKENS)}")
    extra = {}
    if layout == "plus":
        d = resampler_dim or context_dim
        extra = dict(
            resampler_dim=d,
            resampler_heads=resampler_heads or max(1, d // HEAD_DIM),
            resampler_depth=depth,
            resampler_ff_dim=4 * d,
        )
    return AdapterSpec(
        layout=layout,
        tokens=tokens or _DEFAULT_TOKENS[layout],
        context_dim=context_dim,
        encoder_width=encoder_width,
        encoder_input="image_embeds" if layout == "base" else "penultimate",
        encoder_name=f"CLIP vision of width {encoder_width}",
        num_layers=len(layer_dims),
        layer_dims=tuple(int(w) for w in layer_dims),
        **extra,
    )


def synthetic_adapter_state(
    layout: str,
    layer_dims,
    context_dim: int,
    encoder_width: int,
    tokens: Optional[int] = None,
    resampler_dim: Optional[int] = None,
    resampler_heads: Optional[int] = None,
    depth: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Flat ``image_proj.*`` / ``ip_adapter.*`` tensors of a random adapter, ready for
    safetensors.save_file. Defaults: 4 tokens (base), 16 (plus); resampler width = context
    width, heads = width // 64 (at least 1), feed-forward 4x."""
    spec = _spec_for(layout, layer_dims, context_dim, encoder_width, tokens, resampler_dim,
                     resampler_heads, depth)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(spec).items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith("latents"):
            t = noise / shape[-1] ** 0.5
        elif len(shape) == 2:
            # 1/sqrt(fan_in) keeps every activation O(1) through the stack.
            t = noise / shape[1] ** 0.5
        elif key.endswith(".weight"):  # LayerNorm gains near 1, not exactly, so they matter
            t = 1.0 + 0.1 * noise
        else:
            t = 0.05 * noise
        state[key] = t.to(dtype).contiguous()
    return state


def nest_state(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat keys -> the nested {"image_proj": {...}, "ip_adapter": {...}} of published .bin files."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        group, _, rest = key.partition(".")
        out.setdefault(group, {})[rest] = t
    return out


def save_synthetic_adapter(path, layout: str, layer_dims, context_dim: int, encoder_width: int,
                           *, nested: bool = True, **kwargs) -> dict[str, torch.Tensor]:
    """Write a synthetic adapter: .safetensors with flat keys, or a torch pickle
    (.bin/.pt/.pth) nested like the published files (flat with nested=False).
    Returns the flat state that was written."""
    state = synthetic_adapter_state(layout, layer_dims, context_dim, encoder_width, **kwargs)
    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(nest_state(state) if nested else state, path)
    return state
