"""Resampling of a user mask (an image-sized region) to the query token grid of one
attention layer. Done once per layer resolution at the start of a run, never per step."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _halvings(h: int, w: int, seq_len: int, ceil: bool):
    """The grid reached by halving (h, w) until it holds seq_len tokens, or None."""
    while h * w > seq_len and (h > 1 or w > 1):
        h, w = ((h + 1) // 2, (w + 1) // 2) if ceil else (max(1, h // 2), max(1, w // 2))
    return (h, w) if h * w == seq_len else None


def token_grid(latent_h: int, latent_w: int, seq_len: int) -> tuple[int, int]:
    """Height and width of the token grid of a layer that sees `seq_len` tokens of a
    latent_h x latent_w latent.

    A UNet level halves the grid with a stride-2 convolution (padding 1), which rounds odd
    sizes up; a pooling downsampler rounds down. The grid is found by repeating that halving
    until it holds seq_len tokens, so odd sizes and extreme aspect ratios (a side that
    reaches 1 while the other is still long) map exactly. Grids that no halving reaches get
    the closest grid of the latent's aspect ratio, at least 1 x 1."""
    if latent_h < 1 or latent_w < 1 or seq_len < 1:
        raise ValueError(f"no token grid for a {latent_h}x{latent_w} latent and {seq_len} tokens")
    for ceil in (True, False):
        grid = _halvings(latent_h, latent_w, seq_len, ceil)
        if grid is not None:
            return grid
    scale = math.sqrt(latent_h * latent_w / seq_len)
    h = min(seq_len, max(1, round(latent_h / scale)))
    return h, max(1, seq_len // h)


def mask_to_tokens(mask: torch.Tensor, latent_h: int, latent_w: int, seq_len: int) -> torch.Tensor:
    """(M, H, W) mask -> (M, seq_len) row weights on the layer's token grid.

    Bilinear resize to the grid; when the grid does not cover seq_len exactly (a layer
    whose downsampling is neither rule of token_grid), pad with zeros or crop centrally so
    that rows still line up."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"mask must be (H, W) or (M, H, W), got shape {tuple(mask.shape)}")
    gh, gw = token_grid(latent_h, latent_w, seq_len)
    rows = F.interpolate(mask[:, None].float(), size=(gh, gw), mode="bilinear").reshape(mask.shape[0], -1)
    n = gh * gw
    if n < seq_len:
        pad = seq_len - n
        rows = F.pad(rows, (pad // 2, pad - pad // 2), value=0.0)
    elif n > seq_len:
        start = (n - seq_len) // 2
        rows = rows[:, start:start + seq_len]
    return rows


def patch_grid(latent_h: int, latent_w: int, patch: int) -> tuple[int, int]:
    """Token grid of a DiT that pads the latent up to a multiple of the patch size and cuts
    it into patch x patch tokens (Flux, Chroma, SD3)."""
    if latent_h < 1 or latent_w < 1 or patch < 1:
        raise ValueError(f"no patch grid for a {latent_h}x{latent_w} latent and patch size {patch}")
    return -(-latent_h // patch), -(-latent_w // patch)


def mask_to_patch_tokens(mask: torch.Tensor, latent_h: int, latent_w: int, patch: int) -> torch.Tensor:
    """(M, H, W) mask -> (M, tokens) row weights on a DiT's patch grid, row-major.

    The mask is resized to the latent, then each token gets the mean over the latent cells
    its patch covers. Padding cells at the bottom/right edge of an odd-sized latent hold no
    picture, so they do not count: a token half over the picture takes the mask of that half."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"mask must be (H, W) or (M, H, W), got shape {tuple(mask.shape)}")
    gh, gw = patch_grid(latent_h, latent_w, patch)
    cells = F.interpolate(mask[:, None].float(), size=(latent_h, latent_w), mode="bilinear")
    # ceil_mode windows past the edge are averaged over the cells inside it only
    tokens = F.avg_pool2d(cells, kernel_size=patch, stride=patch, ceil_mode=True)
    assert tokens.shape[-2:] == (gh, gw)
    return tokens.reshape(mask.shape[0], gh * gw)
