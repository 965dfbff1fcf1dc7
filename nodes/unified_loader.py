"""'IPAdapter Unified Loader (Fused)': a preset like ComfyUI_IPAdapter_plus's unified loader, resolved from
what the files in models/ipadapter and models/clip_vision hold (nodes/auto_select.py), not their names."""
from __future__ import annotations

from .auto_select import AUTO_CLIP_VISION, BY_PRESET, PRESETS, clip_vision_name, pick_adapter
from .clip_vision import load_clip_vision
from .loaders import FOLDER, load_adapter

CATEGORY = "ipadapter_fused"


def _files(folder: str) -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list(folder)


class IPAdapterFusedUnifiedLoader:
    DESCRIPTION = ("Finds the IP-Adapter of a preset in models/ipadapter and the CLIP vision model it needs in "
                   "models/clip_vision by what the files hold (never by their names), and loads both. The model "
                   "passes through unchanged; connect the three outputs to 'Apply IPAdapter (Fused)'.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "IPADAPTER_FUSED", "CLIP_VISION")
    RETURN_NAMES = ("model", "ipadapter", "clip_vision")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the adapter is for; it passes through unchanged. Only "
                                               "adapters that fit it (SD1.5 or SDXL, layer by layer) are considered."}),
                "preset": (list(PRESETS), {"default": "standard",
                           "tooltip": "Which adapter, as in ComfyUI_IPAdapter_plus: light (SD1.5 only, low "
                                      "strength), standard (ViT-H, medium), vit-G (ViT-bigG, medium), plus (ViT-H "
                                      "resampler, high), plus-face (portraits), full-face (SD1.5 only, portraits "
                                      "stronger). Found by the file's structure; light/standard and plus/plus-face "
                                      "look alike, so with both present choose with ipadapter_file. On Flux, "
                                      "Chroma and SD3.5 the one adapter that fits the model is used."}),
            },
            "optional": {
                "ipadapter_file": ([BY_PRESET] + _files(FOLDER), {"default": BY_PRESET,
                                   "tooltip": "Overrides the preset: this file from models/ipadapter is loaded "
                                              "whatever it is."}),
                "clip_vision_file": ([AUTO_CLIP_VISION] + _files("clip_vision"), {"default": AUTO_CLIP_VISION,
                                     "tooltip": "'auto' picks the file of models/clip_vision whose contents give "
                                                "what the adapter reads (kind and width); a file name overrides "
                                                "that choice."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, ipadapter_file=BY_PRESET, clip_vision_file=AUTO_CLIP_VISION):
        from .model_files import all_valid, validate_file
        return all_valid(validate_file(FOLDER, ipadapter_file, "IP-Adapter file", (BY_PRESET,)),
                         validate_file("clip_vision", clip_vision_file, "CLIP vision file", (AUTO_CLIP_VISION,)))

    def load(self, model, preset, ipadapter_file=BY_PRESET, clip_vision_file=AUTO_CLIP_VISION):
        if ipadapter_file and ipadapter_file != BY_PRESET:
            name = ipadapter_file
        else:
            import folder_paths
            name = pick_adapter(preset, model.get_model_object("diffusion_model"),
                                list(folder_paths.get_filename_list(FOLDER)),
                                lambda n: folder_paths.get_full_path(FOLDER, n), FOLDER)
        adapter = load_adapter(name)
        encoder = clip_vision_name(adapter.spec, clip_vision_file)
        clip_vision = load_clip_vision(encoder)
        info = f"{name}: {adapter.spec.describe()}; CLIP vision: {encoder}"
        return {"ui": {"ipadapter_info": [info]}, "result": (model, adapter, clip_vision)}
