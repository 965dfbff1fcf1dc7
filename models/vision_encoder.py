"""CLIP and SigLIP vision towers described from their tensor shapes (a safetensors header), without
loading any weights, and the SigLIP attention-pooling head read from the same file.

The host (ComfyUI) ships configs for ViT-L/14 (224, 336), ViT-H/14, ViT-bigG/14 and SigLIP so400m
(384, 512) and picks one by key names and a few shapes. Any other size (a smaller CLIP, a SigLIP base,
the tiny encoders of the tests) it does not load; the facts below are enough to build the host's own
ClipVisionModel for it. What the shapes do not hold: the head count (see heads_for_width) and the MLP
activation (CLIP: "gelu" as the OpenCLIP towers; OpenAI's ViT-L uses quick_gelu but is a known size)."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from .loading import AdapterFormatError

HF_PREFIX = "vision_model."
OPENCLIP_PREFIX = "visual."
POOLING_HEAD_PREFIX = "vision_model.head."

# Published towers whose head dim is not 64: OpenCLIP ViT-H/14 (1280 = 16 x 80), ViT-bigG/14
# (1664 = 16 x 104), SigLIP so400m (1152 = 16 x 72). Every other CLIP / SigLIP size uses 64.
_HEADS_BY_WIDTH = {1152: 16, 1280: 16, 1664: 16}


class VisionEncoderError(AdapterFormatError):
    """A file in clip_vision that is not a CLIP / SigLIP vision tower the pack can describe."""


def heads_for_width(width: int) -> int:
    """The attention head count of a tower of this width. Not stored in the weights (q/k/v are
    width x width whatever the split): the published towers' counts, else width // 64 (min 1)."""
    return _HEADS_BY_WIDTH.get(width, max(1, width // 64))


@dataclass(frozen=True)
class VisionTowerConfig:
    kind: str                  # "clip" (class token, pre-LayerNorm) or "siglip" (neither)
    layout: str                # "hf" (vision_model.*) or "openclip" (visual.*)
    width: int
    layers: int
    heads: int
    mlp_width: int
    patch: int
    image_size: int
    projection: Optional[int]  # visual_projection rows (CLIP image_embeds width); None: no projection
    pooling_head: bool         # SigLIP's vision_model.head.* is in the file

    def facts(self) -> tuple:
        """What the weights fix (no head count, no activation): compared with the host's configs. The patch
        grid, not the image size: so400m's 384 px at patch 14 is a 27 x 27 grid (the conv drops 6 px), which
        the shapes read as 378 px."""
        return (self.kind, self.width, self.layers, self.mlp_width, self.patch, self.image_size // self.patch,
                self.projection)

    def host_config(self) -> dict:
        """The config dict the host's ClipVisionModel reads (Hugging Face CLIPVisionConfig names)."""
        cfg = {"hidden_size": self.width, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
               "intermediate_size": self.mlp_width, "patch_size": self.patch, "image_size": self.image_size,
               "num_channels": 3, "layer_norm_eps": 1e-6 if self.kind == "siglip" else 1e-5}
        if self.kind == "siglip":
            cfg.update(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        else:
            cfg.update(model_type="clip_vision_model", hidden_act="gelu")
        if self.projection is not None:
            cfg["projection_dim"] = self.projection
        return cfg

    def describe(self) -> str:
        name = "SigLIP" if self.kind == "siglip" else "CLIP"
        proj = f", projection {self.projection}" if self.projection else ""
        head = ", attention-pooling head" if self.pooling_head else ""
        return (f"{name} vision tower: width {self.width}, {self.layers} layers, {self.heads} heads, MLP "
                f"{self.mlp_width}, patch {self.patch}, image {self.image_size}{proj}{head}")


def host_config_facts(cfg: Mapping) -> Optional[tuple]:
    """VisionTowerConfig.facts() of one of the host's JSON configs (None for other encoders, e.g. DINOv2)."""
    kind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(cfg.get("model_type", "clip_vision_model"))
    if kind is None:
        return None
    return (kind, cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["patch_size"],
            cfg.get("image_size", 224) // cfg["patch_size"], cfg.get("projection_dim"))


def _what_else(keys) -> str:
    """A hint at what a file that is not a vision tower is, from its key names."""
    keys = list(keys)
    has = lambda *parts: any(k.startswith(parts) for k in keys)  # noqa: E731
    if has("ip_adapter", "image_proj") or any(".processor.ip_adapter" in k for k in keys):
        return "it holds IP-Adapter weights: put it in models/ipadapter and load it with 'IPAdapter Loader (Fused)'"
    if has("model.diffusion_model.", "double_blocks.", "joint_blocks.", "input_blocks."):
        return "it holds a diffusion model, not an image encoder"
    if has("text_model.", "encoder.block.", "shared.weight"):
        return "it holds a text encoder only"
    return "no CLIP / SigLIP vision tower keys (vision_model.embeddings.patch_embedding.weight, ...) were found"


def _layer_count(shapes: Mapping, pattern: str, name: str) -> int:
    found = {int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m}
    if not found:
        return 0
    if found != set(range(max(found) + 1)):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise VisionEncoderError(f"{name}: the vision tower's layers are not numbered 0..{max(found)} (missing {missing[:4]}); "
                                 "the file is damaged or incomplete")
    return max(found) + 1


def _grid_side(positions: int, name: str) -> int:
    side = math.isqrt(positions)
    if side * side != positions:
        raise VisionEncoderError(f"{name}: {positions} position embeddings do not make a square patch grid; "
                                 "the file is not a CLIP / SigLIP vision tower the pack can read")
    return side


def infer_vision_config(shapes: Mapping[str, tuple], name: str = "the file") -> VisionTowerConfig:
    """The tower's config from key -> shape (a safetensors header). Raises VisionEncoderError naming `name`
    when the keys are not a CLIP / SigLIP vision tower's, or disagree with each other."""
    # values: shapes, or (dtype, shape) pairs as models.loading.read_safetensors_header gives them
    shapes = {k: tuple(v[1] if len(v) == 2 and isinstance(v[1], tuple) else v) for k, v in shapes.items()}
    try:
        if HF_PREFIX + "embeddings.patch_embedding.weight" in shapes:
            return _infer_hf(shapes, name)
        if OPENCLIP_PREFIX + "conv1.weight" in shapes:
            return _infer_openclip(shapes, name)
    except KeyError as e:
        raise VisionEncoderError(f"{name}: the vision tower has no {e.args[0]!r}; the file is damaged or incomplete") from None
    raise VisionEncoderError(f"{name} is not a CLIP / SigLIP vision model: {_what_else(shapes)}")


def _infer_hf(s: Mapping[str, tuple], name: str) -> VisionTowerConfig:
    p = HF_PREFIX
    width, channels, patch, patch_w = s[p + "embeddings.patch_embedding.weight"]
    if channels != 3 or patch != patch_w:
        raise VisionEncoderError(f"{name}: the patch embedding is {s[p + 'embeddings.patch_embedding.weight']}, "
                                 "not (width, 3, patch, patch) of an image encoder")
    layers = _layer_count(s, re.escape(p) + r"encoder\.layers\.(\d+)\.", name)
    if layers == 0:
        raise VisionEncoderError(f"{name}: the vision tower has no encoder layers ({p}encoder.layers.N.*)")
    kind = "clip" if p + "embeddings.class_embedding" in s else "siglip"
    positions = s[p + "embeddings.position_embedding.weight"][0] - (1 if kind == "clip" else 0)
    side = _grid_side(positions, name)
    mlp_width = s[p + "encoder.layers.0.mlp.fc1.weight"][0]
    projection = s["visual_projection.weight"][0] if "visual_projection.weight" in s else None
    for k, want in ((p + "encoder.layers.0.self_attn.q_proj.weight", (width, width)),
                    (p + "post_layernorm.weight", (width,))):
        if s[k] != want:
            raise VisionEncoderError(f"{name}: {k} has shape {s[k]}, expected {want} for a tower of width {width}")
    return VisionTowerConfig(kind=kind, layout="hf", width=width, layers=layers, heads=heads_for_width(width),
                             mlp_width=mlp_width, patch=patch, image_size=side * patch, projection=projection,
                             pooling_head=POOLING_HEAD_PREFIX + "probe" in s)


def _infer_openclip(s: Mapping[str, tuple], name: str) -> VisionTowerConfig:
    p = OPENCLIP_PREFIX
    width, channels, patch, patch_w = s[p + "conv1.weight"]
    if channels != 3 or patch != patch_w:
        raise VisionEncoderError(f"{name}: {p}conv1.weight is {s[p + 'conv1.weight']}, not (width, 3, patch, patch)")
    layers = _layer_count(s, re.escape(p) + r"transformer\.resblocks\.(\d+)\.", name)
    if layers == 0 or p + "class_embedding" not in s:
        raise VisionEncoderError(f"{name}: an OpenCLIP vision tower needs {p}class_embedding and "
                                 f"{p}transformer.resblocks.N.*")
    side = _grid_side(s[p + "positional_embedding"][0] - 1, name)
    projection = s[p + "proj"][1] if p + "proj" in s else None
    return VisionTowerConfig(kind="clip", layout="openclip", width=width, layers=layers, heads=heads_for_width(width),
                             mlp_width=s[p + "transformer.resblocks.0.mlp.c_fc.weight"][0], patch=patch,
                             image_size=side * patch, projection=projection, pooling_head=False)


def read_pooling_head_state(path: str) -> dict:
    """The `vision_model.head.*` tensors of a safetensors file (only those are read; never a pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(POOLING_HEAD_PREFIX)}
