"""Node classes: declarations and thin calls into apply.py / loaders.py. No state."""
from __future__ import annotations

from .apply import MIDDLE_BLOCK, apply_adapter, apply_adapter_and_crops
from .auto_select import AUTO_CLIP_VISION, resolve_clip_vision
from .clip_vision import IPAdapterFusedClipVisionLoader
from .encode import COMBINE_METHODS
from .encoders import FACE_EMBEDDING, FACE_STRUCTURE, FaceOptions
from .loaders import FOLDER, load_adapter
from .model_files import all_valid, validate_file
from .schedules import EMBEDS_SCALING, WEIGHT_TYPES
from .unified_loader import IPAdapterFusedUnifiedLoader

CATEGORY = "ipadapter_fused"
ADAPTER_TYPE = "IPADAPTER_FUSED"


def _files(folder: str) -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list(folder)


def _common_widgets():
    return {
        "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                             "tooltip": "Strength of the image prompt. Negative values push away from the image."}),
        "weight_type": (list(WEIGHT_TYPES), {"default": "linear",
                        "tooltip": "How the weight is spread over the model's layers. 'style transfer' and "
                                   "'composition' use only the UNet layers that carry style or layout (SD1.5/SDXL "
                                   "only); 'custom' takes the factors from layer_weights. On Flux, Chroma and SD3.5 "
                                   "the ramps run over the blocks in forward order and 'weak input/middle/output' "
                                   "act on the first/middle/last third of the blocks."}),
        "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                               "tooltip": "Fraction of the sampling schedule at which the image prompt starts acting."}),
        "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                             "tooltip": "Fraction of the sampling schedule after which the image prompt stops acting."}),
    }


def face_widgets():
    """The apply node's inputs for the face families (FaceID, FaceID Plus, Portrait, InstantID's adapter,
    Kolors FaceID); other adapters ignore them."""
    return {
        "insightface": ("IPAF_INSIGHTFACE", {"tooltip": "Face analysis from 'InsightFace Loader (Fused)'. Needed by "
                        "the face families (FaceID, FaceID Plus, Portrait, InstantID, Kolors FaceID), which read an "
                        "identity embedding of the face in each reference image; other adapters ignore it."}),
        "face_structure": (list(FACE_STRUCTURE), {"default": "auto",
                           "tooltip": "FaceID Plus only. V2 adds the face-embedding tokens back on top of the CLIP "
                                      "refinement (a shortcut with its own weight); V1 does not. The two are trained "
                                      "differently but hold the same keys, so the file cannot tell: 'auto' reads "
                                      "the file name (faceid-plusv2 -> V2, faceid-plus -> V1, any other name -> "
                                      "V2, the published default). Kolors FaceID-Plus always uses the shortcut."}),
        "face_structure_weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                                  "tooltip": "Weight of the V2 shortcut (the face structure): higher keeps the "
                                             "face's shape closer to the reference."}),
        "face_embedding": (list(FACE_EMBEDDING), {"default": "auto",
                           "tooltip": "The identity embedding as the family was trained on it ('auto': normed for "
                                      "FaceID, FaceID Plus and Portrait; raw for InstantID, Portrait unnorm and Kolors "
                                      "FaceID-Plus), or forced: e.g. 'normed' on Kolors FaceID-Plus reproduces "
                                      "ComfyUI_IPAdapter_plus, which norms it where Kolors' own pipeline does not."}),
        "faceid_lora_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                 "tooltip": "FaceID and FaceID Plus files carry a LoRA for the model that they were "
                                            "trained with; it is applied automatically at this strength (no separate "
                                            "LoRA file needed). 0 turns it off (with a warning in the log)."}),
    }


def _require_tensor(value, name: str, kind: str) -> None:
    # The API lets a prompt give a literal ({"__value__": [...]}) where a link is expected; the
    # host passes it on unchecked, so a list can arrive where a tensor must.
    import torch

    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a {kind} from another node's output, got a {type(value).__name__} "
                         "(a literal value in the prompt?)")


class IPAdapterFusedLoader:
    DESCRIPTION = "Loads an IP-Adapter checkpoint from models/ipadapter. The family is detected from its contents."
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER_TYPE,)
    RETURN_NAMES = ("ipadapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ipadapter_file": (_files(FOLDER), {"tooltip": "An IP-Adapter .safetensors or .bin file from models/ipadapter."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ipadapter_file):
        return validate_file(FOLDER, ipadapter_file, "IP-Adapter file")

    def load(self, ipadapter_file):
        adapter = load_adapter(ipadapter_file)
        # the front-end extension shows this on the node
        return {"ui": {"ipadapter_info": [adapter.spec.describe()]}, "result": (adapter,)}


class IPAdapterFusedApply:
    DESCRIPTION = ("Adds an image prompt to the model: decoupled cross-attention on SD1.5/SDXL UNets, the "
                   "adapter's extra attention in the blocks of Flux, Chroma and SD3.5. Several of these nodes can "
                   "be chained on one model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "IMAGE")
    RETURN_NAMES = ("MODEL", "face_crops")
    OUTPUT_TOOLTIPS = ("The model with the image prompt.",
                       "What the encoder read: the aligned face crops of the face families (FaceID, FaceID Plus, "
                       "Portrait, InstantID, Kolors FaceID), one per face used; for other adapters the reference "
                       "images.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        widgets = _common_widgets()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to add the image prompt to: SD1.5, SDXL, Flux, Chroma or "
                                               "SD3.5, whichever the adapter was made for."}),
                "ipadapter": (ADAPTER_TYPE, {"tooltip": "The adapter from 'IPAdapter Loader (Fused)'."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The vision encoder the adapter was trained with: most UNet "
                                                           "adapters use CLIP ViT-H/14, vit-G ones ViT-bigG/14, XLabs Flux "
                                                           "CLIP ViT-L/14; InstantX Flux and SD3.5 use SigLIP "
                                                           "so400m-patch14-384 (load it with 'IPAdapter CLIP Vision Loader "
                                                           "(Fused)', which keeps SigLIP's pooling head)."}),
                "image": ("IMAGE", {"tooltip": "Reference image(s). Several images are merged as combine_embeds says."}),
                **widgets,
                "combine_embeds": (list(COMBINE_METHODS), {"default": "concat",
                                   "tooltip": "How several reference images are merged: concat keeps all their tokens, "
                                              "the others merge the embeddings into one."}),
                "embeds_scaling": (list(EMBEDS_SCALING), {"default": "V only",
                                   "tooltip": "Where the weight is applied: to the attention output (V only) or to the "
                                              "image keys and values (K+V variants, stronger at high weights). UNet "
                                              "adapters only; DiT adapters take V only."}),
                "middle_block": (list(MIDDLE_BLOCK), {"default": "patch",
                                 "tooltip": "'patch' applies the image prompt to every cross-attention layer, as the "
                                            "original IP-Adapter does. 'skip' leaves the middle block out, which "
                                            "reproduces ComfyUI_IPAdapter_plus pictures exactly. UNets only."}),
            },
            "optional": {
                "image_negative": ("IMAGE", {"tooltip": "Optional negative reference (used by the uncond rows when CFG "
                                                        "is on). By default each family's own convention: a black image "
                                                        "(UNet hidden-state adapters, XLabs Flux), zero embeddings (UNet "
                                                        "base adapters, SD3.5), the reference itself (InstantX Flux)."}),
                "attn_mask": ("MASK", {"tooltip": "Optional region of the picture the image prompt acts on."}),
                "layer_weights": ("STRING", {"default": "", "multiline": False,
                                  "tooltip": "For weight_type 'custom': 'index:factor' pairs by transformer index "
                                             "(SD1.5 0-15, SDXL 0-10), e.g. '3:1.0, 6:1.0'; on DiTs by block, 'd' for "
                                             "double (SD3: joint) and 's' for single blocks, e.g. 'd0:1.0, s10:0.5'. "
                                             "Overrides the weight type when filled in."}),
                "weight_composition": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                                       "tooltip": "Weight of the composition layers for 'style and composition'."}),
                "image_weights": ("STRING", {"default": "",
                                  "tooltip": "Optional factor per reference image, e.g. '1.0, 0.5', applied to the "
                                             "images' encodings before combine_embeds merges them (empty: all 1)."}),
                **face_widgets(),
            },
        }

    def apply(self, model, ipadapter, clip_vision, image, weight, weight_type, start_at, end_at,
              combine_embeds, embeds_scaling, middle_block, image_negative=None, attn_mask=None,
              layer_weights="", weight_composition=1.0, image_weights="", insightface=None,
              face_structure="auto", face_structure_weight=1.0, face_embedding="auto", faceid_lora_strength=1.0):
        _require_tensor(attn_mask, "attn_mask", "MASK")
        face = FaceOptions(structure=face_structure, structure_weight=face_structure_weight, embedding=face_embedding)
        return apply_adapter_and_crops(model, ipadapter, clip_vision, image, weight, weight_type, start_at, end_at,
                                       combine_embeds, embeds_scaling, middle_block, image_negative, attn_mask,
                                       layer_weights, weight_composition, image_weights, insightface, face,
                                       faceid_lora_strength)


class IPAdapterFusedSimple:
    DESCRIPTION = ("All in one: loads the adapter and the CLIP vision model (by default the one whose contents fit "
                   "the adapter) and applies the image prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to add the image prompt to (SD1.5, SDXL, Flux, Chroma or SD3.5)."}),
            "image": ("IMAGE", {"tooltip": "Reference image(s); several are concatenated."}),
            "ipadapter_file": (_files(FOLDER), {"tooltip": "An IP-Adapter file from models/ipadapter."}),
            "clip_vision_file": ([AUTO_CLIP_VISION] + _files("clip_vision"), {"default": AUTO_CLIP_VISION,
                                 "tooltip": "The CLIP vision model the adapter needs, from models/clip_vision. 'auto' "
                                            "picks the file whose contents give what the adapter reads (kind and "
                                            "width, read from the file's header); a file name overrides that."}),
            **_common_widgets(),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ipadapter_file, clip_vision_file):
        return all_valid(validate_file(FOLDER, ipadapter_file, "IP-Adapter file"),
                         validate_file("clip_vision", clip_vision_file, "CLIP vision file", (AUTO_CLIP_VISION,)))

    def apply(self, model, image, ipadapter_file, clip_vision_file, weight, weight_type, start_at, end_at):
        adapter = load_adapter(ipadapter_file)
        if getattr(adapter.spec, "face", None) is not None:  # before loading a CLIP vision model for nothing
            raise ValueError(
                f"{ipadapter_file} is a {adapter.spec.family_name}: it reads a face identity embedding from an "
                "InsightFace model, which this all-in-one node has no input for. Use 'Apply IPAdapter (Fused)' with "
                "'InsightFace Loader (Fused)' connected to its insightface input (or 'InstantID (Fused)' for InstantID)")
        clip_vision = resolve_clip_vision(adapter.spec, clip_vision_file)
        return (apply_adapter(model, adapter, clip_vision, image, weight, weight_type, start_at, end_at),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterFusedLoader": IPAdapterFusedLoader,
    "IPAdapterFusedApply": IPAdapterFusedApply,
    "IPAdapterFusedSimple": IPAdapterFusedSimple,
    "IPAdapterFusedClipVisionLoader": IPAdapterFusedClipVisionLoader,
    "IPAdapterFusedUnifiedLoader": IPAdapterFusedUnifiedLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterFusedLoader": "IPAdapter Loader (Fused)",
    "IPAdapterFusedApply": "Apply IPAdapter (Fused)",
    "IPAdapterFusedSimple": "IPAdapter (Fused, all-in-one)",
    "IPAdapterFusedClipVisionLoader": "IPAdapter CLIP Vision Loader (Fused)",
    "IPAdapterFusedUnifiedLoader": "IPAdapter Unified Loader (Fused)",
}

# Scene composition nodes (regions, several references merged per position) live in region_nodes.py.
from .region_nodes import NODE_CLASS_MAPPINGS as _REGION_NODES, NODE_DISPLAY_NAME_MAPPINGS as _REGION_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_REGION_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_REGION_NAMES)

# InstantID (SDXL): face adapter, keypoints and IdentityNet ControlNet conditioning in one node (instantid.py).
from .instantid import NODE_CLASS_MAPPINGS as _INSTANTID_NODES, NODE_DISPLAY_NAME_MAPPINGS as _INSTANTID_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_INSTANTID_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_INSTANTID_NAMES)

# Face nodes (InsightFace loader, aligned face crops) live in face_nodes.py; insightface is optional.
from .face_nodes import NODE_CLASS_MAPPINGS as _FACE_NODES, NODE_DISPLAY_NAME_MAPPINGS as _FACE_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_FACE_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_FACE_NAMES)
