"""What an adapter reads, by encoder: a small registry.

An adapter's spec names its encoder (`spec.encoder`): CLIP image embeds, CLIP (or SigLIP) hidden
states, an InsightFace identity embedding, or an InsightFace embedding plus the CLIP hidden states
of the aligned face crop (the FaceID Plus family). Each encoder turns the apply node's inputs into
the positive and negative encoder outputs the adapter's projection reads; the apply pipeline after
that is the same for every family."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .encode import check_image, encode_images


FACE_STRUCTURE = ("auto", "V2 (shortcut on)", "V1 (shortcut off)")
FACE_EMBEDDING = ("auto", "normed", "raw")


@dataclass(frozen=True)
class FaceOptions:
    """The apply node's face settings, for the choices a checkpoint's keys cannot settle."""
    structure: str = "auto"          # FaceID Plus: V2 shortcut or not (FACE_STRUCTURE)
    structure_weight: float = 1.0    # the V2 shortcut's own weight
    embedding: str = "auto"          # normed or raw identity embedding where the family allows both
    adapter_name: str = ""           # the file name: the only hint for the two choices above


@dataclass(frozen=True)
class FaceEmbeds:
    """Encoder output of the face families: identity embeddings (N, 512) and, for FaceID Plus,
    the CLIP hidden states of the aligned crops (N, L, E). Batch operations act on both parts
    alike, so combining several references treats the two as one encoding."""
    face: torch.Tensor
    clip: Optional[torch.Tensor] = None

    @property
    def shape(self):  # the batch size is what the pipeline asks for
        return self.face.shape

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FaceEmbeds":
        return FaceEmbeds(fn(self.face), None if self.clip is None else fn(self.clip))

    def to(self, *args, **kwargs) -> "FaceEmbeds":
        return self.map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index) -> "FaceEmbeds":
        return self.map(lambda t: t[index])


@dataclass
class Encoded:
    pos: object                      # torch.Tensor, or FaceEmbeds for the face families
    neg: object
    crops: Optional[torch.Tensor] = None   # aligned face crops (IMAGE), what the face families read
    image_index: Optional[list] = None     # face families: the reference image each row came from


def _face_embedding_mode(spec, options: FaceOptions) -> str:
    """The family's convention ('auto'), or the user's override: the two references of a family can
    differ (Kolors' own pipeline feeds FaceID-Plus the raw embedding, ComfyUI_IPAdapter_plus the normed
    one), so matching pictures made elsewhere may need the other one."""
    wanted = spec.face.embedding
    if options.embedding != "auto":
        return options.embedding
    if wanted != "choice":
        return wanted
    return "raw" if "unnorm" in options.adapter_name.lower() else "normed"


def shortcut_scale(spec, options: FaceOptions) -> Optional[float]:
    """The FaceID Plus V2 shortcut weight, or None when the shortcut is off."""
    face = getattr(spec, "face", None)
    if face is None or face.shortcut == "none":
        return None
    if face.shortcut == "always":
        return float(options.structure_weight)
    structure = options.structure
    if structure == "auto":
        name = options.adapter_name.lower()
        if "v2" in name:
            structure = FACE_STRUCTURE[1]
        elif "plus" in name:
            structure = FACE_STRUCTURE[2]
        else:  # a renamed file: the published default (faceid-plusv2 is the one in use)
            structure = FACE_STRUCTURE[1] if face.shortcut_default else FACE_STRUCTURE[2]
    return float(options.structure_weight) if structure == FACE_STRUCTURE[1] else None


def _require_insightface(insightface, spec):
    if insightface is None:
        raise ValueError(
            f"this is a {spec.family_name}: it reads an InsightFace identity embedding. Connect "
            "'InsightFace Loader (Fused)' to the apply node's insightface input "
            f"({spec.face.model_pack} is the model pack it was trained with)")
    if not hasattr(insightface, "find_faces"):
        raise ValueError("the insightface input must come from 'InsightFace Loader (Fused)' "
                         f"(got a {type(insightface).__name__})")
    return insightface


def encode_clip(spec, clip_vision, insightface, image, image_negative, options) -> Encoded:
    if clip_vision is None:
        raise ValueError("no CLIP vision model connected: load the one the adapter needs with a CLIP Vision loader")
    pos, neg = encode_images(clip_vision, spec, image, image_negative)
    return Encoded(pos, neg)


def encode_face(spec, clip_vision, insightface, image, image_negative, options) -> Encoded:
    """InsightFace identity embeddings of every reference image; the negative is the zero embedding
    (the FaceID reference code's uncond). FaceID Plus also reads CLIP hidden states of the
    aligned crops, negative: a black image's (or image_negative's)."""
    check_image(image, "image")
    analysis = _require_insightface(insightface, spec)
    uses_clip = spec.face.uses_clip
    if uses_clip and clip_vision is None:
        raise ValueError(f"this {spec.family_name} also reads CLIP vision hidden states of the face crop; connect "
                         f"{spec.encoder_name} to clip_vision")
    rgb = image[..., :3]
    faces = analysis.find_faces(rgb)
    embeds = torch.stack([f.embedding.float() for f in faces])
    if _face_embedding_mode(spec, options) == "normed":
        embeds = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    crops = analysis.aligned_crops(rgb, faces, spec.face.crop_size)
    kept = [int(f.image_index) for f in faces]
    if not uses_clip:
        return Encoded(FaceEmbeds(embeds), FaceEmbeds(torch.zeros_like(embeds)), crops, kept)
    clip_spec = replace(spec, encoder_input="penultimate")
    clip_pos, clip_neg = encode_images(clip_vision, clip_spec, crops, image_negative)
    neg = FaceEmbeds(torch.zeros_like(embeds), clip_neg)
    return Encoded(FaceEmbeds(embeds, clip_pos), neg, crops, kept)


# encoder name (AdapterSpec.encoder) -> function (spec, clip_vision, insightface, image, image_negative, options)
ENCODERS: dict[str, Callable[..., Encoded]] = {
    "clip-embeds": encode_clip,
    "clip-hidden": encode_clip,
    "siglip-pooled": encode_clip,
    "siglip-hidden": encode_clip,
    "insightface": encode_face,
    "insightface+clip": encode_face,
}


def encoder_of(spec) -> str:
    name = getattr(spec, "encoder", None)
    if name is None:  # specs made before the encoder parts existed
        name = "clip-embeds" if spec.encoder_input == "image_embeds" else "clip-hidden"
    return name


def encode(spec, clip_vision, insightface, image, image_negative, options: FaceOptions = FaceOptions()) -> Encoded:
    name = encoder_of(spec)
    fn = ENCODERS.get(name)
    if fn is None:
        raise ValueError(f"{spec.family_name} reads an encoder this pack does not know ({name!r})")
    return fn(spec, clip_vision, insightface, image, image_negative, options)


def each_part(x, fn: Callable[[torch.Tensor], torch.Tensor]):
    """fn on an encoder output, part by part for FaceEmbeds (combining and weighting references)."""
    return x.map(fn) if isinstance(x, FaceEmbeds) else fn(x)


def project(weights, pos, neg, spec, options: FaceOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) image tokens from the encoder outputs, in the adapter's device/dtype."""
    p = next(weights.parameters())
    with torch.no_grad():
        if isinstance(pos, FaceEmbeds):
            scale = shortcut_scale(spec, options)
            out = []
            for part in (pos, neg):
                part = part.to(p.device, p.dtype)
                if part.clip is None:
                    out.append(weights.image_tokens(part.face))
                else:
                    out.append(weights.image_tokens(part.face, clip_hidden=part.clip, shortcut_scale=scale))
            return out[0], out[1]
        return weights.image_tokens(pos.to(p.device, p.dtype)), weights.image_tokens(neg.to(p.device, p.dtype))
