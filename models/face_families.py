"""Face-identity adapters (FaceID, FaceID Plus / Plus V2, Portrait, the face-embedding resampler of
InstantID and FaceID Portrait unnorm, Kolors FaceID-Plus): recognising them from key names and shapes.

Facts, from the publishers' code (read, not copied):
- tencent-ailab/IP-Adapter ip_adapter/ip_adapter_faceid.py: MLPProjModel = Linear(512, 1024), GELU,
  Linear(1024, T*C) then LayerNorm(C) per token (keys `proj.0`, `proj.2`, `norm`); ProjPlusModel = that
  MLP + `perceiver_resampler` (FacePerceiverResampler: proj_in Linear(CLIP width, C), 4 x [PerceiverAttention
  with C // 64 heads of 64, FeedForward x4], proj_out Linear(C, C), norm_out), forward(id, clip, shortcut,
  scale): out = x + scale * out only when shortcut (V2). IPAdapterFaceID / IPAdapterFaceIDPlus put a
  LoRA of rank 128 (lora_rank=128) on every attention processor: attn1 (even N) LoRAAttnProcessor,
  attn2 (odd N) LoRAIPAttnProcessor with to_k_ip / to_v_ip; LoRALinearLayer keeps `down` (r, in) and
  `up` (out, r), both without bias; attn2's K/V LoRA reads the context width.
- ComfyUI_IPAdapter_plus IPAdapterPlus.py (ipadapter_execute): FaceID = MLP + LoRA keys
  (`0.to_q_lora.down.weight`), 4 tokens; Portrait = MLP without LoRA, 16 tokens; Portrait unnorm = the
  standard Plus Resampler over the raw embedding (proj_in 512 wide, 16 tokens; flagged by file name
  there); normed_embedding for every family except Portrait unnorm; crops norm_crop 224 (SD1.5),
  256 (SDXL), 336 (Kolors FaceID); Kolors FaceID = `perceiver_resampler.layers.0.0.to_out` with 4096
  rows, 6 tokens, always the V2 shortcut, K/V through the UNet's encoder_hid_proj; V2 is flagged only by
  'plusv2' in the file name (utils.py ipadapter_model_loader): the keys cannot tell V1 from V2.
- InstantID (instantX-research/InstantID, pipeline_stable_diffusion_xl_instantid.py): Resampler(dim 1280,
  depth 4, heads 20, 16 queries, embedding_dim 512, output 2048) over the raw `face_info['embedding']`.
- Kwai-Kolors/Kolors: kolors/models/ipa_faceid_plus/ipa_faceid_plus.py ProjPlusModel (shortcut=True,
  scale=1.0 by default); pipeline_stable_diffusion_xl_chatglm_256_ipadapter_FaceID.py: cross_attention_dim
  4096, num_tokens 6, the tokens are appended to the ChatGLM prompt embeds and pass the UNet's
  encoder_hid_proj with them; the layers live under `adapter_modules`; ipadapter_FaceID/
  sample_ipadapter_faceid_plus.py: antelopev2, the RAW `face_info["embedding"]`, the largest face,
  a square bbox crop resized to 336 for CLIP ViT-L/14-336 (hidden_states[-2])."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

import torch

from .families import (HEAD_DIM, KOLORS_PLUS_ENCODER, AdapterSpec, FaceSpec, LoraSpec, _ARCH_HINTS, _ARCH_NAMES,
                       _HIDDEN_ENCODERS, _as_groups, _parse_layers, check_groups, check_layout,
                       detect_unet_family, resampler_layer_shapes, unet_shapes)
from .loading import AdapterFormatError, _example_list

__all__ = [
    "FACE_KINDS",
    "FACE_FAMILY_NAMES",
    "FaceSpec",
    "LoraSpec",
    "describe_face",
    "detect_face_family",
    "expected_face_shapes",
    "face_family_name",
    "face_family_of",
    "lora_shapes",
]

FACE_KINDS = ("faceid", "faceid-plus", "portrait", "face-resampler", "kolors-faceid-plus")

FACE_FAMILY_NAMES = {
    "faceid": "IP-Adapter FaceID",
    "faceid-plus": "IP-Adapter FaceID Plus",
    "portrait": "IP-Adapter FaceID Portrait",
    "face-resampler": "face-embedding resampler (InstantID / FaceID Portrait unnorm)",
    "kolors-faceid-plus": "Kolors IP-Adapter FaceID-Plus",
}

# InsightFace recognition models (buffalo_l's w600k_r50, antelopev2's glintr100) give 512 values.
FACE_EMBEDDING_WIDTH = 512
# Kolors FaceID-Plus projects to the width of the ChatGLM prompt embeddings, which the UNet's
# encoder_hid_proj maps to its 2048-wide context (Kolors pipeline: cross_attention_dim = 4096).
KOLORS_TOKEN_WIDTH = 4096
_FACEID_TOKENS = 4
_PORTRAIT_TOKENS = 16

_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_LORA_PROJ = ("q", "k", "v", "out")
_PERCEIVER = "perceiver_resampler."

FACE_ENCODER_NAME = "InsightFace face embedding"


# ---------------------------------------------------------------------------------------
# Which face family (cheap: key names and one or two shapes)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def face_family_of(state: Mapping[str, Any]) -> Optional[str]:
    """The face kind (FACE_KINDS) the keys point at, else None. `state` grouped or flat.

    Only what no CLIP-image adapter holds counts: LoRA keys in the layers, a `perceiver_resampler`,
    the FaceID MLP (`proj.0` + `proj.2` + `norm`, no `proj.3`), or a resampler reading 512 values
    (no CLIP vision model has hidden states 512 wide; InsightFace embeddings are)."""
    try:
        groups = _as_groups(state)
    except AdapterFormatError:
        return None
    ip = groups.get("image_proj", {})
    layers = groups.get("ip_adapter", {})
    has_lora = any("_lora." in k for k in layers)
    if any(k.startswith(_PERCEIVER) for k in ip):
        # IPAdapter_plus tells Kolors by the perceiver's 4096-wide to_out; the general form of that fact:
        # tokens wider than the layers read can only reach them through the UNet's encoder_hid_proj.
        norm = _shape(ip.get("norm.weight"))
        k_in = [_shape(t)[1:] for k, t in layers.items() if k.endswith(".to_k_ip.weight")][:1]
        wider = len(norm) == 1 and bool(k_in) and k_in[0] != norm
        return "kolors-faceid-plus" if wider else "faceid-plus"
    if "proj.0.weight" in ip and "proj.2.weight" in ip and "proj.3.weight" not in ip:
        if has_lora:
            return "faceid"
        norm, proj = _shape(ip.get("norm.weight")), _shape(ip.get("proj.2.weight"))
        tokens = proj[0] // norm[0] if len(norm) == 1 and len(proj) == 2 and norm[0] else 0
        # a FaceID file without its LoRA (4 tokens) stays FaceID: the apply node warns about the LoRA
        return "faceid" if tokens == _FACEID_TOKENS else "portrait"
    if "latents" in ip and _shape(ip.get("proj_in.weight"))[1:] == (FACE_EMBEDDING_WIDTH,):
        return "face-resampler"
    if has_lora:
        return "faceid"
    return None


# ---------------------------------------------------------------------------------------
# Expected layout


def lora_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """`ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight` of every LoRA processor N: down (r, in),
    up (out, r); processor N belongs to transformer block N // 2 (even: attn1, odd: attn2, whose
    K/V read the context)."""
    out: dict[str, tuple[int, ...]] = {}
    if spec.lora is None:
        return out
    r = spec.lora.rank
    for n in spec.lora.processors:
        w = spec.layer_dims[n // 2]
        kv_in = spec.context_dim if n % 2 else w
        for proj in _LORA_PROJ:
            fan_in = kv_in if proj in ("k", "v") else w
            out[f"ip_adapter.{n}.to_{proj}_lora.down.weight"] = (r, fan_in)
            out[f"ip_adapter.{n}.to_{proj}_lora.up.weight"] = (w, r)
    return out


def _mlp_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    p, face = "image_proj.", spec.face
    h, c, t = spec.proj_hidden_dim, face.token_width, spec.tokens
    return {p + "proj.0.weight": (h, face.embedding_width), p + "proj.0.bias": (h,),
            p + "proj.2.weight": (t * c, h), p + "proj.2.bias": (t * c,),
            p + "norm.weight": (c,), p + "norm.bias": (c,)}


def _perceiver_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    p = "image_proj." + _PERCEIVER
    d, c, e = spec.resampler_dim, spec.face.token_width, spec.encoder_width
    out = {p + "proj_in.weight": (d, e), p + "proj_in.bias": (d,), p + "proj_out.weight": (c, d),
           p + "proj_out.bias": (c,), p + "norm_out.weight": (c,), p + "norm_out.bias": (c,)}
    for i in range(spec.resampler_depth):
        out.update(resampler_layer_shapes(f"{p}layers.{i}.", d, spec.resampler_heads * HEAD_DIM,
                                          spec.resampler_ff_dim))
    return out


def expected_face_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every tensor of a face-family checkpoint (LoRA included), no more, no less."""
    plain = replace(spec, face=None, lora=None)
    if spec.layout == "faceid":
        out = _mlp_shapes(spec)
    elif spec.layout == "faceid-plus":
        out = {**_mlp_shapes(spec), **_perceiver_shapes(spec)}
    else:  # the face-embedding resampler is the Plus resampler
        out = {k: s for k, s in unet_shapes(plain).items() if k.startswith("image_proj.")}
    for i, w in enumerate(spec.layer_dims):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = (w, spec.context_dim)
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (w, spec.context_dim)
    out.update(lora_shapes(spec))
    return out


# ---------------------------------------------------------------------------------------
# Names and the loader's one-line summary


def face_family_name(spec: AdapterSpec) -> str:
    return FACE_FAMILY_NAMES.get(spec.face.kind, "face IP-Adapter")


def _embedding_text(face: FaceSpec) -> str:
    what = {"normed": "normed", "raw": "raw, not normed",
            "choice": "normed or raw: choose on the apply node"}.get(face.embedding, face.embedding)
    return f"the InsightFace {face.model_pack} face embedding ({what}, {face.embedding_width} wide)"


def lora_text(spec: AdapterSpec) -> str:
    """'LoRA rank 128 on 32 attention layers (applied automatically)', or what is missing."""
    if spec.lora is not None:
        return (f"LoRA rank {spec.lora.rank} on {len(spec.lora.processors)} attention layers "
                "(applied automatically)")
    if spec.face is not None and spec.face.kind in ("faceid", "faceid-plus"):
        return ("no LoRA in this file (FaceID was trained with one: load the published FaceID LoRA with a "
                "LoRA loader)")
    return "no LoRA"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def describe_face(spec: AdapterSpec) -> str:
    face = spec.face
    target = _ARCH_NAMES.get(spec.arch_hint or "", "an unrecognised base model")
    name = face_family_name(spec)
    if face.shortcut == "choice":
        name += " (V1/V2: choose on the apply node)"
    text = f"{name} for {target}: {spec.tokens} tokens from {_embedding_text(face)}"
    if face.uses_clip:
        text += (f" and {spec.encoder_name} penultimate hidden states (width {spec.encoder_width}) of the "
                 f"{face.crop_size}-px face crop")
    if spec.layout == "faceid-plus":
        text += f"; perceiver {spec.resampler_dim} wide x {_n(spec.resampler_depth, 'layer')}, " \
                f"{_n(spec.resampler_heads, 'head')}"
        if face.shortcut == "always":
            text += ", V2 shortcut always on (face-structure weight)"
    elif spec.layout == "plus":
        text += f"; resampler {spec.resampler_dim} wide x {_n(spec.resampler_depth, 'layer')}, " \
                f"{_n(spec.resampler_heads, 'head')}"
    if face.token_width != spec.context_dim:
        text += (f"; tokens {face.token_width} wide pass the UNet's encoder_hid_proj "
                 f"({face.token_width} -> {spec.context_dim})")
    text += f"; {spec.num_layers} cross-attention layers, context width {spec.context_dim}; {lora_text(spec)}"
    return text


# ---------------------------------------------------------------------------------------
# Detection


def _need(group: Mapping[str, torch.Tensor], key: str, ndim: int, family: str) -> torch.Tensor:
    t = group.get(key)
    if t is None:
        raise AdapterFormatError(
            f"image_proj.{key} is missing; {_a(family)} needs it (found image_proj keys like "
            f"{_example_list(sorted(group), 4)}). The file is incomplete or damaged.")
    if t.dim() != ndim:
        raise AdapterFormatError(f"image_proj.{key} has shape {tuple(t.shape)}; {_a(family)} holds a {ndim}-d tensor "
                                 "there. The file is damaged.")
    return t


def _split_layers(layers: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(K/V and other layer keys, LoRA keys)."""
    kv, lora = {}, {}
    for k, t in layers.items():
        (lora if "_lora." in k else kv)[k] = t
    return kv, lora


def _parse_lora(lora: Mapping[str, torch.Tensor], widths: tuple[int, ...], family: str) -> Optional[LoraSpec]:
    """The LoRA part of the layers, checked for completeness and one shared rank (shapes follow in check_layout)."""
    if not lora:
        return None
    found: dict[int, dict[str, torch.Tensor]] = {}
    odd = []
    for k, t in lora.items():
        m = _LORA_KEY.match(k)
        if m is None:
            odd.append("ip_adapter." + k)
            continue
        found.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = t
    if odd:
        raise AdapterFormatError(
            f"unexpected LoRA keys {_example_list(sorted(odd), 4)} in this {family}; FaceID LoRA keys are "
            "'ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight'. The file is a variant this pack does not know.")
    want = set(range(2 * len(widths)))
    stray = sorted(set(found) - want)
    if stray:
        raise AdapterFormatError(
            f"LoRA weights for attention processors {_example_list(stray, 4)}, but the file has {len(widths)} "
            f"cross-attention layers, i.e. processors 0..{2 * len(widths) - 1}; the file is damaged")
    lacking = sorted(want - set(found))
    if lacking:
        raise AdapterFormatError(
            f"this {family} holds LoRA weights for {len(found)} attention processors, but those of processors "
            f"{_example_list(lacking, 6)} are missing; the FaceID LoRA covers every self- and cross-attention "
            f"layer (processors 0..{2 * len(widths) - 1}). The file is incomplete or damaged.")
    ranks: dict[int, list[str]] = {}
    for n in sorted(found):
        parts = found[n]
        for proj in _LORA_PROJ:
            for half in ("down", "up"):
                key = f"ip_adapter.{n}.to_{proj}_lora.{half}.weight"
                t = parts.get(f"{proj}.{half}")
                if t is None:
                    other = "up" if half == "down" else "down"
                    raise AdapterFormatError(
                        f"{key} is missing (its {other} weight is there); every LoRA layer needs both its down "
                        "and up weights. The file is incomplete or damaged.")
                if t.dim() != 2:
                    raise AdapterFormatError(f"{key} has shape {tuple(t.shape)}; a LoRA weight is a 2-d matrix")
                r = int(t.shape[0] if half == "down" else t.shape[1])
                ranks.setdefault(r, []).append(key)
    if len(ranks) > 1:
        common = max(ranks, key=lambda r: len(ranks[r]))
        odd_keys = [k for r, ks in ranks.items() if r != common for k in ks]
        odd_rank = next(r for r in ranks if r != common)
        raise AdapterFormatError(
            f"the LoRA weights disagree on their rank: most have rank {common}, but {_example_list(odd_keys, 3)} "
            f"{'has' if len(odd_keys) == 1 else 'have'} rank {odd_rank} (rows of 'down', columns of 'up'); all "
            "LoRA layers of a FaceID checkpoint share one rank. The file is damaged.")
    return LoraSpec(rank=next(iter(ranks)), processors=tuple(sorted(found)))


def _crop_size(arch: Optional[str], context: int) -> int:
    if arch == "kolors":
        return 336
    if arch == "sd15" or (arch is None and context == 768):
        return 224
    return 256


def _a(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" or name.startswith("IP-") else "a ") + name


def _check(groups, spec: AdapterSpec) -> AdapterSpec:
    flat = {f"{g}.{k}": t for g, sub in groups.items() for k, t in sub.items()}
    check_layout(flat, expected_face_shapes(spec), _a(spec.family_name))
    return spec


def _mlp_dims(ip, family: str, context: int, token_width: Optional[int] = None) -> tuple[int, int, int, int]:
    """(embedding width, hidden width, tokens, token width) of the FaceID MLP."""
    first = _need(ip, "proj.0.weight", 2, family)
    second = _need(ip, "proj.2.weight", 2, family)
    c = int(_need(ip, "norm.weight", 1, family).shape[0])
    if int(first.shape[1]) != FACE_EMBEDDING_WIDTH:
        raise AdapterFormatError(
            f"image_proj.proj.0.weight reads {first.shape[1]} values; {_a(family)} reads an InsightFace face "
            f"embedding ({FACE_EMBEDDING_WIDTH} values). The file is damaged or a variant this pack does not know.")
    if second.shape[0] % c:
        raise AdapterFormatError(
            f"image_proj.proj.2.weight has {second.shape[0]} rows, not a multiple of the token width {c} "
            "(image_proj.norm); the file is damaged")
    want = context if token_width is None else token_width
    if c != want:
        raise AdapterFormatError(
            f"image_proj makes face tokens of width {c}, but the ip_adapter layers read width {want}; the two halves "
            "of the file do not belong together")
    return int(first.shape[1]), int(first.shape[0]), int(second.shape[0] // c), c


def _perceiver_dims(ip, family: str, token_width: int) -> dict[str, int]:
    p = _PERCEIVER
    proj_in = _need(ip, p + "proj_in.weight", 2, family)
    found = {k.split(".")[2] for k in ip if k.startswith(p + "layers.") and k.count(".") >= 3}
    idx = sorted(int(i) for i in found if i.isdigit())
    if not idx:
        raise AdapterFormatError(f"image_proj has a perceiver_resampler without 'layers.*'; the {family} is damaged")
    gaps = sorted(set(range(idx[-1] + 1)) - set(idx))
    if gaps:
        raise AdapterFormatError(
            f"the perceiver of this {family} has layers {_example_list(idx, 6)}: layer "
            f"{_example_list(gaps, 4)} ('image_proj.{p}layers.{gaps[0]}.*') is missing. The file is incomplete or "
            "damaged.")
    depth = idx[-1] + 1
    to_q = _need(ip, p + "layers.0.0.to_q.weight", 2, family)
    ff = _need(ip, p + "layers.0.1.1.weight", 2, family)
    if to_q.shape[0] % HEAD_DIM:
        raise AdapterFormatError(
            f"image_proj.{p}layers.0.0.to_q.weight has {to_q.shape[0]} rows, not a multiple of the head width "
            f"{HEAD_DIM}; this perceiver variant is not supported")
    d = int(proj_in.shape[0])
    if d != token_width:
        # the MLP's tokens are the perceiver's latents (ProjPlusModel: dim = cross_attention_dim)
        raise AdapterFormatError(
            f"image_proj.{p}proj_in.weight makes {d}-wide features, but the perceiver's latents are the "
            f"{token_width}-wide MLP tokens; the file is damaged")
    return dict(encoder_width=int(proj_in.shape[1]), resampler_dim=d, resampler_heads=int(to_q.shape[0] // HEAD_DIM),
                resampler_depth=depth, resampler_ff_dim=int(ff.shape[0]))


def detect_face_family(state: Mapping[str, Any]) -> AdapterSpec:
    """The AdapterSpec (with `face`, and `lora` where the file holds one) of a face-family checkpoint."""
    groups = _as_groups(state)
    kind = face_family_of(groups)
    if kind is None:
        raise AdapterFormatError("not a face-identity adapter (no FaceID MLP, perceiver, LoRA or 512-wide resampler)")
    check_groups(groups)
    family = FACE_FAMILY_NAMES[kind]
    ip, layers = groups["image_proj"], groups["ip_adapter"]
    kv, lora_keys = _split_layers(layers)
    if not kv:
        raise AdapterFormatError(
            f"this looks like {_a(family)}, but its ip_adapter group holds no to_k_ip/to_v_ip weights (only "
            f"{_example_list(sorted('ip_adapter.' + k for k in layers), 3)}); the file is incomplete")
    context, widths = _parse_layers(kv)
    arch = _ARCH_HINTS.get((len(widths), int(context)))

    if kind == "face-resampler":
        if lora_keys:
            raise AdapterFormatError(
                f"this looks like {_a(family)}, which has no LoRA, but it holds LoRA keys like "
                f"{_example_list(sorted('ip_adapter.' + k for k in lora_keys), 3)}; a variant this pack does not know")
        spec = detect_unet_family(groups)
        face = FaceSpec(kind=kind, embedding="raw", uses_clip=False, shortcut="none",
                        crop_size=_crop_size(spec.arch_hint, spec.context_dim), token_width=spec.context_dim,
                        model_pack="antelopev2")
        return replace(spec, encoder_input="face-embedding", encoder_name=FACE_ENCODER_NAME, face=face)

    if kind == "kolors-faceid-plus" and lora_keys:
        raise AdapterFormatError(
            f"this looks like {_a(family)}, which has no LoRA, but it holds LoRA keys like "
            f"{_example_list(sorted('ip_adapter.' + k for k in lora_keys), 3)}; a variant this pack does not know")
    if kind in ("faceid", "portrait") and ("proj.0.weight" not in ip or "proj.2.weight" not in ip
                                           or "proj.3.weight" in ip):
        raise AdapterFormatError(
            f"this looks like {_a(family)} (LoRA keys like "
            f"{_example_list(sorted('ip_adapter.' + k for k in lora_keys), 2)}), but its image_proj is not the "
            f"FaceID MLP ('proj.0', 'proj.2', 'norm'; found keys like {_example_list(sorted(ip), 4)}); the file is "
            "damaged or a variant this pack does not know")
    lora = _parse_lora(lora_keys, widths, family)
    if kind in ("faceid", "portrait"):
        e, h, tokens, c = _mlp_dims(ip, family, int(context))
        face = FaceSpec(kind=kind, embedding="normed", uses_clip=False, shortcut="none",
                        crop_size=_crop_size(arch, int(context)), token_width=c, embedding_width=e)
        spec = AdapterSpec(layout="faceid", tokens=tokens, context_dim=int(context), encoder_width=e,
                           encoder_input="face-embedding", encoder_name=FACE_ENCODER_NAME, num_layers=len(widths),
                           layer_dims=widths, arch_hint=arch, proj_hidden_dim=h, face=face, lora=lora)
        return _check(groups, spec)

    # FaceID Plus and Kolors FaceID-Plus: MLP tokens, then the perceiver over CLIP hidden states
    kolors = kind == "kolors-faceid-plus"
    token_width = int(_need(ip, "norm.weight", 1, family).shape[0]) if kolors else int(context)
    e, h, tokens, c = _mlp_dims(ip, family, int(context), token_width)
    dims = _perceiver_dims(ip, family, c)
    if kolors:
        arch = "kolors" if arch == "sdxl" else arch
        face = FaceSpec(kind=kind, embedding="raw", uses_clip=True, shortcut="always", crop_size=336,
                        token_width=c, embedding_width=e, model_pack="antelopev2", shortcut_default=True)
        clip_name = KOLORS_PLUS_ENCODER if dims["encoder_width"] == 1024 else None
    else:
        face = FaceSpec(kind=kind, embedding="normed", uses_clip=True, shortcut="choice",
                        crop_size=_crop_size(arch, int(context)), token_width=c, embedding_width=e,
                        shortcut_default=True)
        clip_name = None
    width = dims["encoder_width"]
    clip_name = clip_name or _HIDDEN_ENCODERS.get(width, f"CLIP vision of width {width}")
    spec = AdapterSpec(layout="faceid-plus", tokens=tokens, context_dim=int(context), encoder_input="penultimate",
                       encoder_name=clip_name, num_layers=len(widths), layer_dims=widths, arch_hint=arch,
                       proj_hidden_dim=h, face=face, lora=lora, **dims)
    return _check(groups, spec)
