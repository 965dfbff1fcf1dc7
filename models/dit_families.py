"""Image-prompt adapters for DiT models (Flux, SD3.5): recognising them from key names and shapes.

Three families are known (facts and their sources: the README, "DiT adapters"):

- ``xlabs``: XLabs Flux IP-Adapter v1/v2. A linear projection of CLIP ViT-L ``image_embeds`` to 4 or 16
  tokens; K/V with bias in the 19 double blocks.
- ``instantx-flux``: InstantX FLUX.1-dev-IP-Adapter. An MLP from SigLIP's pooled output to 128 tokens;
  bias-free K/V in 19 double then 38 single blocks; K RMS-normed per head.
- ``instantx-sd3``: InstantX SD3.5-Large IP-Adapter. A timestep-conditioned resampler over SigLIP's
  penultimate states; per joint block an AdaLN of the tokens, K/V and three per-head RMS norms.

Several key layouts circulate for the same tensors (XLabs' own names, diffusers' conversion, mixes of the
two, diffusers' renamed resampler). Every one is converted here to ONE canonical flat layout, the state
dict of models.dit_adapter.DiTAdapterWeights; detection then works on that layout only."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

import torch

from .families import HEAD_DIM, AdapterSpec, check_layout, resampler_layer_shapes
from .loading import AdapterFormatError, _example_list, flatten_state

__all__ = [
    "DIT_FAMILY_NAMES",
    "DIT_INJECTIONS",
    "canonical_dit_state",
    "describe_dit",
    "detect_dit_family",
    "dit_family_of",
    "expected_dit_shapes",
    "flux_instantx_split",
    "with_dit_blocks",
]

DIT_INJECTIONS = ("xlabs", "instantx-flux", "instantx-sd3")

DIT_FAMILY_NAMES = {
    "xlabs": "XLabs Flux IP-Adapter",
    "instantx-flux": "InstantX Flux IP-Adapter",
    "instantx-sd3": "InstantX SD3.5 IP-Adapter",
}
_ARCH_NAMES = {"flux": "Flux", "sd3": "SD3.5"}

# The published files: XLabs 19 double blocks (Flux.1), InstantX 19 + 38 (Flux.1), SD3.5-Large 38 joint blocks.
_PUBLISHED_LAYERS = {"xlabs": 19, "instantx-flux": 57, "instantx-sd3": 38}

_CLIP_IMAGE_EMBEDS = {768: "CLIP ViT-L/14", 1024: "CLIP ViT-H/14", 1280: "CLIP ViT-bigG/14"}
_SIGLIP = {1152: "SigLIP so400m-patch14-384", 768: "SigLIP base", 1024: "SigLIP large"}

# Wrappers a whole-model export puts in front of every key (a file saved from a patched host model).
_WRAPPERS = ("model.diffusion_model.", "diffusion_model.")

_XLABS_PROJ = "ip_adapter_proj_model."
# XLabs' own layer keys; x-flux-comfyui's ModuleList drops the ".processor" part.
_XLABS_LAYER = re.compile(r"^double_blocks\.(\d+)\.(?:processor\.)?ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
_XLABS_SINGLE = re.compile(r"^single_blocks\.\d+\.(?:processor\.)?ip_adapter_single_stream_")
_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(.+)$")

# diffusers renames the SD3.5 resampler's per-layer modules on load (loaders/transformer_sd3.py); a file
# saved from a diffusers pipeline carries those names. Canonical = the InstantX checkpoint's names.
_SD3_DIFFUSERS_RESAMPLER = (
    ("ln0.", "0.norm1."),
    ("ln1.", "0.norm2."),
    ("attn.to_q.", "0.to_q."),
    ("attn.to_kv.", "0.to_kv."),
    ("attn.to_out.0.", "0.to_out."),
    ("adaln_norm.", "1.0."),
    ("ff.net.0.proj.", "1.1."),
    ("ff.net.2.", "1.3."),
    ("adaln_proj.", "2.1."),
)
_RESAMPLER_LAYER = re.compile(r"^image_proj\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------
# Key layouts -> canonical


def _flat(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise AdapterFormatError(f"expected a dictionary of weights, got a {type(state).__name__}")
    flat = flatten_state(state)
    # group_state's alias: early training scripts saved the layers as `adapter_modules`
    return {("ip_adapter." + k[len("adapter_modules."):] if k.startswith("adapter_modules.") else k): v
            for k, v in flat.items()}


def _strip_wrapper(flat: dict[str, Any]) -> dict[str, Any]:
    for w in _WRAPPERS:
        if flat and all(k.startswith(w) for k in flat):
            return {k[len(w):]: v for k, v in flat.items()}
    return flat


def dit_family_of(state: Mapping[str, Any]) -> Optional[str]:
    """"xlabs" / "instantx-flux" / "instantx-sd3" when the keys say DiT adapter, else None.

    UNet adapters number their layers 1, 3, 5, ... without bias or norms, so a layer 0, a K/V bias,
    an AdaLN or an XLabs name can only come from a DiT adapter."""
    try:
        flat = _strip_wrapper(_flat(state))
    except AdapterFormatError:
        return None
    keys = list(flat)
    if any("ip_adapter_double_stream" in k or "ip_adapter_single_stream" in k or k.startswith(_XLABS_PROJ)
           for k in keys):
        return "xlabs"
    layer_parts = [m.group(2) for m in map(_LAYER.match, keys) if m]
    if any(p.startswith("norm_ip.") or p.startswith("norm_ip_k.") for p in layer_parts) or any(
            k.startswith("image_proj.time_embedding.") for k in keys):
        return "instantx-sd3"
    if any(p in ("to_k_ip.bias", "to_v_ip.bias") for p in layer_parts):
        return "xlabs"
    # FaceID files share the MLP projection but number their K/V 1, 3, ... and carry LoRA keys
    has_layer0 = "ip_adapter.0.to_k_ip.weight" in flat and not any("_lora." in k for k in keys)
    if has_layer0 and "image_proj.proj.2.weight" in flat and "image_proj.proj.3.weight" not in flat:
        return "instantx-flux"
    return None


def _xlabs_canonical(flat: dict[str, Any]) -> dict[str, Any]:
    singles = [k for k in flat if _XLABS_SINGLE.match(k)]
    if singles:
        raise AdapterFormatError(
            f"this XLabs-style file holds single-block IP weights ({_example_list(singles, 2)}); the published XLabs "
            "Flux IP-Adapters (v1, v2) have double-block weights only, and this pack does not know this variant")
    out = {}
    for k, v in flat.items():
        m = _XLABS_LAYER.match(k)
        if m:
            k = f"ip_adapter.{m.group(1)}.to_{m.group(2)}_ip.{m.group(3)}"
        elif k.startswith(_XLABS_PROJ):
            k = "image_proj." + k[len(_XLABS_PROJ):]
        if k in out:
            raise AdapterFormatError(f"the weight {k!r} appears twice (under its XLabs and its diffusers name)")
        out[k] = v
    return out


def _sd3_canonical(flat: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in flat.items():
        m = _RESAMPLER_LAYER.match(k)
        if m:
            rest = m.group(2)
            for old, new in _SD3_DIFFUSERS_RESAMPLER:
                if rest.startswith(old):
                    k = f"image_proj.layers.{m.group(1)}.{new}{rest[len(old):]}"
                    break
        if k in out:
            raise AdapterFormatError(f"the weight {k!r} appears twice (under its InstantX and its diffusers name)")
        out[k] = v
    return out


def canonical_dit_state(state: Mapping[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    """(family, flat state with canonical keys) for any circulating layout of a DiT adapter."""
    flat = _strip_wrapper(_flat(state))
    family = dit_family_of(flat)
    if family is None:
        raise AdapterFormatError(
            f"found keys like {_example_list(sorted(flat)[:3], 3)}; this is not a Flux (XLabs, InstantX) or "
            "SD3.5 (InstantX) IP-Adapter")
    if family == "xlabs":
        flat = _xlabs_canonical(flat)
    elif family == "instantx-sd3":
        flat = _sd3_canonical(flat)
    return family, flat


# ---------------------------------------------------------------------------------------
# Shapes


def expected_dit_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Canonical flat key -> shape of every tensor a DiT adapter of this spec holds."""
    c, e, t = spec.context_dim, spec.encoder_width, spec.tokens
    out: dict[str, tuple[int, ...]] = {}
    p = "image_proj."
    if spec.injection == "xlabs":
        out.update({p + "proj.weight": (t * c, e), p + "proj.bias": (t * c,),
                    p + "norm.weight": (c,), p + "norm.bias": (c,)})
        for i, w in enumerate(spec.layer_dims):
            for kv in ("k", "v"):
                out[f"ip_adapter.{i}.to_{kv}_ip.weight"] = (w, c)
                out[f"ip_adapter.{i}.to_{kv}_ip.bias"] = (w,)
    elif spec.injection == "instantx-flux":
        h = spec.proj_hidden_dim
        out.update({p + "proj.0.weight": (h, e), p + "proj.0.bias": (h,),
                    p + "proj.2.weight": (t * c, h), p + "proj.2.bias": (t * c,),
                    p + "norm.weight": (c,), p + "norm.bias": (c,)})
        for i, w in enumerate(spec.layer_dims):
            out[f"ip_adapter.{i}.to_k_ip.weight"] = (w, c)
            out[f"ip_adapter.{i}.to_v_ip.weight"] = (w, c)
    elif spec.injection == "instantx-sd3":
        d, f, ti = spec.resampler_dim, spec.resampler_ff_dim, spec.time_embed_in
        inner = spec.resampler_heads * HEAD_DIM
        out.update({p + "latents": (1, t, d), p + "proj_in.weight": (d, e), p + "proj_in.bias": (d,),
                    p + "proj_out.weight": (c, d), p + "proj_out.bias": (c,),
                    p + "norm_out.weight": (c,), p + "norm_out.bias": (c,),
                    p + "time_embedding.linear_1.weight": (d, ti), p + "time_embedding.linear_1.bias": (d,),
                    p + "time_embedding.linear_2.weight": (d, d), p + "time_embedding.linear_2.bias": (d,)})
        for i in range(spec.resampler_depth):
            ada = f"{p}layers.{i}.2.1."
            out.update(resampler_layer_shapes(f"{p}layers.{i}.", d, inner, f))
            out[ada + "weight"] = (4 * d, d)
            out[ada + "bias"] = (4 * d,)
        hd = spec.ip_head_dim
        for i, w in enumerate(spec.layer_dims):
            q = f"ip_adapter.{i}."
            out[q + "norm_ip.linear.weight"] = (2 * c, d)
            out[q + "norm_ip.linear.bias"] = (2 * c,)
            out[q + "to_k_ip.weight"] = (w, c)
            out[q + "to_v_ip.weight"] = (w, c)
            for norm in ("norm_q", "norm_k", "norm_ip_k"):
                out[q + norm + ".weight"] = (hd,)
    else:
        raise ValueError(f"not a DiT adapter spec: injection {spec.injection!r}; expected one of {DIT_INJECTIONS}")
    return out


# ---------------------------------------------------------------------------------------
# Detection


def _need(flat: Mapping[str, torch.Tensor], key: str, ndim: int, family: str) -> torch.Tensor:
    t = flat.get(key)
    if t is None:
        near = sorted(k for k in flat if k.split(".")[0] == key.split(".")[0])
        raise AdapterFormatError(
            f"{key} is missing; a {DIT_FAMILY_NAMES[family]} needs it (found keys like {_example_list(near[:4], 4)}). "
            "The file is incomplete or of another family.")
    if t.dim() != ndim:
        raise AdapterFormatError(f"{key} has shape {tuple(t.shape)}; expected a {ndim}-d tensor. The file is damaged.")
    return t


def _layer_indices(flat: Mapping[str, torch.Tensor], family: str) -> list[int]:
    """The layer numbers 0..n-1, after checking that they are consecutive from 0 with both K and V."""
    found: dict[int, set[str]] = {}
    for k in flat:
        m = _LAYER.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not found:
        raise AdapterFormatError(f"the file holds no per-block K/V weights ('ip_adapter.N.to_k_ip.weight'); a "
                                 f"{DIT_FAMILY_NAMES[family]} needs one pair per block. The file is incomplete.")
    idx = sorted(found)
    missing = sorted(set(range(idx[-1] + 1)) - set(idx))
    if missing:
        raise AdapterFormatError(
            f"per-block weights have gaps: {len(idx)} blocks numbered up to {idx[-1]}, but "
            f"{_example_list(missing, 6)} are missing; a {DIT_FAMILY_NAMES[family]} has one entry per block, numbered "
            "0, 1, 2, .... The file is damaged or was edited.")
    for i in idx:
        for kv in ("k", "v"):
            if f"to_{kv}_ip.weight" not in found[i]:
                raise AdapterFormatError(
                    f"block {i}: to_{kv}_ip.weight is missing; every block needs both K and V weights. "
                    "The file is damaged.")
    return idx


def _layer_widths(flat, n: int, context: int, family: str) -> tuple[int, ...]:
    widths = []
    for i in range(n):
        k = _need(flat, f"ip_adapter.{i}.to_k_ip.weight", 2, family)
        v = _need(flat, f"ip_adapter.{i}.to_v_ip.weight", 2, family)
        if k.shape != v.shape:
            raise AdapterFormatError(f"block {i}: to_k_ip is {tuple(k.shape)} but to_v_ip is {tuple(v.shape)}; "
                                     "K and V of one block have the same shape. The file is damaged.")
        if k.shape[1] != context:
            raise AdapterFormatError(
                f"block {i}: to_k_ip reads width {k.shape[1]}, but the projection makes tokens of width {context}; "
                "the projection and the block weights do not belong together")
        widths.append(int(k.shape[0]))
    return tuple(widths)


def _tokens_from(rows: int, width: int, key: str) -> int:
    if width <= 0 or rows % width:
        raise AdapterFormatError(f"{key} has {rows} rows, not a multiple of the token width {width} (the projection's "
                                 "LayerNorm); the file is damaged")
    return rows // width


def flux_instantx_split(n: int) -> tuple[int, int]:
    """(double, single) blocks for an InstantX Flux file of n layers: single = 2 x (n // 3), double = the rest.

    The file stores the layers as one list (doubles first), so the split is not in the keys; Flux keeps
    single = 2 x double (19 + 38 = 57), which this rule reproduces. with_dit_blocks rebinds to other counts."""
    single = 2 * (n // 3)
    return n - single, single


def _blocks(double: int, single: int = 0) -> tuple[tuple[str, int], ...]:
    return tuple(("double_block", i) for i in range(double)) + tuple(("single_block", i) for i in range(single))


def with_dit_blocks(spec: AdapterSpec, double_blocks: int, single_blocks: int = 0) -> AdapterSpec:
    """The spec with its layers bound to a host model of `double_blocks` double (SD3: joint) blocks and
    `single_blocks` single blocks, in the adapter's layer order; clear error when the counts cannot fit."""
    n = spec.num_layers
    if spec.injection == "instantx-flux":
        if double_blocks + single_blocks != n:
            d, s = flux_instantx_split(n)
            raise AdapterFormatError(
                f"this {DIT_FAMILY_NAMES[spec.injection]} has {n} blocks of weights ({d} double + {s} single as "
                f"published), but the model has {double_blocks} double + {single_blocks} single blocks")
        return replace(spec, layer_blocks=_blocks(double_blocks, single_blocks))
    if single_blocks:
        raise ValueError(f"a {DIT_FAMILY_NAMES.get(spec.injection, spec.injection)} uses double/joint blocks only")
    if double_blocks < n:
        raise AdapterFormatError(
            f"this {DIT_FAMILY_NAMES.get(spec.injection, spec.injection)} has weights for {n} blocks, but the model "
            f"has only {double_blocks}; it was made for a larger model")
    return replace(spec, layer_blocks=_blocks(n))


def _check_canonical(flat: Mapping[str, torch.Tensor], spec: AdapterSpec) -> None:
    check_layout(flat, expected_dit_shapes(spec), f"a {DIT_FAMILY_NAMES[spec.injection]}")


def _detect_xlabs(flat) -> AdapterSpec:
    f = "xlabs"
    norm = _need(flat, "image_proj.norm.weight", 1, f)
    proj = _need(flat, "image_proj.proj.weight", 2, f)
    c = int(norm.shape[0])
    tokens = _tokens_from(int(proj.shape[0]), c, "the projection weight (ip_adapter_proj_model.proj.weight)")
    e = int(proj.shape[1])
    n = len(_layer_indices(flat, f))
    return AdapterSpec(
        layout="xlabs", tokens=tokens, context_dim=c, encoder_width=e, encoder_input="image_embeds",
        encoder_name=_CLIP_IMAGE_EMBEDS.get(e, f"CLIP vision of width {e}"), num_layers=n,
        layer_dims=_layer_widths(flat, n, c, f), arch_hint="flux", architecture="flux", injection=f,
        layer_blocks=_blocks(n), encoder_kind="clip")


def _detect_instantx_flux(flat) -> AdapterSpec:
    f = "instantx-flux"
    first = _need(flat, "image_proj.proj.0.weight", 2, f)
    second = _need(flat, "image_proj.proj.2.weight", 2, f)
    norm = _need(flat, "image_proj.norm.weight", 1, f)
    c = int(norm.shape[0])
    tokens = _tokens_from(int(second.shape[0]), c, "image_proj.proj.2.weight")
    e = int(first.shape[1])
    n = len(_layer_indices(flat, f))
    return AdapterSpec(
        layout="instantx-flux", tokens=tokens, context_dim=c, encoder_width=e, encoder_input="pooled",
        encoder_name=_SIGLIP.get(e, f"SigLIP vision of width {e}"), num_layers=n,
        layer_dims=_layer_widths(flat, n, c, f), arch_hint="flux", architecture="flux", injection=f,
        layer_blocks=_blocks(*flux_instantx_split(n)), encoder_kind="siglip",
        proj_hidden_dim=int(first.shape[0]))


def _detect_instantx_sd3(flat) -> AdapterSpec:
    f = "instantx-sd3"
    latents = _need(flat, "image_proj.latents", 3, f)
    proj_in = _need(flat, "image_proj.proj_in.weight", 2, f)
    proj_out = _need(flat, "image_proj.proj_out.weight", 2, f)
    lin1 = _need(flat, "image_proj.time_embedding.linear_1.weight", 2, f)
    depth = len({k.split(".")[2] for k in flat if k.startswith("image_proj.layers.")})
    if depth == 0:
        raise AdapterFormatError("the resampler has no 'image_proj.layers.*' weights; the file is damaged")
    to_q = _need(flat, "image_proj.layers.0.0.to_q.weight", 2, f)
    ff = _need(flat, "image_proj.layers.0.1.1.weight", 2, f)
    if to_q.shape[0] % HEAD_DIM:
        raise AdapterFormatError(f"image_proj.layers.0.0.to_q.weight has {to_q.shape[0]} rows, not a multiple of the "
                                 f"resampler's head width {HEAD_DIM}; this resampler variant is not supported")
    c = int(proj_out.shape[0])
    n = len(_layer_indices(flat, f))
    norm_q = _need(flat, "ip_adapter.0.norm_q.weight", 1, f)
    e = int(proj_in.shape[1])
    spec = AdapterSpec(
        layout="instantx-sd3", tokens=int(latents.shape[1]), context_dim=c, encoder_width=e,
        encoder_input="penultimate", encoder_name=_SIGLIP.get(e, f"SigLIP vision of width {e}"), num_layers=n,
        layer_dims=_layer_widths(flat, n, c, f), arch_hint="sd3", resampler_dim=int(latents.shape[2]),
        resampler_heads=int(to_q.shape[0] // HEAD_DIM), resampler_depth=depth, resampler_ff_dim=int(ff.shape[0]),
        architecture="sd3", injection=f, layer_blocks=_blocks(n), encoder_kind="siglip", time_conditioned=True,
        ip_head_dim=int(norm_q.shape[0]), time_embed_in=int(lin1.shape[1]))
    bad = [i for i, w in enumerate(spec.layer_dims) if w % spec.ip_head_dim]
    if bad:
        raise AdapterFormatError(
            f"block {bad[0]}: K/V width {spec.layer_dims[bad[0]]} is not a multiple of the per-head norm width "
            f"{spec.ip_head_dim} (norm_q); the file is damaged")
    return spec


_DETECTORS = {"xlabs": _detect_xlabs, "instantx-flux": _detect_instantx_flux, "instantx-sd3": _detect_instantx_sd3}


def detect_dit_spec_and_state(state: Mapping[str, Any]) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """(spec, canonical flat state) of a DiT adapter in any circulating layout; AdapterFormatError otherwise."""
    family, flat = canonical_dit_state(state)
    if not flat:
        raise AdapterFormatError("the file holds no weights")
    spec = _DETECTORS[family](flat)
    _check_canonical(flat, spec)
    return spec, flat


def detect_dit_family(state: Mapping[str, Any]) -> AdapterSpec:
    """The AdapterSpec of a DiT adapter (grouped, nested or flat state; any circulating key layout),
    from key names and shapes only."""
    return detect_dit_spec_and_state(state)[0]


def describe_dit(spec: AdapterSpec) -> str:
    what = {"image_embeds": "image_embeds", "pooled": "pooled output",
            "penultimate": "penultimate hidden states"}[spec.encoder_input]
    doubles = sum(1 for b, _ in spec.layer_blocks if b == "double_block")
    singles = len(spec.layer_blocks) - doubles
    where = (f"{doubles} joint blocks" if spec.architecture == "sd3"
             else f"{doubles} double" + (f" + {singles} single" if singles else "") + " blocks")
    text = (f"{DIT_FAMILY_NAMES[spec.injection]} for {_ARCH_NAMES.get(spec.architecture, spec.architecture)}: "
            f"{spec.tokens} image tokens from {spec.encoder_name} {what} (width {spec.encoder_width})")
    if spec.time_conditioned:
        text += (f", timestep-conditioned resampler width {spec.resampler_dim} x {spec.resampler_depth} layers, "
                 f"{spec.resampler_heads} heads")
    widths = sorted(set(spec.layer_dims))
    text += f"; {where}, token width {spec.context_dim}, K/V width {'/'.join(map(str, widths))}"
    published = _PUBLISHED_LAYERS[spec.injection]
    if spec.num_layers != published:
        text += f" (the published file has {published} blocks)"
    return text
