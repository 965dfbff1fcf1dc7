"""SigLIP's attention-pooling head: the `pooler_output` the InstantX Flux adapter reads.

A SigLIP vision tower ends with a "multihead attention pooling" head: one learned probe
token attends over the final (post-LayerNorm) hidden states, then a LayerNorm and an MLP
with a residual. The host's CLIP vision model builds the tower without it (Redux reads the
hidden states), so the pack reads the head's weights from the same file and runs it here.

Keys (Hugging Face layout, prefix `vision_model.head.`): `probe` (1, 1, D),
`attention.in_proj_{weight,bias}` (3D, D) / (3D,), `attention.out_proj.{weight,bias}`,
`layernorm.{weight,bias}`, `mlp.fc1.{weight,bias}` (F, D), `mlp.fc2.{weight,bias}` (D, F)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .loading import AdapterFormatError

PREFIX = "vision_model.head."
_LAYER_NORM_EPS = 1e-6  # SigLIP's layer_norm_eps


class SigLIPPoolingHead(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=_LAYER_NORM_EPS)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, mlp_width)
        self.mlp.fc2 = nn.Linear(mlp_width, width)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], heads: int) -> "SigLIPPoolingHead":
        """Build from a vision tower's state dict (keys with or without the `vision_model.head.` prefix)."""
        sub = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if not sub:
            sub = {k: v for k, v in state.items() if k.startswith(("probe", "attention.", "layernorm.", "mlp."))}
        if "probe" not in sub or "mlp.fc1.weight" not in sub:
            raise AdapterFormatError("the SigLIP vision model has no attention-pooling head (keys "
                                     f"'{PREFIX}probe', '{PREFIX}mlp.fc1.weight', ...)")
        width = int(sub["probe"].shape[-1])
        if width % heads:
            raise AdapterFormatError(f"SigLIP head width {width} does not split into {heads} heads")
        head = cls(width, heads, int(sub["mlp.fc1.weight"].shape[0]))
        own = head.state_dict()
        missing = sorted(set(own) - set(sub))
        if missing:
            raise AdapterFormatError(f"the SigLIP pooling head misses {', '.join(PREFIX + m for m in missing[:4])}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(sub[k].shape)]
        if bad:
            raise AdapterFormatError(f"the SigLIP pooling head's {PREFIX + bad[0]} has shape "
                                     f"{tuple(sub[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        head.load_state_dict({k: sub[k].float() for k in own})
        return head.eval().requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) final hidden states -> (B, D) pooled output."""
        hidden = hidden.to(self.probe.dtype)
        probe = self.probe.expand(hidden.shape[0], -1, -1)
        x = self.attention(probe, hidden, hidden, need_weights=False)[0]
        x = x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layernorm(x)), approximate="tanh"))
        return x[:, 0]
