"""What a file in models/clip_vision is, read from its safetensors header alone, and whether it is the
encoder an adapter needs. No weights are read, so every file of the folder can be looked at when choosing.

The description is cached by (real path, size, mtime): a folder listed again costs a stat per file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .loading import FileDescriptions, AdapterFormatError, read_safetensors_header
from .vision_encoder import VisionEncoderError, infer_vision_config

__all__ = ["VisionFile", "describe_vision_file", "encoder_fits", "encoder_needed", "published_name"]

# (kind, width, layers, patch, image side in patches, projection) -> the published tower. The grid, not the
# pixel size: SigLIP so400m-384 is 27 x 27 patches of 14 (its conv drops 6 px), which the shapes read as 378.
_PUBLISHED = {
    ("clip", 1024, 24, 14, 16, 768): "CLIP ViT-L/14",
    ("clip", 1024, 24, 14, 24, 768): "CLIP ViT-L/14-336",
    ("clip", 1280, 32, 14, 16, 1024): "CLIP ViT-H/14",
    ("clip", 1664, 48, 14, 16, 1280): "CLIP ViT-bigG/14",
    ("siglip", 1152, 27, 14, 27, None): "SigLIP so400m-patch14-384",
    ("siglip", 1152, 27, 16, 32, None): "SigLIP so400m-patch16-512",
}

_KIND_NAMES = {"clip": "CLIP", "siglip": "SigLIP"}


@dataclass(frozen=True)
class VisionFile:
    """One file of the clip_vision folder. kind: "clip", "siglip", or "other" (then `problem` says what
    it is instead, or why it could not be read)."""
    kind: str
    name: str = ""                      # published tower ("CLIP ViT-H/14"), else a description of its size
    width: int = 0                      # hidden width = penultimate hidden states' width
    projection: Optional[int] = None    # image_embeds width (CLIP visual_projection); None: no projection
    image_size: int = 0
    layers: int = 0
    pooling_head: bool = False          # SigLIP's vision_model.head.* (its pooled output) is in the file
    problem: str = ""

    @property
    def is_encoder(self) -> bool:
        return self.kind in _KIND_NAMES

    @property
    def penultimate_width(self) -> int:
        return self.width

    def describe(self) -> str:
        if not self.is_encoder:
            return self.problem
        parts = [f"hidden width {self.width}"]
        if self.kind == "clip":
            parts.append(f"image_embeds {self.projection}" if self.projection else "no projection (no image_embeds)")
        else:
            parts.append("with its attention-pooling head" if self.pooling_head else "without its pooling head")
        parts.append(f"{self.layers} layers, {self.image_size} px")
        return f"{self.name} ({', '.join(parts)})"


def published_name(kind: str, width: int, layers: int, patch: int, image_size: int, projection) -> str:
    known = _PUBLISHED.get((kind, width, layers, patch, image_size // patch, projection))
    if known:
        return known
    return f"{_KIND_NAMES[kind]} vision tower of width {width}"


def _describe_uncached(path: str) -> VisionFile:
    name = os.path.basename(path)
    try:
        header = read_safetensors_header(path)
    except (AdapterFormatError, OSError) as e:
        return VisionFile("other", problem=f"not readable: {str(e).removeprefix(name + ': ')}")
    if header is None:
        if path.lower().endswith((".safetensors", ".sft")):
            return VisionFile("other", problem="a damaged .safetensors file (its header is not a table of tensors)")
        return VisionFile("other", problem="a pickled file (.bin/.pt): its contents are only read when chosen "
                                           "explicitly; a .safetensors version can be chosen automatically")
    try:
        cfg = infer_vision_config(header, name)
    except VisionEncoderError as e:
        text = str(e)
        for lead in (f"{name} is not a CLIP / SigLIP vision model: ", f"{name}: "):
            text = text.removeprefix(lead)
        if any(k.startswith("encoder.layer.") and "layer_scale" in k for k in header):
            text = "a DINOv2 image encoder, not CLIP / SigLIP"
        return VisionFile("other", problem=f"not a CLIP / SigLIP vision encoder: {text}")
    return VisionFile(kind=cfg.kind, width=cfg.width, projection=cfg.projection, image_size=cfg.image_size,
                      layers=cfg.layers, pooling_head=cfg.pooling_head,
                      name=published_name(cfg.kind, cfg.width, cfg.layers, cfg.patch, cfg.image_size,
                                          cfg.projection))


# What `path` is, from its header. Never raises for a bad file: the answer says what is wrong.
describe_vision_file = FileDescriptions(_describe_uncached, lambda why: VisionFile("other", problem=why))


def encoder_needed(spec) -> str:
    """What an adapter reads, e.g. 'CLIP ViT-H/14 image_embeds (1024 wide)'."""
    width = spec.encoder_width
    if spec.encoder_input == "image_embeds":
        return f"{spec.encoder_name} image_embeds ({width} wide)"
    if spec.encoder_input == "pooled":
        return f"{spec.encoder_name} pooled output ({width} wide, from its attention-pooling head)"
    return f"{spec.encoder_name} penultimate hidden states ({width} wide)"


def encoder_fits(spec, vision: VisionFile) -> Optional[str]:
    """None when the file gives what the adapter reads (kind and width); else why not, as a phrase."""
    if not vision.is_encoder:
        return vision.problem
    want = getattr(spec, "encoder_kind", "clip")
    if vision.kind != want:
        return f"it is {_KIND_NAMES[vision.kind]}, the adapter needs {_KIND_NAMES[want]}"
    width = spec.encoder_width
    if spec.encoder_input == "image_embeds":
        if vision.projection is None:
            return "it has no projection, so no image_embeds"
        if vision.projection != width:
            return f"its image_embeds are {vision.projection} wide, the adapter needs {width}"
        return None
    if vision.width != width:
        return f"its hidden states are {vision.width} wide, the adapter needs {width}"
    if spec.encoder_input == "pooled" and not vision.pooling_head:
        return "the file has no attention-pooling head (vision_model.head.*), whose output the adapter reads"
    return None
