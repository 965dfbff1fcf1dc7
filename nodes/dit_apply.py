"""Applying a DiT adapter (Flux, Chroma, SD3.5): checks, image tokens, the K/V policy and the
install on the model's dit blocks. The apply node calls `apply_dit_adapter` when the adapter
or the model is a DiT; everything is checked before the model is cloned."""
from __future__ import annotations

from typing import Optional

import torch

from .dit_patch import install_dit
from .dit_sites import DitModel, dit_model, is_dit, unsupported_dit_message
from .prompt import ImagePrompt
from .schedules import resolve_dit_weights

_FAMILY = {"xlabs": "XLabs Flux IP-Adapter", "instantx-flux": "InstantX Flux IP-Adapter",
           "instantx-sd3": "InstantX SD3.5 IP-Adapter"}
_ARCH = {"flux": "Flux or Chroma", "sd3": "SD3.5"}
_EXAMPLE = {"flux": "an XLabs or InstantX Flux IP-Adapter", "sd3": "the InstantX SD3.5-Large IP-Adapter"}


def adapter_name(spec) -> str:
    return _FAMILY.get(spec.injection, "IP-Adapter")


def check_architecture(spec, diffusion_model) -> Optional[DitModel]:
    """Raise a ValueError when adapter and model are of different architectures; the DiT's
    blocks when both are DiTs (None for UNets)."""
    dit = is_dit(diffusion_model)
    if spec.architecture == "unet":
        if dit:
            try:
                model = dit_model(diffusion_model).describe()
            except ValueError as e:
                raise ValueError(f"this IP-Adapter is made for SD1.5/SDXL UNets; {e}") from None
            raise ValueError(f"this IP-Adapter is made for SD1.5/SDXL UNets, but the model is {model}; use "
                             f"{_EXAMPLE['flux' if 'Flux' in model or 'Chroma' in model else 'sd3']} with it")
        return None
    if not dit:
        raise ValueError(f"this is an {adapter_name(spec)} (for {_ARCH.get(spec.architecture, spec.architecture)}), but "
                         "the model is a UNet (SD1.5/SDXL); use an SD1.5 or SDXL IP-Adapter with it")
    try:
        model = dit_model(diffusion_model)
    except ValueError as e:
        raise ValueError(f"this {adapter_name(spec)} cannot be used here: {e}") from None
    if model.architecture != spec.architecture:
        raise ValueError(f"this is an {adapter_name(spec)} (for {_ARCH[spec.architecture]}), but the model is "
                         f"{model.describe()}; use {_EXAMPLE[model.architecture]} with it")
    return model


def bind_to_model(spec, model: DitModel):
    """The spec with its layers on this model's blocks. InstantX Flux files store one list of
    layers (doubles first) without saying where the doubles end: a file with one layer per
    block of the model is bound to the model's own double/single counts."""
    if spec.injection != "instantx-flux":
        return spec
    from ..models.dit_families import with_dit_blocks

    double = sum(s.block == "double" for s in model.blocks)
    single = sum(s.block == "single" for s in model.blocks)
    if spec.num_layers != double + single:
        return spec  # check_dit_fits names the mismatch
    return with_dit_blocks(spec, double, single)


def check_dit_fits(spec, model: DitModel) -> None:
    """Every block the adapter names exists, with the width its K/V make."""
    keys = {s.key for s in model.blocks}
    missing = [tuple(k) for k in spec.layer_blocks if tuple(k) not in keys]
    problem = None
    if missing:
        problem = (f"the adapter has layers for {len(spec.layer_blocks)} blocks up to {'/'.join(map(str, missing[-1]))}, "
                   f"which the model does not have")
    else:
        for i, key in enumerate(spec.layer_blocks):
            site = model.site(tuple(key))
            if spec.layer_dims[i] != site.width:
                problem = (f"layer {i} ({key[0]} {key[1]}) makes K/V of width {spec.layer_dims[i]} but the model's "
                           f"attention is {site.width} wide")
                break
            if site.width % site.heads:
                problem = f"the model's width {site.width} does not split into its {site.heads} heads"
                break
            if site.block not in _kinds(spec):
                problem = f"the adapter has a layer on a {site.block} block, which its family never patches"
                break
    if problem:
        raise ValueError(f"this {adapter_name(spec)} does not fit the model: {problem}. The model is "
                         f"{model.describe()}. Use an adapter trained for this model (the published Flux adapters "
                         f"fit FLUX.1-dev/schnell-sized models, the SD3.5 one fits SD3.5-Large).")


def _kinds(spec):
    from .dit_patch import INJECTIONS
    return INJECTIONS[spec.injection].kinds


def dit_kv_fn(heads: int):
    """kv_fn for ImagePrompt: the adapter's K/V of one layer for the positive and negative rows.

    For time-conditioned adapters the prompt holds encoder outputs and the projection runs
    once per step (cached in the prompt's run cache), not once per block."""

    def kv(prompt: ImagePrompt, layer: int, step: Optional[float]):
        weights = prompt.weights
        rows = _projected_rows(prompt, step)
        ks, vs = [], []
        for projected in rows:
            k, v = weights.layer_kv(layer, projected, heads)
            ks.append(k.reshape(-1, k.shape[-1]))
            vs.append(v.reshape(-1, v.shape[-1]))
        return torch.stack(ks), torch.stack(vs)

    return kv


def _projected_rows(prompt: ImagePrompt, step: Optional[float]):
    from ..models.dit_adapter import Projected

    weights = prompt.weights
    if not weights.spec.time_conditioned:
        return [Projected(row, None) for row in prompt.tokens]
    if step is None:
        raise RuntimeError("this adapter's tokens depend on the timestep, which this call did not pass")
    key = ("projected", step)
    hit = prompt._cache.get(key)
    if hit is None:
        for old in [k for k in prompt._cache if k[0] == "projected"]:
            del prompt._cache[old]
        p = next(weights.parameters())
        hit = []
        for row in prompt.tokens:  # encoder outputs (N, L, E)
            t = torch.full((row.shape[0],), float(step), device=p.device, dtype=p.dtype)
            hit.append(weights.project(row.to(p.device, p.dtype), t))
        prompt._cache[key] = hit
    return hit


def dit_tokens(weights, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(2, N, T, C) image tokens, or for time-conditioned adapters the (2, N, L, E) encoder
    outputs the per-step projection reads."""
    from ..models.encoding import check_embeds

    p = next(weights.parameters())
    pos, neg = pos.to(p.device, p.dtype), neg.to(p.device, p.dtype)
    if weights.spec.time_conditioned:
        return torch.stack([pos, neg])
    with torch.no_grad():
        tokens = torch.stack([weights.project(pos).tokens, weights.project(neg).tokens])
    check_embeds(tokens, "image tokens")
    return tokens


def dit_prompt(spec, model: DitModel, adapter, pos, neg, weight, weight_type, layer_weights,
               sigma_start, sigma_end, window, mask, embeds_scaling: str) -> ImagePrompt:
    """spec: the adapter's spec bound to the model (bind_to_model)."""
    if embeds_scaling != "V only":
        raise ValueError(f"embeds_scaling {embeds_scaling!r} scales the K/V of UNet adapters; DiT adapters take "
                         "'V only' (their weight scales the term, as their reference code does)")
    layer_sites = [model.site(tuple(k)) for k in spec.layer_blocks]
    site_weights = resolve_dit_weights(layer_sites, model.blocks, weight_type, weight, layer_weights)
    tokens = dit_tokens(adapter.weights, pos, neg)
    return ImagePrompt(adapter.weights, tokens, site_weights, sigma_start, sigma_end, "V only", mask=mask,
                       window=window, kv_fn=dit_kv_fn(model.heads), per_step=spec.time_conditioned)


def sd3_block_norms(diffusion_model):
    """key -> the joint block's (ln_q, ln_k) for the SD3 injection; refuses qk norms it cannot
    convert into the adapter's (LayerNorm, or RMS gains with zeros)."""
    def norms(key):
        attn = diffusion_model.joint_blocks[key[1]].x_block.attn
        return attn.ln_q, attn.ln_k

    for i, block in enumerate(diffusion_model.joint_blocks):
        for name in ("ln_q", "ln_k"):
            m = getattr(block.x_block.attn, name)
            if isinstance(m, torch.nn.Identity):
                continue
            if not (hasattr(m, "learnable_scale") and hasattr(m, "eps")):
                raise ValueError(f"joint block {i} normalises q/k with {type(m).__name__}; the SD3.5 IP-Adapter works "
                                 "with SD3.5 models, whose q/k norms are RMS norms")
            w = getattr(m, "weight", None)
            if w is not None and bool((w == 0).any()):
                raise ValueError(f"joint block {i}'s {name} has zero gains; the model file looks damaged")
    return norms


def install_dit_prompt(patched, model: DitModel, spec, prompt: ImagePrompt, diffusion_model) -> None:
    norms = sd3_block_norms(diffusion_model) if spec.injection == "instantx-sd3" else None
    patched.model_options["transformer_options"] = install_dit(patched.model_options, model, spec, prompt, norms)


__all__ = ["bind_to_model", "check_architecture", "check_dit_fits", "dit_prompt", "install_dit_prompt", "unsupported_dit_message"]
