"""Image prompts to image tokens: the host's CLIP vision encoder, the negative (uncond)
conventions of the original IP-Adapter code, combining several references, and the
adapter's projection network."""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from ..models.encoding import COMBINE_METHODS
from .prompt import tensor_to_size

_ENCODE_CHUNK = 16
# The host resizes the shorter side to the encoder's size before cropping the centre, so a
# 16 x 16384 strip becomes a 224 x 229376 float image (600 MB) on the way. Strips longer than
# this many times their width are cut to their centre first; the cut keeps the centre square
# the encoder sees (and a wide margin), so only such extreme strips are affected.
_MAX_ASPECT = 16
# Budget for the host's resized copies of one encoder call (bytes); big images go in small chunks.
_RESIZE_BUDGET = 256 * 2**20
# Below this a picture carries too little to describe; such inputs are nearly always a mistake
# upstream (an empty crop, a placeholder), and the encoder would see a blur of a few pixels.
MIN_IMAGE_SIDE = 16


def check_image(image, what: str = "image") -> None:
    """Raise a ValueError for an IMAGE input the encoder cannot use, before any work."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"the {what} input must be an IMAGE batch of shape (N, H, W, C), got {shape}")
    n, h, w, c = image.shape
    if n == 0:
        raise ValueError(f"the {what} input holds no images (a batch of 0): connect at least one reference image")
    if c not in (3, 4):
        raise ValueError(f"the {what} input has {c} channels per pixel; an IMAGE has 3 (RGB) or 4 (RGBA)")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"the {what} input is {w}x{h} pixels; a reference image needs at least {MIN_IMAGE_SIDE} pixels on each "
            "side (the encoder would see a blur of a few pixels). Check the node that made it (crop, mask, batch).")
    # min and max propagate NaN and show inf without the image-sized temporaries of isfinite
    lo, hi = torch.aminmax(image)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"the {what} input contains NaN or infinite pixel values")


def _centre_strip(images: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[1:3]
    short, long = min(h, w), max(h, w)
    if long <= _MAX_ASPECT * short:
        return images
    keep = _MAX_ASPECT * short
    start = (long - keep) // 2
    return images[:, start:start + keep] if h > w else images[:, :, start:start + keep]


def _encode(clip_vision, images: torch.Tensor, what: str) -> torch.Tensor:
    import comfy.utils

    size = int(getattr(clip_vision, "image_size", 224) or 224)
    images = _centre_strip(images)
    h, w = images.shape[1:3]
    scale = size / min(h, w)
    resized = round(scale * h) * round(scale * w) * 3 * 4  # float32 bytes per image after the host's resize
    chunk = max(1, min(_ENCODE_CHUNK, _RESIZE_BUDGET // max(resized, h * w * 3 * 4)))
    outs = []
    chunks = list(torch.split(images, chunk, dim=0))
    bar = comfy.utils.ProgressBar(len(chunks)) if len(chunks) > 1 else None
    for part in chunks:
        out = clip_vision.encode_image(part)
        outs.append(out[what])
        if bar is not None:
            bar.update(1)
    return torch.cat(outs, dim=0)


def encoder_output_name(spec) -> str:
    return {"penultimate": "penultimate_hidden_states", "pooled": "last_hidden_state"}.get(
        spec.encoder_input, "image_embeds")


POOLING_HEAD_ATTR = "ipadapter_fused_pooling_head"
_ENCODER_NAMES = {"clip": "a CLIP vision model", "siglip": "a SigLIP vision model"}


def encoder_kind(clip_vision) -> str:
    """'siglip' or 'clip', from the host model itself: SigLIP towers have no class token."""
    embeddings = getattr(getattr(getattr(clip_vision, "model", None), "vision_model", None), "embeddings", None)
    if embeddings is not None and getattr(embeddings, "class_embedding", "absent") is None:
        return "siglip"
    return "clip"


def check_encoder_kind(clip_vision, spec) -> None:
    want = getattr(spec, "encoder_kind", "clip")
    have = encoder_kind(clip_vision)
    if want != have:
        raise ValueError(
            f"this adapter needs {_ENCODER_NAMES[want]} ({spec.encoder_name}), but the connected CLIP_VISION is "
            f"{_ENCODER_NAMES[have]}; load {spec.encoder_name} in the CLIP vision loader")


def _pooling_head(clip_vision):
    head = getattr(clip_vision, POOLING_HEAD_ATTR, None)
    if head is None:
        raise ValueError(
            "this adapter reads SigLIP's pooled output, which the host's 'Load CLIP Vision' node does not keep "
            "(it drops the pooling head); load the SigLIP file with 'IPAdapter CLIP Vision Loader (Fused)' instead")
    return head


def _pooled(clip_vision, hidden: torch.Tensor) -> torch.Tensor:
    head = _pooling_head(clip_vision)
    p = next(head.parameters())
    with torch.no_grad():
        return head(hidden.to(p.device)).to(hidden.device)


def negative_convention(spec) -> str:
    """What the uncond rows read when no negative image is given, as each family's reference
    code does it: "black image" (its encoding), "zeros" (zero encoder output, projected), or
    "positive" (the same tokens as the cond rows: the family has no trained negative).

    - UNet adapters: zeros for image_embeds, a black image for hidden states (IP-Adapter);
    - XLabs Flux: a black image (x-flux's pipeline encodes np.zeros when no negative is given);
    - InstantX Flux: the positive tokens (it runs guidance-distilled Flux without an uncond pass);
    - InstantX SD3.5: zero hidden states through the resampler (its pipeline's zeros_like)."""
    injection = getattr(spec, "injection", "attn2")
    if injection == "xlabs":
        return "black image"
    if injection == "instantx-flux":
        return "positive"
    if injection == "instantx-sd3":
        return "zeros"
    return "black image" if spec.encoder_input == "penultimate" else "zeros"


# clip_vision -> {(output, pooled): encoding of a black image}: the default negative of the hidden-state
# families is the same for every apply of one encoder, and one encoder forward is most of an apply's time on
# a CPU (a ViT-H/14 pass at 224 px). Weakly keyed, so an unloaded encoder takes its entries with it.
_black_encodings: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _black_image_encoding(clip_vision, what: str, pooled: bool, encode) -> torch.Tensor:
    try:
        known = _black_encodings.setdefault(clip_vision, {})
    except TypeError:  # not weakly referenceable: no cache
        known = {}
    key = (what, pooled)
    if key not in known:
        size = getattr(clip_vision, "image_size", 224)
        known[key] = encode(torch.zeros(1, size, size, 3)).detach()
    return known[key]


def encode_images(clip_vision, spec, image: torch.Tensor, image_negative: Optional[torch.Tensor]):
    """Positive and negative encoder outputs for the adapter described by `spec`.

    Negatives: the given negative image's encoding, else the family's convention (see
    negative_convention)."""
    from ..models.encoding import check_embeds

    check_image(image, "image")
    if image_negative is not None:
        check_image(image_negative, "image_negative")
    check_encoder_kind(clip_vision, spec)
    what = encoder_output_name(spec)
    pooled = spec.encoder_input == "pooled"

    def encode(images):
        out = _encode(clip_vision, images, what)
        return _pooled(clip_vision, out) if pooled else out

    if pooled:
        _pooling_head(clip_vision)  # before any encoding work
    pos = encode(image)
    width = pos.shape[-1]
    if width != spec.encoder_width:
        raise ValueError(
            f"this adapter needs {spec.encoder_name} ({what} width {spec.encoder_width}), but the connected "
            f"CLIP vision model gives width {width}. Load the CLIP vision model the adapter was trained with."
        )
    check_embeds(pos, "image embeddings")
    convention = negative_convention(spec)
    if image_negative is not None:
        neg = encode(image_negative)
    elif convention == "black image":
        neg = _black_image_encoding(clip_vision, what, pooled, encode)
    elif convention == "positive":
        neg = pos
    else:
        neg = torch.zeros_like(pos)
    check_embeds(neg, "negative image embeddings")
    return pos, tensor_to_size(neg, pos.shape[0])


def image_tokens(adapter_weights, pos: torch.Tensor, neg: torch.Tensor, combine: str) -> torch.Tensor:
    """(2, N, T, C) tokens: row 0 positive, row 1 negative, N images (1 unless `concat`).
    With `concat` the patch joins the N images' tokens along the sequence (one softmax
    over all of them), which is what the established implementation's batch reshaping
    amounts to."""
    from ..models.encoding import check_embeds, combine_embeds

    if combine not in COMBINE_METHODS:
        raise ValueError(f"unknown combine_embeds {combine!r}; choose one of: {', '.join(COMBINE_METHODS)}")
    if combine != "concat" and pos.shape[0] > 1:
        pos = combine_embeds(pos, combine)
        neg = neg[:1]
    with torch.no_grad():
        tp = adapter_weights.image_tokens(pos)
        tn = adapter_weights.image_tokens(neg)
    tokens = torch.stack([tp, tn])
    check_embeds(tokens, "image tokens")
    return tokens
