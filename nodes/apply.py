"""Applying an adapter to a host model: every check first, then one clone and one install,
so a bad input never leaves a half-patched model behind."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Optional

import torch

from ..models.encoding import combine_embeds as combine
from .dit_apply import (bind_to_model, check_architecture, check_dit_fits, dit_prompt, install_dit_prompt,
                        sd3_block_norms)
from .dit_patch import apply_model_wrapper, dit_prompts
from .encode import COMBINE_METHODS
from .encoders import FaceOptions, each_part, encode, project
from .patch import begin_run, install
from .prompt import ImagePrompt
from .schedules import EMBEDS_SCALING, resolve_site_weights
from .unet_sites import unet_attn2_sites

log = logging.getLogger("ipadapter_fused")
ADDITIONAL_MODELS_KEY = "ipadapter_fused"
MIDDLE_BLOCK = ("patch", "skip (IPAdapter_plus compatible)")


def _describe_model(sites) -> str:
    n, ctx = len(sites), sites[0].context_dim if sites else 0
    known = {(16, 768): "an SD1.5 model", (16, 1024): "an SD2 model", (70, 2048): "an SDXL model"}
    name = known.get((n, ctx), "this model")
    return f"{name} ({n} cross-attention layers, context width {ctx})"


def _is_kolors_adapter(spec) -> bool:
    # Kolors' Plus adapters are SDXL-shaped but carry a 2048-wide resampler (SDXL Plus: 1280); its
    # FaceID-Plus makes 4096-wide tokens for the Kolors UNet's encoder_hid_proj
    face = getattr(spec, "face", None)
    if face is not None:
        return face.kind == "kolors-faceid-plus"
    return spec.layout == "plus" and spec.context_dim == 2048 and spec.resampler_dim == 2048


def check_adapter_fits(spec, sites, kolors_model: bool = False) -> None:
    """Raise a ValueError naming the mismatch and what would fit."""
    if not sites:
        raise ValueError("this model has no cross-attention layers to patch")
    # Kolors and SDXL UNets have the same layer shapes; only the model tells them apart.
    if _is_kolors_adapter(spec) and not kolors_model:
        raise ValueError("this IP-Adapter was made for Kolors, but the model is not a Kolors UNet; "
                         "use an SDXL IP-Adapter (e.g. ip-adapter-plus_sdxl_vit-h) with this model")
    if kolors_model and not _is_kolors_adapter(spec):
        raise ValueError("the model is a Kolors UNet; use a Kolors IP-Adapter "
                         "(e.g. Kolors-IP-Adapter-Plus) with it")
    problem = _first_difference(spec, sites)
    if problem is not None:
        made_for = {"sd15": "SD1.5", "sdxl": "SDXL"}.get(spec.arch_hint or "", "another model")
        raise ValueError(
            f"this IP-Adapter does not fit the model: {problem}. The adapter was made for {made_for}; the model "
            f"is {_describe_model(sites)}. Use an adapter trained for the loaded model (e.g. ip-adapter_sd15 "
            f"for SD1.5, ip-adapter_sdxl_vit-h for SDXL)."
        )


def _first_difference(spec, sites) -> Optional[str]:
    """The first dimension in which adapter and model differ, as a phrase naming both sides
    (None when they fit). Checked from the coarsest to the finest, so the message names the
    cause rather than a consequence."""
    if spec.num_layers != len(sites):
        return (f"the adapter has {spec.num_layers} cross-attention layers, the model has {len(sites)}")
    ctx = sorted({s.context_dim for s in sites})
    if spec.context_dim not in ctx:
        model_ctx = ctx[0] if len(ctx) == 1 else "/".join(map(str, ctx))
        return (f"the adapter's image tokens have context width {spec.context_dim}, the model's cross-attention "
                f"reads context width {model_ctx}")
    for i, (a, s) in enumerate(zip(spec.layer_dims, sites)):
        if a != s.width:
            n_bad = sum(x != y.width for x, y in zip(spec.layer_dims, sites))
            more = f" ({n_bad} of {len(sites)} layers differ)" if n_bad > 1 else ""
            return (f"layer widths differ: cross-attention layer {i} ({'/'.join(map(str, s.key))}) is {a} wide "
                    f"in the adapter but {s.width} in the model{more}")
    return None


def faceid_lora_plan(spec, unet, strength: float, adapter):
    """The FaceID LoRA held in the checkpoint, as a step to run on the patched clone (None when the
    family has none, or the user turned it off: then one warning, since those adapters were trained
    with it). Fit is checked here, before any clone exists."""
    from .faceid_lora import KINDS_WITH_LORA, missing_lora_warning

    lora_spec = getattr(spec, "lora", None)
    if lora_spec is None:
        face = getattr(spec, "face", None)
        if face is not None and face.kind in KINDS_WITH_LORA:  # a file whose LoRA was stripped
            log.warning(f"IPAdapter Fused: this {KINDS_WITH_LORA[face.kind]} file holds no LoRA, but the adapter was "
                        "trained with one; load the published ip-adapter-faceid*_lora file with a LoRA loader "
                        "(the likeness is weaker without it)")
        return None

    if strength == 0.0:
        text = missing_lora_warning(spec.face.kind if spec.face else "faceid", False)
        if text:
            log.warning(text)
        return None

    from .faceid_lora import apply_faceid_lora, faceid_lora_patches

    lora = adapter.weights.lora_weights()
    faceid_lora_patches(unet, lora)  # raises, naming the layer, when the LoRA does not fit this model

    def apply_lora(patched):
        apply_faceid_lora(patched, lora, strength)
    return apply_lora


def _check_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.numel() == 0:
        raise ValueError(f"attn_mask must be a MASK of shape (H, W) or (N, H, W), got {tuple(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise ValueError("attn_mask contains NaN or infinite values")
    return mask.float().cpu()


def check_mask_batch(mask: Optional[torch.Tensor], latent_batch: int) -> None:
    """The latent batch is known only when sampling starts; one mask for all, or one per image."""
    if mask is not None and mask.shape[0] not in (1, latent_batch):
        raise ValueError(
            f"attn_mask holds {mask.shape[0]} masks but the latent batch has {latent_batch} images; "
            f"connect 1 mask (used for every image) or {latent_batch} (one per image)")


def parse_image_weights(text: str, n_images: int) -> Optional[list[float]]:
    """'1.0, 0.5': one factor per reference image (None when empty)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        weights = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"image_weights {text!r} is not understood: write one factor per reference image, "
                         "e.g. '1.0, 0.5'") from None
    if len(weights) != n_images:
        raise ValueError(f"image_weights lists {len(weights)} factor(s) but {n_images} reference image(s) are "
                         "connected; give one factor per image")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"image_weights {text!r} holds a factor that is not a finite number")
    return weights


def weigh_images(pos, neg, weights, method: str):
    """Per-image weights: the images' encodings combined with their weights (models.encoding.
    combine_embeds_weighted); the negatives follow as for an unweighted combine."""
    if weights is None:
        return pos, neg
    from ..models.encoding import combine_embeds_weighted

    pos = each_part(pos, lambda t: combine_embeds_weighted(t, weights, method))
    return pos, (neg if method == "concat" else neg[:1])


def _kept_weights(per_image, encoded):
    """Image weights of the images that kept a face (skipped images drop out with their factor)."""
    if per_image is None or encoded.image_index is None:
        return per_image
    return [per_image[i] for i in encoded.image_index]


def image_tokens(adapter, spec, pos, neg, combine_embeds: str, face: FaceOptions) -> torch.Tensor:
    """(2, N, T, C) tokens: row 0 positive, row 1 negative, N images (1 unless `concat`, where the
    patch joins the N images' tokens along the sequence: one softmax over all of them, which is
    what the established implementation's batch reshaping amounts to)."""
    from ..models.encoding import check_embeds

    if combine_embeds != "concat" and pos.shape[0] > 1:
        pos, neg = each_part(pos, lambda t: combine(t, combine_embeds)), neg[:1]
    tp, tn = project(adapter.weights, pos, neg, spec, face)
    tokens = torch.stack([tp, tn])
    check_embeds(tokens, "image tokens")
    return tokens


def run_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper (one per model, whatever the number of apply nodes): prepares the
    run's own model options (windows from the run's model_sampling, foreign patches on the
    host's fallback keys) and releases every adapter's run cache when sampling ends."""
    guider = executor.class_obj
    sampling = guider.model_patcher.get_model_object("model_sampling")
    entries = begin_run(guider.model_options, sampling)
    for prompt in dit_prompts(guider.model_options):
        prompt.begin_run(sampling)
        entries.append(prompt)
    try:
        noise = args[0] if args else kwargs.get("noise")
        if noise is not None:
            for entry in entries:
                check_mask_batch(entry.mask, noise.shape[0])  # before any step runs
        return executor(*args, **kwargs)
    finally:
        for entry in entries:
            entry.release()


def apply_adapter_and_crops(
    model,
    adapter,                 # nodes.loaders.LoadedAdapter
    clip_vision,
    image: torch.Tensor,
    weight: float = 1.0,
    weight_type: str = "linear",
    start_at: float = 0.0,
    end_at: float = 1.0,
    combine_embeds: str = "concat",
    embeds_scaling: str = "V only",
    middle_block: str = "patch",
    image_negative: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    layer_weights: str = "",
    weight_composition: float = 1.0,
    image_weights: str = "",
    insightface=None,
    face: FaceOptions = FaceOptions(),
    faceid_lora_strength: float = 1.0,
):
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    if embeds_scaling not in EMBEDS_SCALING:
        raise ValueError(f"unknown embeds_scaling {embeds_scaling!r}; choose one of: {', '.join(EMBEDS_SCALING)}")
    if combine_embeds not in COMBINE_METHODS:
        raise ValueError(f"unknown combine_embeds {combine_embeds!r}; choose one of: {', '.join(COMBINE_METHODS)}")
    if middle_block not in MIDDLE_BLOCK:
        raise ValueError(f"unknown middle_block {middle_block!r}; choose one of: {', '.join(MIDDLE_BLOCK)}")
    for name, value in (("weight", weight), ("weight_composition", weight_composition),
                        ("start_at", start_at), ("end_at", end_at)):
        if not math.isfinite(value):  # NaN passes the host's min/max widget checks
            raise ValueError(f"{name} is {value}; it must be a finite number")
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) must not be after end_at ({end_at}); both lie in [0, 1]")
    if not math.isfinite(faceid_lora_strength):
        raise ValueError(f"faceid_lora_strength is {faceid_lora_strength}; it must be a finite number")
    face = replace(face, adapter_name=face.adapter_name or getattr(adapter, "name", ""))

    spec = adapter.spec
    unet = model.get_model_object("diffusion_model")
    dit = check_architecture(spec, unet)
    if dit is not None:
        spec = bind_to_model(spec, dit)
        check_dit_fits(spec, dit)
        if spec.injection == "instantx-sd3":
            sd3_block_norms(unet)  # refuses q/k norms it cannot convert, before any work
        mask = _check_mask(attn_mask)
        per_image = parse_image_weights(image_weights, image.shape[0] if isinstance(image, torch.Tensor) else 0)
        encoded = encode(spec, clip_vision, insightface, image, image_negative, face)
        pos, neg = weigh_images(encoded.pos, encoded.neg, per_image, combine_embeds)
        if combine_embeds != "concat" and pos.shape[0] > 1:
            pos, neg = combine(pos, combine_embeds), neg[:1]
        mm.load_models_gpu([adapter.patcher])
        sampling = model.get_model_object("model_sampling")
        prompt = dit_prompt(spec, dit, adapter, pos, neg, weight, weight_type, layer_weights,
                            sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at),
                            (start_at, end_at), mask, embeds_scaling)
        patched = model.clone()
        install_dit_prompt(patched, dit, spec, prompt, unet)
        _register(patched, adapter, pe)
        if apply_model_wrapper not in patched.get_wrappers(pe.WrappersMP.APPLY_MODEL, ADDITIONAL_MODELS_KEY):
            patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, ADDITIONAL_MODELS_KEY, apply_model_wrapper)
        return patched, _shown(encoded, image)

    sites = unet_attn2_sites(unet)
    check_adapter_fits(spec, sites, kolors_model=getattr(unet, "encoder_hid_proj", None) is not None)
    site_weights = resolve_site_weights(sites, weight_type, weight, weight_composition, layer_weights)
    mask = _check_mask(attn_mask)
    lora = faceid_lora_plan(spec, unet, faceid_lora_strength, adapter)

    per_image = parse_image_weights(image_weights, image.shape[0] if isinstance(image, torch.Tensor) else 0)
    encoded = encode(spec, clip_vision, insightface, image, image_negative, face)
    pos, neg = weigh_images(encoded.pos, encoded.neg, _kept_weights(per_image, encoded), combine_embeds)
    mm.load_models_gpu([adapter.patcher])
    tokens = image_tokens(adapter, spec, pos, neg, combine_embeds, face)
    # Kolors FaceID-Plus: its 4096-wide tokens reach K/V through the UNet's own encoder_hid_proj, once here
    tokens = adapter.weights.context_tokens(tokens, getattr(unet, "encoder_hid_proj", None))
    tokens = tokens.to(mm.intermediate_device())

    sampling = model.get_model_object("model_sampling")
    skip = frozenset(s.key for s in sites if s.block == "middle") if middle_block != "patch" else frozenset()
    entry = ImagePrompt(
        adapter.weights, tokens, site_weights,
        sigma_start=sampling.percent_to_sigma(start_at),
        sigma_end=sampling.percent_to_sigma(end_at),
        embeds_scaling=embeds_scaling,
        mask=mask,
        window=(start_at, end_at),
    )

    patched = model.clone()
    patched.model_options["transformer_options"] = install(patched.model_options, sites, entry, skip)
    _register(patched, adapter, pe)
    if lora is not None:
        lora(patched)
    return patched, _shown(encoded, image)


def _shown(encoded, image) -> torch.Tensor:
    # what the encoder read: the aligned face crops for the face families, else the references
    return encoded.crops if encoded.crops is not None else image[..., :3]


def apply_adapter(model, adapter, clip_vision, image, *args, **kwargs):
    """The patched clone (apply_adapter_and_crops without the picture of what was read)."""
    return apply_adapter_and_crops(model, adapter, clip_vision, image, *args, **kwargs)[0]


def _register(patched, adapter, pe) -> None:
    """Keep the adapter weights loaded with the model, and one run wrapper per model."""
    others = patched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, others + [adapter.patcher])
    if run_wrapper not in patched.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, ADDITIONAL_MODELS_KEY):
        patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, ADDITIONAL_MODELS_KEY, run_wrapper)
