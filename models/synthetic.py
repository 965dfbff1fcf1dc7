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
    "DIT_LAYOUTS",
    "dit_adapter_spec",
    "synthetic_dit_adapter_state",
    "save_synthetic_dit_adapter",
    "synthetic_mip_state",
    "save_synthetic_mip_adapter",
    "FACE_KINDS",
    "face_adapter_spec",
    "synthetic_face_state",
    "save_synthetic_face_adapter",
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


def _spec_for(layout, layer_dims, context_dim, encoder_width, tokens, resampler_dim, resampler_heads, depth,
              mip_gate=False):
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
        mip_gate=mip_gate,
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
    mip_gate: bool = False,
) -> dict[str, torch.Tensor]:
    """Flat ``image_proj.*`` / ``ip_adapter.*`` tensors of a random adapter, ready for
    safetensors.save_file. Defaults: 4 tokens (base), 16 (plus); resampler width = context
    width, heads = width // 64 (at least 1), feed-forward 4x. mip_gate adds MIP-Adapter's
    ``ip_adapter.N.text_to_weight.weight`` (1, width) to every layer."""
    spec = _spec_for(layout, layer_dims, context_dim, encoder_width, tokens, resampler_dim,
                     resampler_heads, depth, mip_gate)
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


def write_state(path, state: dict[str, torch.Tensor], nested: bool = True) -> dict[str, torch.Tensor]:
    """.safetensors with flat keys, or a torch pickle (.bin/.pt/.pth) nested like the published
    files (flat with nested=False). Returns `state`."""
    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(nest_state(state) if nested else state, path)
    return state


def save_synthetic_adapter(path, layout: str, layer_dims, context_dim: int, encoder_width: int,
                           *, nested: bool = True, **kwargs) -> dict[str, torch.Tensor]:
    """Write a synthetic adapter: .safetensors with flat keys, or a torch pickle
    (.bin/.pt/.pth) nested like the published files (flat with nested=False).
    Returns the flat state that was written."""
    state = synthetic_adapter_state(layout, layer_dims, context_dim, encoder_width, **kwargs)
    return write_state(path, state, nested)


# ---------------------------------------------------------------------------------------
# MIP-Adapter (SDXL only): an IP-Adapter (base or plus) whose 70 layers each add a gate
# text_to_weight = Linear(width, 1, bias=False). The published model_sdxl.bin / model_sdxl_plus.bin
# are torch pickles nested {"image_proj": ..., "ip_adapter": ...} in float16 (train_sdxl*.py,
# get_state_dict); their encoders: base = CLIP ViT-bigG image_embeds (1280) into 4 tokens,
# plus = CLIP ViT-H penultimate states (1280) through a 4-layer, 20-head, 1280-wide resampler.


def synthetic_mip_state(layout: str = "base", *, model_channels: int = 32, context_dim: int = 2048,
                        encoder_width: int = 1280, resampler_dim: int = HEAD_DIM, resampler_heads: int = 1,
                        depth: int = 1, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Flat tensors of a random MIP-Adapter in the published key layout: SDXL's 70 layers
    (widths sdxl_layer_dims(model_channels)) with K/V and a text_to_weight gate each.

    Defaults fit the tiny SDXL UNets of the tests (model channels 32, context 2048: about 68 MB in
    float16); pass a small context_dim for unit tests that never meet a UNet. The plus resampler
    is tiny (64 wide, 1 head, 1 layer); the published one is 1280 wide, 20 heads, 4 layers."""
    if layout not in ("base", "plus"):
        raise ValueError(f"MIP-Adapter is published as 'base' (model_sdxl.bin) or 'plus' (model_sdxl_plus.bin), "
                         f"not {layout!r}")
    extra = dict(resampler_dim=resampler_dim, resampler_heads=resampler_heads, depth=depth) if layout == "plus" else {}
    return synthetic_adapter_state(layout, sdxl_layer_dims(model_channels), context_dim, encoder_width,
                                   seed=seed, dtype=dtype, mip_gate=True, **extra)


def save_synthetic_mip_adapter(path, layout: str = "base", *, nested: bool = True, **kwargs) -> dict[str, torch.Tensor]:
    """Write a synthetic MIP-Adapter: a torch pickle nested like the published .bin files
    (flat with nested=False), or .safetensors with flat keys. Returns the flat state written."""
    state = synthetic_mip_state(layout, **kwargs)
    return write_state(path, state, nested)


# ---------------------------------------------------------------------------------------
# DiT adapters (Flux XLabs, Flux InstantX, SD3.5 InstantX), tiny by default

# Key layouts a writer can produce, per family (models/dit_families.py says where each one comes from):
#   xlabs:  "xlabs"    XLabs' own file: ip_adapter_proj_model.* + double_blocks.N.processor.ip_adapter_double_stream_*
#           "diffusers" diffusers' conversion: image_proj.* + ip_adapter.N.to_{k,v}_ip.{weight,bias}
#           "mixed"    image_proj.* + double_blocks.N.processor.* (diffusers' loader accepts this mix)
#           "wrapped"  "xlabs" behind a "diffusion_model." prefix (a whole-model export; accepted, not seen published)
#   instantx-flux: "instantx"  image_proj.proj.{0,2}/norm + ip_adapter.N.to_{k,v}_ip (the published ip-adapter.bin)
#   instantx-sd3:  "instantx"  the published ip-adapter.bin; "diffusers": the resampler under diffusers' names
DIT_LAYOUTS = {
    "xlabs": ("xlabs", "diffusers", "mixed", "wrapped"),
    "instantx-flux": ("instantx",),
    "instantx-sd3": ("instantx", "diffusers"),
}

_SD3_TO_DIFFUSERS = (
    ("0.norm1.", "ln0."), ("0.norm2.", "ln1."), ("0.to_q.", "attn.to_q."), ("0.to_kv.", "attn.to_kv."),
    ("0.to_out.", "attn.to_out.0."), ("1.0.", "adaln_norm."), ("1.1.", "ff.net.0.proj."), ("1.3.", "ff.net.2."),
    ("2.1.", "adaln_proj."),
)


def dit_adapter_spec(family: str, *, hidden: int = 64, heads: int = 2, double_blocks: int = 2,
                     single_blocks: int = 2, tokens: Optional[int] = None, context_dim: Optional[int] = None,
                     encoder_width: int = 32, resampler_dim: int = HEAD_DIM, resampler_depth: int = 1,
                     time_embed_in: int = 32) -> AdapterSpec:
    """The spec of a synthetic DiT adapter for a model of width `hidden` (= heads x head dim) with
    `double_blocks` double (SD3: joint) blocks and, for InstantX Flux, `single_blocks` single blocks.

    Defaults are tiny: tokens 4, token width 32 (Flux) or `hidden` (SD3.5, as published), encoder width 32,
    resampler 64 wide (one head of 64), 1 layer, 32 timestep features. InstantX Flux files do not record
    where double blocks end; detection assumes models.dit_families.flux_instantx_split (2+2 for 4 layers,
    19+38 for 57), so pick counts it reproduces or rebind the detected spec with with_dit_blocks."""
    from .dit_families import flux_instantx_split, with_dit_blocks

    if family not in DIT_LAYOUTS:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {tuple(DIT_LAYOUTS)}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} does not split into {heads} heads")
    common = dict(tokens=tokens or 4, encoder_width=encoder_width, encoder_name=f"vision model of width {encoder_width}")
    if family == "xlabs":
        c = context_dim or 32
        return AdapterSpec(layout="xlabs", context_dim=c, encoder_input="image_embeds", num_layers=double_blocks,
                           layer_dims=(hidden,) * double_blocks, arch_hint="flux", architecture="flux",
                           injection="xlabs", layer_blocks=tuple(("double_block", i) for i in range(double_blocks)),
                           **common)
    if family == "instantx-flux":
        n = double_blocks + single_blocks
        c = context_dim or 32
        spec = AdapterSpec(layout="instantx-flux", context_dim=c, encoder_input="pooled", num_layers=n,
                           layer_dims=(hidden,) * n, arch_hint="flux", architecture="flux", injection="instantx-flux",
                           encoder_kind="siglip", proj_hidden_dim=2 * encoder_width, **common)
        return with_dit_blocks(spec, *flux_instantx_split(n))  # what detection will say (see the docstring)
    c = context_dim or hidden
    if resampler_dim % HEAD_DIM:
        raise ValueError(f"the resampler width must be a multiple of {HEAD_DIM} (its head width), got {resampler_dim}")
    return AdapterSpec(layout="instantx-sd3", context_dim=c, encoder_input="penultimate", num_layers=double_blocks,
                       layer_dims=(hidden,) * double_blocks, arch_hint="sd3", resampler_dim=resampler_dim,
                       resampler_heads=resampler_dim // HEAD_DIM, resampler_depth=resampler_depth,
                       resampler_ff_dim=4 * resampler_dim, architecture="sd3", injection="instantx-sd3",
                       layer_blocks=tuple(("double_block", i) for i in range(double_blocks)), encoder_kind="siglip",
                       time_conditioned=True, ip_head_dim=hidden // heads, time_embed_in=time_embed_in, **common)


def _dit_key(key: str, family: str, layout: str) -> str:
    """A canonical key under `layout`'s name."""
    import re

    if family == "xlabs" and layout in ("xlabs", "mixed", "wrapped"):
        m = re.match(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.(weight|bias)$", key)
        if m:
            key = f"double_blocks.{m.group(1)}.processor.ip_adapter_double_stream_{m.group(2)}_proj.{m.group(3)}"
        elif key.startswith("image_proj.") and layout != "mixed":
            key = "ip_adapter_proj_model." + key[len("image_proj."):]
        return "diffusion_model." + key if layout == "wrapped" else key
    if family == "instantx-sd3" and layout == "diffusers":
        m = re.match(r"^image_proj\.layers\.(\d+)\.(.+)$", key)
        if m:
            for old, new in _SD3_TO_DIFFUSERS:
                if m.group(2).startswith(old):
                    return f"image_proj.layers.{m.group(1)}.{new}{m.group(2)[len(old):]}"
    return key


def synthetic_dit_adapter_state(family: str, layout: Optional[str] = None, *, seed: int = 0,
                                dtype: torch.dtype = torch.float32, **dims) -> dict[str, torch.Tensor]:
    """Flat tensors of a random DiT adapter in a real key layout (default: the published one), ready for
    safetensors.save_file. `dims` go to dit_adapter_spec (hidden, heads, double_blocks, single_blocks,
    tokens, context_dim, encoder_width, resampler_dim, resampler_depth, time_embed_in)."""
    from .dit_families import expected_dit_shapes

    layouts = DIT_LAYOUTS.get(family)
    if layouts is None:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {tuple(DIT_LAYOUTS)}")
    layout = layout or layouts[0]
    if layout not in layouts:
        raise ValueError(f"unknown layout {layout!r} for {family}; expected one of {layouts}")
    spec = dit_adapter_spec(family, **dims)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected_dit_shapes(spec).items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith("latents"):
            t = noise / shape[-1] ** 0.5
        elif len(shape) == 2:
            t = noise / shape[1] ** 0.5  # 1/sqrt(fan_in) keeps activations O(1)
        elif key.endswith(".weight"):  # LayerNorm / RMSNorm gains near 1, not exactly, so they matter
            t = 1.0 + 0.1 * noise
        else:
            t = 0.05 * noise
        state[_dit_key(key, family, layout)] = t.to(dtype).contiguous()
    return state


def save_synthetic_dit_adapter(path, family: str, layout: Optional[str] = None, *, nested: bool = True,
                               **kwargs) -> dict[str, torch.Tensor]:
    """Write a synthetic DiT adapter: .safetensors with flat keys, or a torch pickle (.bin/.pt/.pth)
    nested by first key component like the published .bin files (flat with nested=False).
    Returns the flat state that was written."""
    state = synthetic_dit_adapter_state(family, layout, **kwargs)
    return write_state(path, state, nested)


# ---------------------------------------------------------------------------------------
# Face-identity adapters (models/face_families.py has the published layouts and their sources)

FACE_KINDS = ("faceid", "faceid-plus", "portrait", "face-resampler", "kolors-faceid-plus")
_FACE_DEFAULT_ARCH = {"faceid": "sd15", "faceid-plus": "sd15", "portrait": "sd15", "face-resampler": "sdxl",
                      "kolors-faceid-plus": "kolors"}
_FACE_CONTEXT = {"sd15": 768, "sdxl": 2048, "kolors": 2048}
# The published sizes: MLP hidden 1024, LoRA rank 128, perceivers/resamplers 4 layers of 64-wide heads,
# feed-forward 4x; FaceID Plus' perceiver is as wide as its tokens with width // 64 heads; the
# face-embedding resampler is 1280 wide with 20 heads (InstantID, Portrait unnorm); Kolors FaceID-Plus
# reads CLIP ViT-L/14-336 (1024), FaceID Plus CLIP ViT-H/14 (1280).
_FACE_FULL = dict(model_channels=320, hidden=1024, lora_rank=128, depth=4, clip_width=None, resampler_dim=1280)
_FACE_TINY = dict(model_channels=32, hidden=64, lora_rank=4, depth=1, clip_width=32, resampler_dim=64)


def face_adapter_spec(kind: str, arch: Optional[str] = None, size: str = "tiny", *,
                      model_channels: Optional[int] = None, context_dim: Optional[int] = None,
                      tokens: Optional[int] = None, token_width: Optional[int] = None, lora: Optional[bool] = None,
                      lora_rank: Optional[int] = None, hidden: Optional[int] = None, clip_width: Optional[int] = None,
                      heads: Optional[int] = None, depth: Optional[int] = None, ff_dim: Optional[int] = None,
                      resampler_dim: Optional[int] = None) -> AdapterSpec:
    """The spec detection gives for a synthetic face adapter of `kind` (FACE_KINDS) for `arch`
    ("sd15" | "sdxl" | "kolors"; default: the kind's published one) at `size` "full" (the published
    shapes) or "tiny" (the layer structure of a 32-channel UNet with the real context width, everything
    else small: MLP hidden 64, LoRA rank 4, one perceiver/resampler layer of one head, feed-forward 64,
    CLIP width 32, Kolors token width 256). Keyword arguments override single dimensions; lora=False
    leaves a FaceID file without its LoRA (as when it was stripped), lora=True adds one to any kind."""
    from .face_families import FACE_EMBEDDING_WIDTH, FACE_ENCODER_NAME, KOLORS_TOKEN_WIDTH, FaceSpec, LoraSpec
    from .families import _ARCH_HINTS, _HIDDEN_ENCODERS, KOLORS_PLUS_ENCODER

    if kind not in FACE_KINDS:
        raise ValueError(f"unknown face kind {kind!r}; expected one of {FACE_KINDS}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size is 'tiny' or 'full', not {size!r}")
    arch = arch or _FACE_DEFAULT_ARCH[kind]
    if arch not in _FACE_CONTEXT:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(_FACE_CONTEXT)}")
    d = _FACE_FULL if size == "full" else _FACE_TINY
    mc = model_channels or d["model_channels"]
    dims = tuple(sdxl_layer_dims(mc) if arch != "sd15" else sd15_layer_dims(mc))
    c = context_dim or _FACE_CONTEXT[arch]
    hint = _ARCH_HINTS.get((len(dims), c))
    if kind == "kolors-faceid-plus" and hint == "sdxl":
        hint = "kolors"
    crop = 336 if kind == "kolors-faceid-plus" else (224 if (hint == "sd15" or (hint is None and c == 768)) else 256)
    e = FACE_EMBEDDING_WIDTH
    with_lora = lora if lora is not None else kind in ("faceid", "faceid-plus")
    lora_spec = None
    if with_lora:
        lora_spec = LoraSpec(rank=lora_rank or d["lora_rank"], processors=tuple(range(2 * len(dims))))
    common = dict(context_dim=c, num_layers=len(dims), layer_dims=dims, arch_hint=hint, lora=lora_spec)
    if kind == "face-resampler":
        rd = resampler_dim or d["resampler_dim"]
        nh = heads or (20 if size == "full" else max(1, rd // HEAD_DIM))
        face = FaceSpec(kind=kind, embedding="raw", uses_clip=False, shortcut="none", crop_size=crop, token_width=c,
                        model_pack="antelopev2")
        return AdapterSpec(layout="plus", tokens=tokens or 16, encoder_width=e, encoder_input="face-embedding",
                           encoder_name=FACE_ENCODER_NAME, resampler_dim=rd, resampler_heads=nh,
                           resampler_depth=depth or d["depth"], resampler_ff_dim=ff_dim or 4 * rd, face=face, **common)
    h = hidden or d["hidden"]
    if kind in ("faceid", "portrait"):
        face = FaceSpec(kind=kind, embedding="normed", uses_clip=False, shortcut="none", crop_size=crop, token_width=c)
        return AdapterSpec(layout="faceid", tokens=tokens or (4 if kind == "faceid" else 16), encoder_width=e,
                           encoder_input="face-embedding", encoder_name=FACE_ENCODER_NAME, proj_hidden_dim=h,
                           face=face, **common)
    kolors = kind == "kolors-faceid-plus"
    tw = token_width or (c if not kolors else (KOLORS_TOKEN_WIDTH if size == "full" else 256))
    cw = clip_width or d["clip_width"] or (1024 if kolors else 1280)
    if kolors:
        face = FaceSpec(kind=kind, embedding="raw", uses_clip=True, shortcut="always", crop_size=crop, token_width=tw,
                        model_pack="antelopev2", shortcut_default=True)
        name = KOLORS_PLUS_ENCODER if cw == 1024 else None
    else:
        face = FaceSpec(kind=kind, embedding="normed", uses_clip=True, shortcut="choice", crop_size=crop,
                        token_width=tw, shortcut_default=True)
        name = None
    return AdapterSpec(layout="faceid-plus", tokens=tokens or (6 if kolors else 4), encoder_width=cw,
                       encoder_input="penultimate",
                       encoder_name=name or _HIDDEN_ENCODERS.get(cw, f"CLIP vision of width {cw}"), proj_hidden_dim=h,
                       resampler_dim=tw, resampler_heads=heads or (tw // HEAD_DIM if size == "full" else 1),
                       resampler_depth=depth or d["depth"],
                       resampler_ff_dim=ff_dim or (4 * tw if size == "full" else 64),
                       face=face, **common)


def synthetic_face_state(kind: str, arch: Optional[str] = None, size: str = "tiny", *, seed: int = 0,
                         dtype: torch.dtype = torch.float32, meta: bool = False, layers_group: str = "ip_adapter",
                         **dims) -> dict[str, torch.Tensor]:
    """Flat tensors of a random face adapter in the published key layout (see face_adapter_spec for
    kind, arch, size and `dims`), LoRA `ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight` on every
    even and odd N included where the kind has one. meta=True gives shape-only tensors (the full sizes
    weigh gigabytes: detect those, never materialise them). layers_group "adapter_modules" names the
    layers as Kolors' ipa-faceid-plus.bin does."""
    spec = face_adapter_spec(kind, arch, size, **dims)
    if layers_group not in ("ip_adapter", "adapter_modules"):
        raise ValueError(f"layers_group is 'ip_adapter' or 'adapter_modules', not {layers_group!r}")
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(spec).items():
        if layers_group != "ip_adapter" and key.startswith("ip_adapter."):
            key = layers_group + key[len("ip_adapter"):]
        if meta:
            state[key] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith("latents"):
            t = noise / shape[-1] ** 0.5
        elif len(shape) == 2:
            t = noise / shape[1] ** 0.5  # 1/sqrt(fan_in) keeps activations O(1)
        elif key.endswith(".weight"):  # LayerNorm gains near 1, not exactly, so they matter
            t = 1.0 + 0.1 * noise
        else:
            t = 0.05 * noise
        state[key] = t.to(dtype).contiguous()
    return state


def save_synthetic_face_adapter(path, kind: str, arch: Optional[str] = None, size: str = "tiny", *,
                                nested: bool = True, **kwargs) -> dict[str, torch.Tensor]:
    """Write a synthetic face adapter: .safetensors with flat keys, or a torch pickle (.bin/.pt/.pth)
    nested {"image_proj": {...}, "ip_adapter": {...}} like the published files (flat with nested=False).
    Returns the flat state written."""
    state = synthetic_face_state(kind, arch, size, **kwargs)
    return write_state(path, state, nested)
