"""The LoRA held inside a FaceID checkpoint, put onto the host UNet as the host's own LoRA patches.

FaceID (and FaceID Plus / Plus V2) adapters were trained together with a LoRA on every attention
layer of the UNet. The checkpoint's `ip_adapter` group holds it per attention processor N of the
diffusers UNet, in diffusers' `attn_processors` order (down blocks, up blocks, mid block; in each
transformer block attn1 then attn2): `N.to_{q,k,v,out}_lora.{down,up}.weight`, applied as
`W x + up(down(x))` with no alpha (lora_scale 1). The same tensors are published as a separate LoRA
file that users load with a LoRA loader, and often forget: applying the checkpoint's copy here makes
that step unnecessary (the host test shows both give the same weights).

The sites come from the model's own module tree (`unet_sites`), never from SD1.5/SDXL tables:
processor 2i is attn1 and 2i+1 is attn2 of the transformer block holding cross-attention site i.
The patches are the host's LoRA patches (`ModelPatcher.add_patches`), so the host merges them when it
loads the model, and offloading, unpatching and other LoRAs keep working.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .unet_sites import unet_attn2_layers

log = logging.getLogger("ipadapter_fused")

# checkpoint name -> the attention module's linear layer (to_out is a Sequential: Linear, Dropout)
LORA_TARGETS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
# FaceID kinds (FaceSpec.kind) trained with their LoRA; Portrait, the face-embedding resampler and
# Kolors FaceID-Plus have none.
KINDS_WITH_LORA = {"faceid": "FaceID", "faceid-plus": "FaceID Plus"}
# A LoRA the user loaded from the published file counts as "the same" within this relative error
# (that file may be stored in fp16).
_SAME_LORA_RTOL = 2e-2


def _diffusion_model(model):
    """The UNet module of a ModelPatcher, a host BaseModel, or the UNet itself."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "diffusion_model"):
        return inner.diffusion_model
    if hasattr(model, "diffusion_model"):
        return model.diffusion_model
    return model


def _attention_pairs(unet) -> list[tuple[str, object, str, object]]:
    """(attn1 path, attn1, attn2 path, attn2) per transformer block, in checkpoint order."""
    names = {id(m): n for n, m in unet.named_modules()}
    pairs = []
    for site, attn2 in unet_attn2_layers(unet):
        path2 = names[id(attn2)]
        parent_path = path2.rsplit(".", 1)[0]
        block = unet.get_submodule(parent_path)
        attn1 = getattr(block, "attn1", None)
        if attn1 is None:
            raise ValueError(f"the transformer block {parent_path} has cross-attention but no self-attention (attn1): "
                             "the FaceID LoRA needs both, this is not a UNet it was made for")
        pairs.append((parent_path + ".attn1", attn1, path2, attn2))
    return pairs


def _linear_weight(attn, target: str) -> torch.Tensor:
    module = attn.get_submodule(target)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{target} is not a linear layer")
    return weight


def _lora_patch(up: torch.Tensor, down: torch.Tensor):
    """The host's own LoRA patch for W + up @ down (alpha None = scale 1, like the checkpoint)."""
    try:
        from comfy.weight_adapter import LoRAAdapter
    except ImportError:  # hosts before weight_adapter took the tuple form
        return ("lora", (up, down, None, None, None, None))
    return LoRAAdapter(set(), (up, down, None, None, None, None))


def faceid_lora_patches(model, lora: dict) -> dict:
    """{host weight key: host LoRA patch} for the checkpoint's LoRA `lora`
    (N -> {"q", "k", "v", "out"} -> (down (r, in), up (out, r))) on `model` (ModelPatcher, host
    model, or its UNet). Checks that every processor fits the model first and raises ValueError
    naming the processor and layer when one does not; touches nothing."""
    unet = _diffusion_model(model)
    pairs = _attention_pairs(unet)
    expected = 2 * len(pairs)
    if not isinstance(lora, dict) or not lora:
        raise ValueError("the FaceID LoRA is empty: the checkpoint holds no N.to_q_lora weights")
    bad = sorted((n for n in lora if not isinstance(n, int) or not 0 <= n < expected), key=str)
    if len(lora) != expected or bad:
        extra = f" (processors {bad[:4]} are beyond this model's {expected})" if bad else ""
        raise ValueError(
            f"the FaceID LoRA covers {len(lora)} attention layers but this model has {expected} "
            f"({len(pairs)} transformer blocks x self- and cross-attention){extra}: the adapter was made for a "
            "different model (SD1.5 and SDXL FaceID files are not interchangeable)")
    patches = {}
    for n in range(expected):
        path1, attn1, path2, attn2 = pairs[n // 2]
        path, attn = (path2, attn2) if n % 2 else (path1, attn1)
        layers = lora[n]
        if not isinstance(layers, dict) or set(layers) != set(LORA_TARGETS):
            got = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise ValueError(f"FaceID LoRA processor {n} ({path}) holds {got}; it needs q, k, v and out")
        for name, target in LORA_TARGETS.items():
            where = f"FaceID LoRA processor {n}, {target} of {path}"
            pair = layers[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{where}: expected (down, up), got {type(pair).__name__}")
            down, up = pair
            weight = _linear_weight(attn, target)
            out_f, in_f = weight.shape
            if not (torch.is_tensor(down) and torch.is_tensor(up) and down.dim() == 2 and up.dim() == 2):
                raise ValueError(f"{where}: down and up must be 2-D tensors")
            if not (down.is_floating_point() and up.is_floating_point()):
                raise ValueError(f"{where}: down and up must be floating point, got {down.dtype} / {up.dtype}")
            if down.shape[0] != up.shape[1]:
                raise ValueError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} have different ranks")
            if down.shape[1] != in_f or up.shape[0] != out_f:
                raise ValueError(
                    f"{where}: the LoRA maps {down.shape[1]} -> {up.shape[0]} features but the layer maps "
                    f"{in_f} -> {out_f}: the adapter was made for a different model")
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"{where}: the checkpoint's LoRA holds NaN or infinite values (damaged file?)")
            patches[f"diffusion_model.{path}.{target}.weight"] = _lora_patch(up.detach(), down.detach())
    return patches


def _patch_delta(patch) -> Optional[torch.Tensor]:
    """up @ down * alpha-scale of a host LoRA patch (either form), or None for other patch kinds."""
    weights = getattr(patch, "weights", None)
    if weights is None and isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    if not isinstance(weights, (tuple, list)) or len(weights) < 4 or weights[3] is not None:
        return None
    up, down, alpha = weights[0], weights[1], weights[2]
    if not (torch.is_tensor(up) and torch.is_tensor(down) and up.dim() == 2 and down.dim() == 2):
        return None
    scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
    return (up.float() @ down.float()) * scale


def same_lora_already_loaded(model, patches: dict) -> bool:
    """True when `model` (a ModelPatcher) already carries this LoRA on its first and last layer, as a
    LoRA loader leaves it after loading the published FaceID LoRA file: applying it again would
    double it."""
    existing = getattr(model, "patches", None) or {}
    keys = list(patches)
    for key in (keys[0], keys[-1]):
        ours = _patch_delta(patches[key])
        found = False
        for entry in existing.get(key, []):
            if len(entry) < 2 or any(x is not None for x in entry[3:5]):  # offset / function: not a plain LoRA
                continue
            theirs = _patch_delta(entry[1])
            if theirs is not None and theirs.shape == ours.shape:
                err = float((theirs - ours).norm()) / max(float(ours.norm()), 1e-12)
                if err <= _SAME_LORA_RTOL:
                    found = True
                    break
        if not found:
            return False
    return True


def apply_faceid_lora(patched_model, lora: dict, strength: float) -> bool:
    """Add the checkpoint's LoRA to `patched_model` (the apply node's own clone, never the caller's
    model) at `strength`. Returns whether patches were added: not when strength is 0, nor when the
    same LoRA is already on the model (loaded from the published file), which is logged."""
    if not isinstance(strength, (int, float)) or strength != strength or strength in (float("inf"), float("-inf")):
        raise ValueError(f"FaceID LoRA strength is {strength!r}; it must be a finite number")
    patches = faceid_lora_patches(patched_model, lora)  # checks everything before anything is added
    if strength == 0.0:
        return False
    if same_lora_already_loaded(patched_model, patches):
        log.warning("IPAdapter Fused: the FaceID LoRA is already on this model (loaded from its published "
                    "_lora.safetensors file by a LoRA loader); the copy inside the FaceID checkpoint is not added "
                    "again. Remove the LoRA loader, or turn the apply node's FaceID LoRA off, to use only one.")
        return False
    added = patched_model.add_patches(patches, float(strength))
    if len(added) != len(patches):
        missing = sorted(set(patches) - set(added))[:3]
        raise RuntimeError(f"the host did not accept FaceID LoRA patches for {missing}... "
                           "(its weight keys differ from the module tree)")
    return True


def missing_lora_warning(spec_kind: str, enabled: bool) -> Optional[str]:
    """One log line when a FaceID family trained with its LoRA runs without it; None otherwise."""
    family = KINDS_WITH_LORA.get(spec_kind)
    if enabled or family is None:
        return None
    return (f"IPAdapter Fused: the {family} adapter runs without its LoRA (FaceID LoRA strength 0). It was trained "
            "with the LoRA held in its own file, and the likeness is weaker without it. Raise the apply node's "
            "faceid_lora_strength (1.0 = as trained), unless you load the published ip-adapter-faceid*_lora "
            "file with a LoRA loader yourself.")
