"""Image prompts to image tokens: the host's CLIP vision encoder, the negative (uncond)
conventions of the original IP-Adapter code, combining several references, and the
adapter's projection network."""
from __future__ import annotations

from typing import Optional

import torch

from ..models.encoding import COMBINE_METHODS
from .patch import tensor_to_size
_ENCODE_CHUNK = 16


def _encode(clip_vision, images: torch.Tensor, what: str) -> torch.Tensor:
    import comfy.utils

    outs = []
    chunks = list(torch.split(images, _ENCODE_CHUNK, dim=0))
    bar = comfy.utils.ProgressBar(len(chunks)) if len(chunks) > 1 else None
    for chunk in chunks:
        out = clip_vision.encode_image(chunk)
        outs.append(out[what])
        if bar is not None:
            bar.update(1)
    return torch.cat(outs, dim=0)


def encoder_output_name(spec) -> str:
    return "penultimate_hidden_states" if spec.encoder_input == "penultimate" else "image_embeds"


def encode_images(clip_vision, spec, image: torch.Tensor, image_negative: Optional[torch.Tensor]):
    """Positive and negative encoder outputs for the adapter described by `spec`.

    Negatives: for adapters reading hidden states, the encoding of a black image (or of
    the given negative image); for adapters reading image_embeds, zeros (or the
    negative image's embeds)."""
    from ..models.encoding import check_embeds

    if image is None or image.shape[0] == 0:
        raise ValueError("the image input holds no images (a batch of 0): connect at least one reference image")
    what = encoder_output_name(spec)
    pos = _encode(clip_vision, image, what)
    width = pos.shape[-1]
    if width != spec.encoder_width:
        raise ValueError(
            f"this adapter needs {spec.encoder_name} ({what} width {spec.encoder_width}), but the connected "
            f"CLIP vision model gives width {width}. Load the CLIP vision model the adapter was trained with."
        )
    check_embeds(pos, "image embeddings")
    if image_negative is not None and image_negative.shape[0] > 0:
        neg = _encode(clip_vision, image_negative, what)
    elif spec.encoder_input == "penultimate":
        size = getattr(clip_vision, "image_size", 224)
        neg = _encode(clip_vision, torch.zeros(1, size, size, 3), what)
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
