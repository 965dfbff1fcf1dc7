"""Applying several reference objects merged per position (multi_ref.MergedPrompt): every
check first, then one clone and one install."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .apply import _check_mask, _register, check_adapter_fits
from .encode import encode_images
from .multi_ref import ROUTINGS, MergedPrompt
from .patch import install
from .schedules import resolve_site_weights
from .unet_sites import unet_attn2_layers


def check_references(images: Sequence, routing: str, entities: Optional[Sequence], masks: Optional[Sequence],
                     object_weights: Optional[Sequence[float]]) -> None:
    n = len(images)
    if n < 1:
        raise ValueError("connect at least one reference image")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; choose one of: {', '.join(ROUTINGS)}")
    if routing == "attention":
        names = len(entities or ())
        if names != n:
            more = "more references than entity names" if n > names else "more entity names than references"
            raise ValueError(f"{more}: {n} reference image input(s) but {names} entity word(s); give one word of the "
                             "prompt per reference, in the order of the image inputs, e.g. 'cat, jacket'")
    else:
        given = len(masks or ())
        if given != n:
            raise ValueError(f"routing 'masks' needs one mask per reference: {n} reference image input(s) but "
                             f"{given} mask(s) connected")
    if object_weights is not None:
        if len(object_weights) != n:
            raise ValueError(f"object_weights lists {len(object_weights)} factor(s) for {n} reference(s)")
        if not all(math.isfinite(w) for w in object_weights):
            raise ValueError("object_weights holds a factor that is not a finite number")


def parse_object_weights(text: str) -> Optional[list[float]]:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"object_weights {text!r} is not understood: write one factor per reference, "
                         "e.g. '1.0, 0.8'") from None


def _object_tokens(weights, clip_vision, spec, images) -> torch.Tensor:
    """(N, 2, T, C): per object, its images' tokens averaged after projection (MIP-Adapter's
    convention for several pictures of one object) and the negative tokens."""
    p = next(weights.parameters())
    out = []
    for img in images:
        pos, neg = encode_images(clip_vision, spec, img, None)
        with torch.no_grad():
            tp = weights.image_tokens(pos.to(p.device, p.dtype)).mean(dim=0)
            tn = weights.image_tokens(neg[:1].to(p.device, p.dtype))[0]
        out.append(torch.stack([tp, tn]))
    return torch.stack(out)


def apply_multi_reference(model, adapter, clip_vision, images: Sequence[torch.Tensor], routing: str = "attention",
                          entities: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
                          masks: Optional[Sequence[torch.Tensor]] = None, weight: float = 1.0,
                          weight_type: str = "linear", start_at: float = 0.0, end_at: float = 1.0,
                          object_weights: Optional[Sequence[float]] = None, layer_weights: str = ""):
    """entities: per reference, (positive rows, negative rows) of its entity word's text encoding
    (multi_ref.entity_rows). masks: per reference, a MASK (routing 'masks')."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    check_references(images, routing, entities, masks, object_weights)
    for name, value in (("weight", weight), ("start_at", start_at), ("end_at", end_at)):
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}; it must be a finite number")
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) must not be after end_at ({end_at}); both lie in [0, 1]")
    if clip_vision is None:
        raise ValueError("no CLIP vision model connected: load the one the adapter needs with a CLIP Vision loader")
    spec = adapter.spec
    if spec.architecture != "unet":
        raise ValueError("merging references per position works with SD1.5/SDXL UNet adapters; on DiTs stack apply "
                         "nodes with masks instead")
    if getattr(spec, "face", None) is not None:
        raise ValueError(f"merging references per position reads CLIP encodings; this is a {spec.family_name}, which "
                         "reads face embeddings. Stack 'Apply IPAdapter (Fused)' nodes with an attn_mask per face "
                         "instead")
    unet = model.get_model_object("diffusion_model")
    if not hasattr(unet, "input_blocks"):
        raise ValueError("merging references per position works on SD1.5/SDXL UNets; this model is a DiT")
    layers = unet_attn2_layers(unet)
    sites = [s for s, _ in layers]
    if getattr(spec, "mip_gate", False) and {s.context_dim for s in sites} != {2048}:
        raise ValueError("this is a MIP-Adapter, whose checkpoints are made for SDXL; the model is not an SDXL UNet. "
                         "Use it with an SDXL model, or use a plain SD1.5 IP-Adapter with routing")
    check_adapter_fits(spec, sites, kolors_model=getattr(unet, "encoder_hid_proj", None) is not None)
    site_weights = resolve_site_weights(sites, weight_type, weight, 1.0, layer_weights)
    mask_stack = None
    if routing == "masks":
        checked = [_check_mask(m) for m in masks]
        sizes = {tuple(m.shape[-2:]) for m in checked}
        if len(sizes) > 1:
            raise ValueError(f"the masks have different sizes {sorted(sizes)}; give masks of one size")
        if any(m.shape[0] != 1 for m in checked):
            raise ValueError("routing 'masks' takes one mask per reference (a MASK with a single entry each)")
        mask_stack = torch.cat(checked)
    entity_k = None
    if routing == "attention":
        entity_k = []
        with torch.no_grad():
            for site, attn2 in layers:
                w = attn2.to_k.weight
                per_obj = []
                for pos_rows, neg_rows in entities:
                    if pos_rows.shape[-1] != site.context_dim:
                        raise ValueError(f"the entity words were encoded {pos_rows.shape[-1]} wide but the model's "
                                         f"cross-attention reads {site.context_dim}; connect the CLIP of this model")
                    rows = torch.stack([pos_rows, neg_rows]).to(w.device, w.dtype)
                    per_obj.append((rows @ w.t()).float().cpu())
                entity_k.append(per_obj)

    mm.load_models_gpu([adapter.patcher])
    tokens = _object_tokens(adapter.weights, clip_vision, spec, images).to(mm.intermediate_device())
    sampling = model.get_model_object("model_sampling")
    entry = MergedPrompt(adapter.weights, tokens, site_weights, sampling.percent_to_sigma(start_at),
                         sampling.percent_to_sigma(end_at), (start_at, end_at), routing, entity_k=entity_k,
                         masks=mask_stack, object_weights=object_weights)
    patched = model.clone()
    patched.model_options["transformer_options"] = install(patched.model_options, sites, entry)
    _register(patched, adapter, pe)
    return patched
