"""Nodes for composing scenes: an image prompt per region, and several references merged per
position. Declarations and thin calls only (apply.py, multi_ref_apply.py)."""
from __future__ import annotations

from .apply import apply_adapter
from .multi_ref import ROUTINGS, entity_rows, split_words
from .multi_ref_apply import apply_multi_reference, parse_object_weights
from .schedules import WEIGHT_TYPES

CATEGORY = "ipadapter_fused"
ADAPTER_TYPE = "IPADAPTER_FUSED"
MAX_REFERENCES = 4


def _weight_widgets():
    return {
        "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                             "tooltip": "Strength of the image prompt in its region."}),
        "weight_type": (list(WEIGHT_TYPES), {"default": "linear",
                        "tooltip": "How the weight is spread over the model's layers (as on 'Apply IPAdapter (Fused)')."}),
        "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                               "tooltip": "Fraction of the sampling schedule at which the image prompt starts acting."}),
        "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                             "tooltip": "Fraction of the sampling schedule after which the image prompt stops acting."}),
    }


class IPAdapterFusedRegion:
    DESCRIPTION = ("An image prompt that acts only inside a mask, with an optional text prompt for the same region. "
                   "Chain one per region; areas no region covers keep the base prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to add the region's image prompt to."}),
                "ipadapter": (ADAPTER_TYPE, {"tooltip": "The adapter from 'IPAdapter Loader (Fused)'."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The vision encoder the adapter was trained with."}),
                "image": ("IMAGE", {"tooltip": "Reference image(s) for this region."}),
                "mask": ("MASK", {"tooltip": "The region: 1 where the image prompt acts, 0 where it has no effect; "
                                             "soft values scale it. One mask, or one per image of the latent batch."}),
                "positive": ("CONDITIONING", {"tooltip": "The base positive prompt; the region's text is added to it."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (passed through)."}),
                **_weight_widgets(),
            },
            "optional": {
                "region_prompt": ("CONDITIONING", {"tooltip": "Optional text prompt for this region only (e.g. from "
                                                              "CLIP Text Encode); added to the positive prompt inside "
                                                              "the mask."}),
                "region_prompt_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                           "tooltip": "Strength of the region's text prompt inside the mask."}),
            },
        }

    def apply(self, model, ipadapter, clip_vision, image, mask, positive, negative, weight, weight_type, start_at,
              end_at, region_prompt=None, region_prompt_strength=1.0):
        import node_helpers
        import torch

        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a MASK from another node's output, got a {type(mask).__name__}")
        patched = apply_adapter(model, ipadapter, clip_vision, image, weight, weight_type, start_at, end_at,
                                attn_mask=mask)
        if region_prompt is not None:
            region = node_helpers.conditioning_set_values(region_prompt, {
                "mask": mask if mask.dim() == 3 else mask[None],
                "set_area_to_bounds": False,
                "mask_strength": float(region_prompt_strength),
            })
            positive = positive + region
        return (patched, positive, negative)


class IPAdapterFusedMultiReference:
    DESCRIPTION = ("Several reference objects on one adapter, merged per position so they do not blend: each "
                   "reference is named by a word of the prompt and acts where that word is drawn (MIP-Adapter "
                   "routing; its learned gate is used with MIP-Adapter files), or is routed by masks. Encodes the "
                   "prompt too: connect its CONDITIONING to the sampler's positive input.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"image_{i}": ("IMAGE", {"tooltip": f"Reference {i} (optional)."}) for i in range(3, MAX_REFERENCES + 1)}
        for i in range(1, MAX_REFERENCES + 1):
            optional[f"mask_{i}"] = ("MASK", {"tooltip": f"Region of reference {i}, for routing 'masks'."})
        optional["object_weights"] = ("STRING", {"default": "", "tooltip": "Optional factor per reference, e.g. "
                                                                           "'1.0, 0.8' (empty: all 1)."})
        w = _weight_widgets()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model (MIP-Adapter files: SDXL)."}),
                "ipadapter": (ADAPTER_TYPE, {"tooltip": "A MIP-Adapter (model_sdxl.bin, model_sdxl_plus.bin) or any "
                                                        "SD1.5/SDXL IP-Adapter (routed without the learned gate)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The vision encoder the adapter was trained with."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes the prompt and the entity words."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The positive prompt. It must contain every entity word."}),
                "entities": ("STRING", {"default": "", "tooltip": "One word of the prompt per reference, in the order "
                                                                  "of the image inputs, comma-separated, e.g. 'cat, "
                                                                  "jacket'. Words of several tokens work."}),
                "routing": (list(ROUTINGS), {"default": "attention",
                            "tooltip": "'attention': each reference acts where its entity word attends (with the "
                                       "MIP-Adapter gate when the file has one). 'masks': each reference acts inside "
                                       "its mask_N."}),
                "image_1": ("IMAGE", {"tooltip": "Reference 1 (several images of the same object are averaged)."}),
                "image_2": ("IMAGE", {"tooltip": "Reference 2."}),
                "weight": w["weight"],
                "weight_type": w["weight_type"],
                "start_at": w["start_at"],
                "end_at": w["end_at"],
            },
            "optional": optional,
        }

    def apply(self, model, ipadapter, clip_vision, clip, text, entities, routing, image_1, image_2, weight,
              weight_type, start_at, end_at, image_3=None, image_4=None, mask_1=None, mask_2=None, mask_3=None,
              mask_4=None, object_weights=""):
        images = [im for im in (image_1, image_2, image_3, image_4) if im is not None]
        masks = [m for m in (mask_1, mask_2, mask_3, mask_4) if m is not None]
        weights = parse_object_weights(object_weights)
        tokens = clip.tokenize(text)
        positive = clip.encode_from_tokens_scheduled(tokens)
        rows = None
        if routing == "attention":
            words = split_words(entities)
            if len(words) != len(images):
                more = "more references than entity names" if len(images) > len(words) else "more entity names than references"
                raise ValueError(f"{more}: {len(images)} reference image input(s) but {len(words)} entity word(s) in "
                                 f"{entities!r}; give one word of the prompt per reference, e.g. 'cat, jacket'")
            rows = entity_rows(clip, words, text)
        patched = apply_multi_reference(model, ipadapter, clip_vision, images, routing, entities=rows,
                                        masks=masks if routing == "masks" else None, weight=weight,
                                        weight_type=weight_type, start_at=start_at, end_at=end_at,
                                        object_weights=weights)
        return (patched, positive)


NODE_CLASS_MAPPINGS = {
    "IPAdapterFusedRegion": IPAdapterFusedRegion,
    "IPAdapterFusedMultiReference": IPAdapterFusedMultiReference,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterFusedRegion": "IPAdapter Region (Fused)",
    "IPAdapterFusedMultiReference": "IPAdapter Multi-Reference (Fused)",
}
