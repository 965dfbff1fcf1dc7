"""A DiT image-prompt adapter (Flux XLabs, Flux InstantX, SD3.5 InstantX) as one plain torch module.

All weights are parameters of one nn.Module whose state dict has the canonical keys of
models/dit_families.py, whatever layout the file used; the host's ModelPatcher moves it between devices.
The node layer asks it for two things: image tokens (`project`, once per run, or once per step when the
resampler is time-conditioned) and each block's K/V (`layer_kv`), norms and bias already applied."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import adopt_state
from .dit_families import describe_dit, detect_dit_spec_and_state
from .dit_projections import build_dit_projection
from .families import AdapterSpec

__all__ = ["DiTAdapterWeights", "Projected", "FLUX_K_NORM_EPS", "SD3_NORM_EPS", "SD3_ADALN_EPS"]

# InstantX Flux: RMSNorm(head_dim, eps=1e-5, no affine) on the ip keys (their attention_processor.py).
FLUX_K_NORM_EPS = 1e-5
# InstantX SD3.5: RMSNorm(head_dim, eps=1e-6) for norm_q / norm_k / norm_ip_k; LayerNorm eps 1e-6 in the AdaLN.
SD3_NORM_EPS = 1e-6
SD3_ADALN_EPS = 1e-6


class Projected(NamedTuple):
    """Image tokens (N, T, C) and, for time-conditioned adapters, the resampler's time embedding (N, D)."""
    tokens: torch.Tensor
    time_emb: Optional[torch.Tensor] = None


def _rms_per_head(x: torch.Tensor, head_dim: int, eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMS-normalise every head_dim-wide slice of the last dim (computed in fp32), times `weight` if given."""
    shape = x.shape
    h = x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim).float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = h * weight.float()
    return h.reshape(shape).to(x.dtype)


class _KV(nn.Module):
    """One block's K/V projections (names as the canonical `ip_adapter.N.*` keys)."""

    def __init__(self, context_dim: int, width: int, bias: bool):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=bias)
        self.to_v_ip = nn.Linear(context_dim, width, bias=bias)


class _HeadNorm(nn.Module):
    """Holds a per-head RMSNorm gain as `.weight`; the norm itself is _rms_per_head."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))


class _AdaLN(nn.Module):
    def __init__(self, time_dim: int, width: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * width)


class _SD3KV(_KV):
    """SD3.5 InstantX block: AdaLN of the tokens from the time embedding, K/V, and the three per-head
    norms of the extra attention (its query, the image keys, the ip keys)."""

    def __init__(self, context_dim: int, width: int, head_dim: int, time_dim: int):
        super().__init__(context_dim, width, bias=False)
        self.norm_ip = _AdaLN(time_dim, context_dim)
        self.norm_q = _HeadNorm(head_dim)
        self.norm_k = _HeadNorm(head_dim)
        self.norm_ip_k = _HeadNorm(head_dim)


def _layer_module(spec: AdapterSpec, width: int) -> nn.Module:
    if spec.injection == "xlabs":
        return _KV(spec.context_dim, width, bias=True)
    if spec.injection == "instantx-flux":
        return _KV(spec.context_dim, width, bias=False)
    return _SD3KV(spec.context_dim, width, spec.ip_head_dim, spec.resampler_dim)


class DiTAdapterWeights(nn.Module):
    """Projection network + per-block K/V weights of one DiT adapter.

    Layer i is bound to the host block spec.layer_blocks[i] (("double_block", n) / ("single_block", n))."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.image_proj = build_dit_projection(spec)
        self.ip_adapter = nn.ModuleDict({str(i): _layer_module(spec, w) for i, w in enumerate(spec.layer_dims)})

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "DiTAdapterWeights":
        """Convert any circulating layout (grouped, nested or flat) to the canonical keys, detect the family
        and load strictly. The checkpoint tensors become the parameters; mixed float dtypes go to float32."""
        spec, flat = detect_dit_spec_and_state(state)
        with torch.device("meta"):
            module = cls(spec)
        return adopt_state(module, flat, describe_dit(spec))

    # -- use ----------------------------------------------------------------------------

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def _check_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        want = 3 if spec.encoder_input == "penultimate" else 2
        if embeds.dim() == want - 1:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() != want or embeds.shape[-1] != spec.encoder_width:
            shape = "(N, tokens, E)" if want == 3 else "(N, E)"
            what = {"image_embeds": "image_embeds", "pooled": "pooled output",
                    "penultimate": "penultimate hidden states"}[spec.encoder_input]
            raise ValueError(
                f"this {describe_dit(spec).split(':')[0]} expects {spec.encoder_name} {what} of shape {shape} with "
                f"E = {spec.encoder_width}, got a tensor of shape {tuple(embeds.shape)}")
        p = self._param()
        return embeds.to(device=p.device, dtype=p.dtype)

    def _timesteps(self, timestep: Union[torch.Tensor, float, None], n: int, device) -> torch.Tensor:
        if timestep is None:
            raise ValueError(
                "this adapter's resampler is timestep-conditioned: project() needs the timestep (the scheduler's "
                "t in [0, 1000], i.e. 1000 x sigma for SD3's flow schedule)")
        t = torch.as_tensor(timestep, dtype=torch.float32, device=device).flatten()
        if t.numel() == 1:
            return t.expand(n)
        if t.numel() != n:
            raise ValueError(f"timestep has {t.numel()} values for {n} image embeddings; pass one value or one per embedding")
        return t

    def project(self, embeds: torch.Tensor, timestep: Union[torch.Tensor, float, None] = None) -> Projected:
        """Encoder output -> Projected(tokens (N, T, C), time_emb).

        embeds: (N, E) image_embeds (XLabs) or pooled output (InstantX Flux); (N, L, E) penultimate states
        (SD3.5). A missing batch dim is added. timestep (SD3.5 only, ignored otherwise): a scalar or (N,)
        in the reference pipeline's convention, the scheduler timestep t = 1000 x sigma in [0, 1000]."""
        x = self._check_embeds(embeds)
        if not self.spec.time_conditioned:
            return Projected(self.image_proj(x), None)
        tokens, temb = self.image_proj(x, self._timesteps(timestep, x.shape[0], x.device))
        return Projected(tokens, temb)

    def _layer(self, i: int) -> nn.Module:
        if not 0 <= i < self.spec.num_layers:
            raise IndexError(f"layer {i} out of range: this adapter has {self.spec.num_layers} layers")
        return self.ip_adapter[str(i)]

    def _head_dim(self, i: int, heads: int) -> int:
        width = self.spec.layer_dims[i]
        if heads <= 0 or width % heads:
            raise ValueError(f"layer {i}: K/V width {width} does not split into {heads} heads")
        hd = width // heads
        if self.spec.ip_head_dim is not None and hd != self.spec.ip_head_dim:
            raise ValueError(f"layer {i}: {heads} heads of {hd} do not match this adapter's per-head norms of width "
                             f"{self.spec.ip_head_dim}; the adapter was made for a model with "
                             f"{width // self.spec.ip_head_dim} heads")
        return hd

    def layer_kv(self, i: int, projected: Union[Projected, torch.Tensor], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer i, each (B, T, layer_dims[i]), everything the reference applies to them included:
        XLabs: bias. InstantX Flux: K RMS-normed per head (eps 1e-5, no gain), V as is. SD3.5: AdaLN of the
        tokens from the time embedding first, then K RMS-normed per head with norm_ip_k's gain, V as is."""
        layer = self._layer(i)
        head_dim = self._head_dim(i, heads)
        if not isinstance(projected, Projected):
            projected = Projected(projected, None)
        w = layer.to_k_ip.weight  # the layer's own weight decides: partially loaded models span devices
        tokens = projected.tokens
        if tokens.dim() != 3 or tokens.shape[-1] != self.spec.context_dim:
            raise ValueError(f"image tokens must be (B, T, {self.spec.context_dim}); got {tuple(tokens.shape)}")
        tokens = tokens.to(device=w.device, dtype=w.dtype)
        inj = self.spec.injection
        if inj == "instantx-sd3":
            if projected.time_emb is None:
                raise ValueError("SD3.5 InstantX K/V need the resampler's time embedding: pass project()'s result")
            temb = projected.time_emb.to(device=w.device, dtype=w.dtype)
            shift, scale = layer.norm_ip.linear(F.silu(temb)).chunk(2, dim=-1)  # shift first (InstantX order)
            tokens = F.layer_norm(tokens, (tokens.shape[-1],), eps=SD3_ADALN_EPS) * (1 + scale[:, None]) + shift[:, None]
        k = layer.to_k_ip(tokens)
        v = layer.to_v_ip(tokens)
        if inj == "instantx-flux":
            k = _rms_per_head(k, head_dim, FLUX_K_NORM_EPS)
        elif inj == "instantx-sd3":
            k = _rms_per_head(k, head_dim, SD3_NORM_EPS, layer.norm_ip_k.weight)
        return k, v

    def all_layer_kv(self, projected: Union[Projected, torch.Tensor], heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """layer_kv for every layer, in layer order (one call per step for time-conditioned adapters)."""
        return [self.layer_kv(i, projected, heads) for i in range(self.spec.num_layers)]

    def image_qk_norm(self, i: int, q: torch.Tensor, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3.5 InstantX only: the extra attention's query and image keys, from the block's RAW image-stream
        q and k (to_q/to_k output, BEFORE the block's own ln_q/ln_k), normed per head with this layer's
        norm_q / norm_k gains. q, k: (B, L, W) or (B, heads, L, head_dim); returned in the same layout."""
        if self.spec.injection != "instantx-sd3":
            raise ValueError(f"image_qk_norm is for SD3.5 InstantX adapters; this is {self.spec.injection!r}")
        layer = self._layer(i)
        head_dim = self._head_dim(i, heads)
        out = []
        for x, norm in ((q, layer.norm_q), (k, layer.norm_k)):
            if x.shape[-1] not in (head_dim, heads * head_dim):
                raise ValueError(f"expected (B, L, {heads * head_dim}) or (B, {heads}, L, {head_dim}); got {tuple(x.shape)}")
            out.append(_rms_per_head(x, head_dim, SD3_NORM_EPS, norm.weight.to(x.device)))
        return out[0], out[1]

    def describe(self) -> str:
        return describe_dit(self.spec)

    def extra_repr(self) -> str:
        return self.describe()
