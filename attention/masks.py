"""Resampling of a user mask (an image-sized region) to the query token grid of one
attention layer. Done once per layer resolution at the start of a run, never per step."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_grid(latent_h: int, latent_w: int, seq_len: int) -> tuple[int, int]:
    """Height and width of the token grid for a layer that sees `seq_len` tokens of a
    latent of size latent_h x latent_w. Rounds like the UNet's downsampling (ceil), so
    odd latent sizes give the grid the layer really has."""
    h = latent_h / math.sqrt(latent_h * latent_w / seq_len)
    h = int(h) + int(seq_len % int(h) != 0)
    return h, seq_len // h


def mask_to_tokens(mask: torch.Tensor, latent_h: int, latent_w: int, seq_len: int) -> torch.Tensor:
    """(M, H, W) mask -> (M, seq_len) row weights on the layer's token grid.

    Bilinear resize to the grid; when the grid does not cover seq_len exactly (extreme
    aspect ratios), pad with zeros or crop centrally so that rows still line up."""
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
