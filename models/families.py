"""Which adapter family a checkpoint belongs to, read from its key names and tensor shapes.

File names are never consulted: people rename files, and a wrong guess here would only
surface later as garbage images. Every dimension the projection and the patcher need is
read off the tensors, and the whole key set is then checked against what that family
must contain, so a damaged file fails here with a message instead of deep inside torch."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .loading import AdapterFormatError, _example_list, flatten_state, group_state

__all__ = ["AdapterSpec", "EncoderPart", "FaceSpec", "LayersPart", "LoraSpec", "ProjectionPart", "detect_family",
           "expected_shapes", "HEAD_DIM", "LAYOUTS", "FACE_LAYOUTS"]

# All published Plus-type resamplers use 64-wide heads; the head count is only recoverable
# from the checkpoint because of that convention (rows of to_q / 64).
HEAD_DIM = 64

LAYOUTS = ("base", "plus", "full-face")
# Face families' own projections (models/face_families.py): the FaceID MLP (FaceID, Portrait) and the
# MLP + perceiver of FaceID Plus (also Kolors FaceID-Plus). The face-embedding resampler is a "plus".
FACE_LAYOUTS = ("faceid", "faceid-plus")

# Width of the encoder output -> the CLIP vision model that produces it. The projection
# ("image_embeds") and hidden ("penultimate") widths differ for the same encoder.
_IMAGE_EMBEDS_ENCODERS = {768: "CLIP ViT-L/14", 1024: "CLIP ViT-H/14", 1280: "CLIP ViT-bigG/14"}
_HIDDEN_ENCODERS = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14"}
# Kolors IP-Adapter-Plus reads CLIP ViT-L/14 at 336 px (Kwai-Kolors/Kolors ipadapter/sample_ipadapter_plus.py:
# clip-vit-large-patch14-336, ip_img_size = 336); the 224-px ViT-L/14 has the same width but other positions.
KOLORS_PLUS_ENCODER = "CLIP ViT-L/14-336"

# (number of attn2 layers, context width) -> base model the adapter was trained for.
_ARCH_HINTS = {(16, 768): "sd15", (70, 2048): "sdxl"}
_ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "kolors": "Kolors"}

# Full-face projects every encoder token separately, so the checkpoint does not fix the
# token count; 257 is what its encoder (ViT-H/14 at 224 px: 16x16 patches + class token) gives.
_FULL_FACE_TOKENS = 257

_LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
# MIP-Adapter adds one Linear(layer width, 1, bias=False) per cross-attention layer (its
# IPAttnProcessor.text_to_weight, github.com/hqhQAQ/MIP-Adapter ip_adapter/attention_processor_multi.py).
_GATE_KEY = re.compile(r"^(\d+)\.text_to_weight\.weight$")
# The published MIP-Adapter checkpoints (model_sdxl.bin, model_sdxl_plus.bin) are SDXL only.
_MIP_LAYERS = 70


@dataclass(frozen=True)
class FaceSpec:
    """What a face-identity adapter reads (models/face_families.py detects it)."""
    kind: str            # "faceid" | "faceid-plus" | "portrait" | "face-resampler" | "kolors-faceid-plus"
    embedding: str       # "normed" | "raw" | "choice" (the keys cannot tell; the node offers the choice)
    uses_clip: bool      # also reads CLIP penultimate states of the aligned face crop
    shortcut: str        # "none" | "choice" (FaceID Plus V1/V2) | "always" (Kolors FaceID-Plus)
    crop_size: int       # 224 SD1.5, 256 SDXL, 336 Kolors: the aligned face crop given to CLIP
    token_width: int     # width of the projected tokens (context_dim, except Kolors FaceID-Plus: 4096)
    embedding_width: int = 512        # InsightFace recognition embedding
    model_pack: str = "buffalo_l"     # the InsightFace pack the publisher's code uses
    shortcut_default: bool = False    # FaceID Plus: V2 (shortcut on) unless the user says otherwise


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA a FaceID checkpoint holds for the UNet's own attention layers."""
    rank: int
    processors: tuple[int, ...]   # processor indices N holding LoRA (even: attn1, odd: attn2 of block N // 2)


@dataclass(frozen=True)
class EncoderPart:
    """What feeds the projection (AdapterSpec.encoder_part)."""
    name: str                     # the encoder registry's key: AdapterSpec.encoder
    model: str                    # the vision model that fits (CLIP / SigLIP name), or the InsightFace embedding
    input: str                    # "image_embeds" | "penultimate" | "pooled" | "face-embedding"
    width: int                    # last dim the projection reads (the CLIP width for FaceID Plus)
    face: Optional[FaceSpec] = None


@dataclass(frozen=True)
class ProjectionPart:
    """The network from encoder output to image tokens (AdapterSpec.projection)."""
    layout: str                   # "base" | "plus" | "full-face" | "faceid" | "faceid-plus" | DiT layouts
    tokens: int
    token_width: int              # = the layers' context width except Kolors FaceID-Plus
    resampler: Optional[tuple[int, int, int, int]] = None  # (width, heads, depth, feed-forward width)
    hidden_dim: Optional[int] = None                        # MLP hidden width (FaceID, InstantX Flux)
    time_conditioned: bool = False


@dataclass(frozen=True)
class LayersPart:
    """Where the image tokens enter the model (AdapterSpec.layers)."""
    architecture: str             # "unet" | "flux" | "sd3"
    injection: str
    context_dim: int              # in-features of every to_k_ip / to_v_ip
    widths: tuple[int, ...]       # out-features per layer, checkpoint order
    blocks: tuple[tuple[str, int], ...] = ()
    gated: bool = False           # MIP-Adapter text_to_weight gates
    arch_hint: Optional[str] = None


@dataclass(frozen=True)
class AdapterSpec:
    """Everything about an adapter that is fixed by its checkpoint."""
    layout: str                       # "base" | "plus" | "full-face"
    tokens: int                       # image tokens per image (4, 16, 257, ...)
    context_dim: int                  # C: width of the image tokens = in-features of to_k_ip
    encoder_width: int                # E: last dim of the encoder output the projection reads
    encoder_input: str                # "image_embeds" | "penultimate"
    encoder_name: str                 # human hint for which CLIP vision model fits
    num_layers: int                   # cross-attention layers carrying ip K/V weights
    layer_dims: tuple[int, ...]       # out-features of each layer's to_k_ip, checkpoint order
    arch_hint: Optional[str] = None   # "sd15" | "sdxl" | None
    resampler_dim: Optional[int] = None
    resampler_heads: Optional[int] = None
    resampler_depth: Optional[int] = None
    resampler_ff_dim: Optional[int] = None
    # Where and how the adapter injects. UNet adapters add an attention term at every attn2
    # site; DiT adapters hook the host's dit blocks, named per layer in `layer_blocks`.
    architecture: str = "unet"        # "unet" | "flux" | "sd3"
    injection: str = "attn2"          # "attn2" | "xlabs" | "instantx-flux" | "instantx-sd3"
    layer_blocks: tuple[tuple[str, int], ...] = ()  # DiT: host dit key of each layer, e.g. ("double_block", 3)
    encoder_kind: str = "clip"        # "clip" | "siglip"
    time_conditioned: bool = False    # tokens and K/V depend on the timestep (SD3.5's TimeResampler)
    # DiT projection shapes the fields above do not fix (models/dit_families.py reads them off the file).
    proj_hidden_dim: Optional[int] = None  # InstantX Flux: width of the MLP's hidden layer (2 x encoder width)
    ip_head_dim: Optional[int] = None      # InstantX SD3.5: width of the per-head norm_q / norm_k / norm_ip_k
    time_embed_in: Optional[int] = None    # InstantX SD3.5: width of the sinusoidal timestep features (320)
    # MIP-Adapter: every layer also holds `text_to_weight` (Linear(width, 1, bias=False)), a gate read
    # off the layer's text attention output that weights the per-object image terms per position.
    mip_gate: bool = False
    # Face identity families: what the face encoder must give, and the LoRA some of them carry.
    face: Optional[FaceSpec] = None
    lora: Optional[LoraSpec] = None

    # The spec in four parts (encoder, projection, layers, optional LoRA). The fields stay flat so every
    # existing reader keeps working; these views group them for code that handles one part.
    @property
    def encoder_part(self) -> EncoderPart:
        return EncoderPart(self.encoder, self.encoder_name, self.encoder_input, self.encoder_width, self.face)

    @property
    def projection(self) -> ProjectionPart:
        resampler = None
        if self.resampler_dim is not None:
            resampler = (self.resampler_dim, self.resampler_heads, self.resampler_depth, self.resampler_ff_dim)
        width = self.face.token_width if self.face is not None else self.context_dim
        return ProjectionPart(self.layout, self.tokens, width, resampler, self.proj_hidden_dim, self.time_conditioned)

    @property
    def layers(self) -> LayersPart:
        return LayersPart(self.architecture, self.injection, self.context_dim, self.layer_dims, self.layer_blocks,
                          self.mip_gate, self.arch_hint)

    @property
    def encoder(self) -> str:
        """Which encoder feeds the projection: "clip-embeds" | "clip-hidden" | "siglip-pooled" |
        "siglip-hidden" | "insightface" | "insightface+clip"."""
        if self.face is not None:
            return "insightface+clip" if self.face.uses_clip else "insightface"
        if self.encoder_kind == "siglip":
            return "siglip-pooled" if self.encoder_input == "pooled" else "siglip-hidden"
        return "clip-embeds" if self.encoder_input == "image_embeds" else "clip-hidden"

    @property
    def family_name(self) -> str:
        if self.face is not None:
            from .face_families import face_family_name  # that module builds on this one

            return face_family_name(self)
        if self.architecture != "unet":
            from .dit_families import DIT_FAMILY_NAMES  # that module builds on this one

            return DIT_FAMILY_NAMES.get(self.injection, "DiT IP-Adapter")
        if self.mip_gate:
            return "MIP-Adapter Plus (multi-reference)" if self.layout == "plus" else "MIP-Adapter (multi-reference)"
        if self.layout == "plus":
            return "IP-Adapter Plus-type (Plus, Plus-Face or Composition)"
        if self.layout == "full-face":
            return "IP-Adapter Full-face"
        return "IP-Adapter"

    def describe(self) -> str:
        if self.face is not None:
            from .face_families import describe_face  # that module builds on this one

            return describe_face(self)
        if self.architecture != "unet":
            from .dit_families import describe_dit  # that module builds on this one

            return describe_dit(self)
        target = _ARCH_NAMES.get(self.arch_hint or "", "an unrecognised base model")
        what = "image_embeds" if self.encoder_input == "image_embeds" else "penultimate hidden states"
        text = (
            f"{self.family_name} for {target}: {self.tokens} image tokens from {self.encoder_name} "
            f"{what} (width {self.encoder_width})"
        )
        if self.layout == "plus":
            text += (
                f", resampler width {self.resampler_dim} x {self.resampler_depth} layers, "
                f"{self.resampler_heads} heads"
            )
        text += f"; {self.num_layers} cross-attention layers, context width {self.context_dim}"
        if self.mip_gate:
            text += "; per-layer text_to_weight gates (each reference image named by an entity word of the prompt)"
        return text


def resampler_layer_shapes(prefix: str, d: int, inner: int, ff: int) -> dict[str, tuple[int, ...]]:
    """One perceiver layer of a Plus-type resampler: attention (`0.`) and feed-forward (`1.`)."""
    a, f = prefix + "0.", prefix + "1."
    out = {a + n + s: (d,) for n in ("norm1", "norm2") for s in (".weight", ".bias")}
    out.update({a + "to_q.weight": (inner, d), a + "to_kv.weight": (2 * inner, d), a + "to_out.weight": (d, inner),
                f + "0.weight": (d,), f + "0.bias": (d,), f + "1.weight": (ff, d), f + "3.weight": (d, ff)})
    return out


def expected_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every tensor a checkpoint of this spec holds, no more, no less.
    DiT specs: the canonical keys of models/dit_families.py."""
    if spec.architecture != "unet":
        from .dit_families import expected_dit_shapes  # that module builds on this one

        return expected_dit_shapes(spec)
    if spec.face is not None or spec.lora is not None:
        from .face_families import expected_face_shapes  # that module builds on this one

        return expected_face_shapes(spec)
    return unet_shapes(spec)


def unet_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """The CLIP-family projection (base / plus / full-face) and the per-layer K/V weights of a UNet adapter."""
    c, e = spec.context_dim, spec.encoder_width
    out: dict[str, tuple[int, ...]] = {}
    p = "image_proj."
    if spec.layout == "base":
        out[p + "proj.weight"] = (spec.tokens * c, e)
        out[p + "proj.bias"] = (spec.tokens * c,)
        out[p + "norm.weight"] = (c,)
        out[p + "norm.bias"] = (c,)
    elif spec.layout == "full-face":
        out[p + "proj.0.weight"] = (e, e)
        out[p + "proj.0.bias"] = (e,)
        out[p + "proj.2.weight"] = (c, e)
        out[p + "proj.2.bias"] = (c,)
        out[p + "proj.3.weight"] = (c,)
        out[p + "proj.3.bias"] = (c,)
    elif spec.layout == "plus":
        d, f = spec.resampler_dim, spec.resampler_ff_dim
        inner = spec.resampler_heads * HEAD_DIM
        out[p + "latents"] = (1, spec.tokens, d)
        out[p + "proj_in.weight"] = (d, e)
        out[p + "proj_in.bias"] = (d,)
        out[p + "proj_out.weight"] = (c, d)
        out[p + "proj_out.bias"] = (c,)
        out[p + "norm_out.weight"] = (c,)
        out[p + "norm_out.bias"] = (c,)
        for i in range(spec.resampler_depth):
            out.update(resampler_layer_shapes(f"{p}layers.{i}.", d, inner, f))
    else:
        raise ValueError(f"unknown layout {spec.layout!r}; expected one of {LAYOUTS}")
    for i, w in enumerate(spec.layer_dims):
        n = 2 * i + 1
        out[f"ip_adapter.{n}.to_k_ip.weight"] = (w, c)
        out[f"ip_adapter.{n}.to_v_ip.weight"] = (w, c)
        if spec.mip_gate:
            out[f"ip_adapter.{n}.text_to_weight.weight"] = (1, w)
    return out


# ---------------------------------------------------------------------------------------
# Recognising files that are not (supported) IP-Adapters


def _foreign_hint(keys: list[str]) -> str:
    def has(pred) -> bool:
        return any(pred(k) for k in keys)

    if has(lambda k: k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                                   "conditioner.embedders."))):
        return "this looks like a full Stable Diffusion checkpoint (it belongs in models/checkpoints)"
    if has(lambda k: k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k
           or ".lora.down." in k):
        return "this looks like a LoRA (it belongs in models/loras)"
    if has(lambda k: k.startswith(("vision_model.", "visual.", "vision_encoder."))):
        return "this looks like a CLIP vision encoder (it belongs in models/clip_vision)"
    if has(lambda k: "ip_adapter_double_stream" in k or k.startswith("ip_adapter_proj_model.")):
        return "this looks like an XLabs Flux IP-Adapter in a key layout this pack does not know"
    if has(lambda k: k.startswith(("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks."))):
        return "this looks like (part of) a DiT model such as Flux or SD3, not a UNet IP-Adapter"
    if has(lambda k: k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.",
                                   "diffusion_model.", "label_emb."))):
        return "this looks like a UNet (diffusion model) state dict (it belongs in models/diffusion_models)"
    if has(lambda k: k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "unet."))):
        return "this looks like a diffusers UNet or ControlNet, not an IP-Adapter"
    if has(lambda k: "quant_conv." in k):
        return "this looks like a VAE"
    return "this is not an IP-Adapter checkpoint"


# ---------------------------------------------------------------------------------------
# Detection proper


def _tensor(group: Mapping[str, torch.Tensor], gname: str, key: str, ndim: int, layout: str) -> torch.Tensor:
    t = group.get(key)
    if t is None:
        raise AdapterFormatError(
            f"{gname}.{key} is missing; a {layout} IP-Adapter needs it (found {gname} keys like "
            f"{_example_list(sorted(group), 4)}). The file may be incomplete or of another family."
        )
    if t.dim() != ndim:
        raise AdapterFormatError(
            f"{gname}.{key} has shape {tuple(t.shape)}; expected a {ndim}-d tensor. The file is damaged "
            "or not an IP-Adapter."
        )
    return t


def _parse_gates(layers: Mapping[str, torch.Tensor], widths: dict[int, int]) -> bool:
    """True when the layers carry MIP-Adapter gates, after checking that every layer has one
    of shape (1, layer width) and no gate sits on a layer without K/V weights."""
    gates: dict[int, torch.Tensor] = {}
    for key, t in layers.items():
        m = _GATE_KEY.match(key)
        if m is not None:
            gates[int(m.group(1))] = t
    if not gates:
        return False
    stray = sorted(set(gates) - set(widths))
    if stray:
        raise AdapterFormatError(
            f"this looks like a MIP-Adapter, but ip_adapter layers {_example_list(stray, 4)} hold a text_to_weight "
            "gate and no to_k_ip/to_v_ip weights; the file is damaged"
        )
    lacking = sorted(set(widths) - set(gates))
    if lacking:
        raise AdapterFormatError(
            f"this looks like a MIP-Adapter ({len(gates)} layers hold a text_to_weight gate), but layers "
            f"{_example_list(lacking, 6)} have none; every cross-attention layer of a MIP-Adapter needs "
            "'ip_adapter.N.text_to_weight.weight'. The file is damaged or was edited."
        )
    for n in sorted(gates):
        t = gates[n]
        if tuple(t.shape) != (1, widths[n]):
            raise AdapterFormatError(
                f"ip_adapter.{n}.text_to_weight.weight has shape {tuple(t.shape)}; a MIP-Adapter gate of a layer "
                f"of width {widths[n]} is a (1, {widths[n]}) matrix (Linear(width, 1) without bias). "
                "The file is damaged or a variant this pack does not know."
            )
    return True


def _parse_layers(layers: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(context width, per-layer widths) from the ip_adapter group, after checking that the
    layers form the unbroken odd sequence 1, 3, 5, ... with matching K/V pairs.
    MIP-Adapter gates (`N.text_to_weight.weight`) are left to _parse_gates."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    other = []
    for key, t in layers.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            if not _GATE_KEY.match(key):
                other.append(key)
            continue
        found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if other:
        raise AdapterFormatError(
            f"unexpected ip_adapter keys {_example_list(['ip_adapter.' + k for k in sorted(other)], 4)}; "
            "expected only 'ip_adapter.N.to_k_ip.weight' / 'ip_adapter.N.to_v_ip.weight' (UNet IP-Adapter; "
            "MIP-Adapter adds 'ip_adapter.N.text_to_weight.weight'). "
            "Adapters for Flux, SD3.5 and other families are not supported yet."
        )
    if not found:
        if any(_GATE_KEY.match(k) for k in layers):
            raise AdapterFormatError(
                "the ip_adapter group holds MIP-Adapter text_to_weight gates but no to_k_ip/to_v_ip weights; "
                "the file is incomplete"
            )
        raise AdapterFormatError("the ip_adapter group is empty; the file holds no cross-attention weights")

    idx = sorted(found)
    even = [n for n in idx if n % 2 == 0]
    if even:
        raise AdapterFormatError(
            f"ip_adapter layers use indices {_example_list(even, 4)}; IP-Adapter layers are numbered with odd "
            "indices 1, 3, 5, ... (the even slots belong to the self-attention processors). "
            "The file is damaged or of another family."
        )
    missing = sorted(set(range(1, idx[-1] + 1, 2)) - set(idx))
    if missing:
        raise AdapterFormatError(
            f"ip_adapter layers have gaps: found {len(idx)} layers numbered up to {idx[-1]}, but "
            f"{_example_list(missing, 6)} are missing; expected consecutive odd indices 1, 3, 5, .... "
            "The file is probably damaged or was edited."
        )

    widths = []
    context = None
    for n in idx:
        pair = found[n]
        for kv in ("k", "v"):
            if kv not in pair:
                raise AdapterFormatError(
                    f"ip_adapter.{n}.to_{kv}_ip.weight is missing while its partner "
                    f"to_{'v' if kv == 'k' else 'k'}_ip is present; every layer needs both K and V weights"
                )
        k, v = pair["k"], pair["v"]
        for kv, t in (("k", k), ("v", v)):
            if t.dim() != 2:
                raise AdapterFormatError(
                    f"ip_adapter.{n}.to_{kv}_ip.weight has shape {tuple(t.shape)}; expected a 2-d "
                    "(layer width, context width) matrix"
                )
        if k.shape != v.shape:
            raise AdapterFormatError(
                f"ip_adapter.{n}: to_k_ip is {tuple(k.shape)} but to_v_ip is {tuple(v.shape)}; "
                "K and V of one layer must have the same shape"
            )
        if context is None:
            context = k.shape[1]
        elif k.shape[1] != context:
            raise AdapterFormatError(
                f"ip_adapter.{n}.to_k_ip.weight reads context width {k.shape[1]} but layer 1 reads "
                f"{context}; all layers of an adapter share one context width"
            )
        widths.append(int(k.shape[0]))
    return int(context), tuple(widths)


def _check_mip_shape(num_layers: int, context: int) -> None:
    """MIP-Adapter exists for SDXL only (70 cross-attention layers); refuse other structures
    here, where the message can say so, rather than as a key mismatch at apply time."""
    if num_layers == _MIP_LAYERS:
        return
    if num_layers == 16:  # SD1.5's attn2 count; its context width is 768
        raise AdapterFormatError(
            f"this is a MIP-Adapter checkpoint shaped for SD1.5 ({num_layers} cross-attention layers, context "
            f"width {context}); MIP-Adapter is supported for SDXL only (70 layers, context width 2048, as in the "
            "published model_sdxl.bin / model_sdxl_plus.bin). Use an SDXL MIP-Adapter with an SDXL model."
        )
    raise AdapterFormatError(
        f"this is a MIP-Adapter checkpoint with {num_layers} cross-attention layers (context width {context}); "
        f"MIP-Adapter is supported for SDXL only, whose UNet has {_MIP_LAYERS} cross-attention layers. "
        "The file is damaged or a variant this pack does not know."
    )


def is_kolors_plus(context: int, resampler_dim: Optional[int]) -> bool:
    """Kolors IP-Adapter-Plus: an SDXL-shaped Plus adapter whose resampler is 2048 wide (SDXL Plus: 1280)."""
    return context == 2048 and resampler_dim == 2048


def _encoder_name(width: int, encoder_input: str) -> str:
    table = _IMAGE_EMBEDS_ENCODERS if encoder_input == "image_embeds" else _HIDDEN_ENCODERS
    return table.get(width, f"CLIP vision of width {width}")


def _detect_layout(ip: Mapping[str, torch.Tensor]) -> str:
    # "light" and "vit-G" adapters are base-layout files: light differs only in training,
    # vit-G only in the encoder width E, so neither needs a layout of its own.
    if "latents" in ip:
        return "plus"
    if "proj.3.weight" in ip:
        return "full-face"
    if "proj.weight" in ip:
        return "base"
    raise AdapterFormatError(
        f"unrecognised image_proj layout (found keys like {_example_list(sorted(ip), 4)}); expected "
        "'proj.weight' + 'norm.*' (base/light/vit-G), 'latents' + 'layers.*' (Plus, Plus-Face, Composition) "
        "or 'proj.0/2/3.*' (Full-face)"
    )


def check_layout(flat: Mapping[str, torch.Tensor], want: Mapping[str, tuple], family: str) -> None:
    """Every key of `want` present with its shape, nothing else, all floating point; else an
    AdapterFormatError naming the keys (shared by every family's detection)."""
    missing = [k for k in want if k not in flat]
    unexpected = [k for k in flat if k not in want]
    wrong = [(k, tuple(flat[k].shape), want[k]) for k in want if k in flat and tuple(flat[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing {_example_list(missing, 4)}")
    if unexpected:
        problems.append(f"unexpected {_example_list(unexpected, 4)}")
    if wrong:
        problems.append("wrong shapes: " + ", ".join(f"{k} is {s}, expected {w}" for k, s, w in wrong[:4])
                        + (f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""))
    if problems:
        raise AdapterFormatError(
            f"the file looks like {family} but does not match that layout: "
            + "; ".join(problems) + ". The file is damaged or a variant this pack does not know."
        )
    not_float = [k for k, t in flat.items() if not t.is_floating_point()]
    if not_float:
        raise AdapterFormatError(
            f"weights {_example_list(not_float, 3)} are of type {flat[not_float[0]].dtype}; "
            "expected floating-point weights"
        )


def _check_against(flat: Mapping[str, torch.Tensor], spec: AdapterSpec) -> None:
    check_layout(flat, expected_shapes(spec), f"an {spec.family_name}")


def _as_groups(state: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    if not isinstance(state, Mapping):
        raise AdapterFormatError(f"expected a dictionary of weights, got a {type(state).__name__}")
    return group_state(flatten_state(state))


def detect_family(state: Mapping[str, Any]) -> AdapterSpec:
    """The AdapterSpec of a checkpoint, from key names and shapes only.

    `state` is the grouped dict of load_adapter_state (flat dotted keys work too).
    Raises AdapterFormatError saying what was found and what was expected."""
    groups = _as_groups(state)
    all_keys = [f"{g}.{k}" if g else k for g, sub in groups.items() for k in sub]
    if not all_keys:
        raise AdapterFormatError("the file holds no weights")

    from .dit_families import detect_dit_family, dit_family_of  # that module builds on this one

    if dit_family_of(groups):
        return detect_dit_family(groups)

    from .face_families import detect_face_family, face_family_of  # that module builds on this one

    if face_family_of(groups):
        return detect_face_family(groups)
    return detect_unet_family(groups)


def check_groups(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Both halves of a UNet adapter present and nothing else, or an AdapterFormatError saying
    what the file holds instead."""
    all_keys = [f"{g}.{k}" if g else k for g, sub in groups.items() for k in sub]
    layers = groups.get("ip_adapter")
    ip = groups.get("image_proj")
    if not layers or not ip:
        if not layers and not ip:
            raise AdapterFormatError(
                f"found keys like {_example_list(sorted(all_keys)[:3], 3)} — {_foreign_hint(all_keys)}. "
                "An IP-Adapter holds 'image_proj.*' and 'ip_adapter.N.to_k_ip/to_v_ip.weight' weights."
            )
        have, lack = ("image_proj", "ip_adapter") if ip else ("ip_adapter", "image_proj")
        raise AdapterFormatError(
            f"the file has '{have}' weights but no '{lack}' weights; an IP-Adapter needs both "
            "(the file is incomplete or was saved from part of a model)"
        )
    extra = sorted(g for g in groups if g not in ("image_proj", "ip_adapter"))
    if extra:
        keys = [f"{g}.{k}" if g else k for g in extra for k in groups[g]]
        raise AdapterFormatError(
            f"besides 'image_proj' and 'ip_adapter' the file holds {_example_list(keys, 4)}; "
            f"{_foreign_hint(keys)}, or a variant this pack does not know"
        )


def detect_unet_family(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> AdapterSpec:
    """The CLIP-image families (base, light, vit-G, Plus, Full-face, Kolors Plus, MIP-Adapter)."""
    check_groups(groups)
    layers, ip = groups["ip_adapter"], groups["image_proj"]
    context, widths = _parse_layers(layers)
    mip_gate = _parse_gates(layers, {2 * i + 1: w for i, w in enumerate(widths)})
    if mip_gate:
        _check_mip_shape(len(widths), int(context))
    layout = _detect_layout(ip)
    extra_fields: dict[str, Any] = {}

    if layout == "base":
        norm = _tensor(ip, "image_proj", "norm.weight", 1, layout)
        proj = _tensor(ip, "image_proj", "proj.weight", 2, layout)
        c = int(norm.shape[0])
        if proj.shape[0] % c:
            raise AdapterFormatError(
                f"image_proj.proj.weight has {proj.shape[0]} rows, not a multiple of the token width {c} "
                "(image_proj.norm); the file is damaged"
            )
        tokens, enc_width, encoder_input = proj.shape[0] // c, int(proj.shape[1]), "image_embeds"
    elif layout == "full-face":
        first = _tensor(ip, "image_proj", "proj.0.weight", 2, layout)
        c = int(_tensor(ip, "image_proj", "proj.2.weight", 2, layout).shape[0])
        tokens, enc_width, encoder_input = _FULL_FACE_TOKENS, int(first.shape[1]), "penultimate"
    else:
        latents = _tensor(ip, "image_proj", "latents", 3, layout)
        proj_in = _tensor(ip, "image_proj", "proj_in.weight", 2, layout)
        c = int(_tensor(ip, "image_proj", "proj_out.weight", 2, layout).shape[0])
        depth = len({k.split(".")[1] for k in ip if k.startswith("layers.") and k.count(".") >= 2})
        if depth == 0:
            raise AdapterFormatError("image_proj has 'latents' but no resampler 'layers.*'; the file is damaged")
        to_q = _tensor(ip, "image_proj", "layers.0.0.to_q.weight", 2, layout)
        ff = _tensor(ip, "image_proj", "layers.0.1.1.weight", 2, layout)
        if to_q.shape[0] % HEAD_DIM:
            raise AdapterFormatError(
                f"image_proj.layers.0.0.to_q.weight has {to_q.shape[0]} rows, not a multiple of the head "
                f"width {HEAD_DIM}; this resampler variant is not supported"
            )
        tokens, enc_width, encoder_input = int(latents.shape[1]), int(proj_in.shape[1]), "penultimate"
        extra_fields = dict(
            resampler_dim=int(latents.shape[2]),
            resampler_heads=int(to_q.shape[0] // HEAD_DIM),
            resampler_depth=depth,
            resampler_ff_dim=int(ff.shape[0]),
        )

    if c != context:
        raise AdapterFormatError(
            f"image_proj makes image tokens of width {c}, but the ip_adapter layers read width {context}; "
            "the two halves of the file do not belong together"
        )

    encoder_name = _encoder_name(enc_width, encoder_input)
    arch_hint = _ARCH_HINTS.get((len(widths), int(context)))
    if layout == "plus" and is_kolors_plus(int(context), extra_fields["resampler_dim"]):
        # Kolors' UNet has SDXL's layer shapes; only the 2048-wide resampler tells its adapter apart
        # (ComfyUI_IPAdapter_plus IPAdapterPlus.py, is_kwai_kolors: layers.0.0.to_out rows == 2048).
        arch_hint = "kolors" if arch_hint == "sdxl" else arch_hint
        if enc_width == 1024:
            encoder_name = KOLORS_PLUS_ENCODER

    spec = AdapterSpec(
        layout=layout,
        tokens=int(tokens),
        context_dim=int(context),
        encoder_width=enc_width,
        encoder_input=encoder_input,
        encoder_name=encoder_name,
        num_layers=len(widths),
        layer_dims=widths,
        arch_hint=arch_hint,
        mip_gate=mip_gate,
        **extra_fields,
    )
    _check_against({f"{g}.{k}": t for g, sub in groups.items() for k, t in sub.items()}, spec)
    return spec
