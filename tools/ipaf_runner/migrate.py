"""Front-end workflows that use ComfyUI_IPAdapter_plus nodes -> the same graph on this pack's nodes.

Pure Python (no ComfyUI import): used by tools/migrate_workflow.py and by the pack's
POST /ipadapter_fused/migrate route (the front-end's "Convert IPAdapter_plus nodes").

The front end stores widget values by position, so each node's values are read by the widget
order of that pack's declaration (PLUS_NODES, as in its INPUT_TYPES) and written in the order of
this pack's (TARGET_NODES, or the running host's declarations when given). Links keep their
slot by input/output name; IPADAPTER links become IPADAPTER_FUSED, INSIGHTFACE IPAF_INSIGHTFACE. Apply
nodes get middle_block = "skip (IPAdapter_plus compatible)", which reproduces that pack's pictures.
FaceID: what that pack carried inside IPADAPTER (CLIP vision, InsightFace) or put on the model (the FaceID
unified loader's LoRA) becomes loader nodes wired to each apply node, and apply-node settings
(faceid_lora_strength); what only a file name decided there (the V2 shortcut) is set where this pack
could decide otherwise; a FaceID LoRA loader on the model path is named in the report.
A node with no equivalent is left in place and named in the report with the reason; so is
anything that would break if converted (an adapter loader also feeding a node that stays).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .convert import map_widget_values, widget_inputs

COMPATIBLE_MIDDLE = "skip (IPAdapter_plus compatible)"
UNIFIED_TARGET = "IPAdapterFusedUnifiedLoader"
INSIGHTFACE_TARGET = "IPAdapterFusedInsightFaceLoader"
PACK_NODES_DIR = Path(__file__).resolve().parents[2] / "nodes"

# -- declarations (object_info format: input.required/optional in order, output, output_name) ---------

_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
_COMBINE5 = ["concat", "add", "subtract", "average", "norm average"]
_PLUS_WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                      "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                      "style and composition", "style transfer precise", "composition precise"]
_PLUS_PRESETS = ["LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
                 "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)"]


def _f(default, lo=-1.0, hi=5.0, step=0.05):
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step}]


def _decl(required, optional=None, output=(), output_name=None):
    return {"input": {"required": dict(required), "optional": dict(optional or {})},
            "output": list(output), "output_name": list(output_name or output)}


_WINDOW = [("start_at", _f(0.0, 0.0, 1.0, 0.001)), ("end_at", _f(1.0, 0.0, 1.0, 0.001))]
_APPLY_OPT = [("image_negative", ["IMAGE"]), ("attn_mask", ["MASK"]), ("clip_vision", ["CLIP_VISION"])]
_HEAD = [("model", ["MODEL"]), ("ipadapter", ["IPADAPTER"])]
_FACE_OPT = _APPLY_OPT + [("insightface", ["INSIGHTFACE"])]
_FACEID_PRESETS = ["FACEID", "FACEID PLUS - SD1.5 only", "FACEID PLUS V2", "FACEID PORTRAIT (style transfer)",
                   "FACEID PORTRAIT UNNORM - SDXL only (strong)"]


def _plus_faceid(kolors=False):
    return _decl(_HEAD + [("image", ["IMAGE"]), ("weight", _f(1.0, -1, 3)), ("weight_faceidv2", _f(1.0)),
                          *([("weight_kolors", _f(1.0))] if kolors else []), ("weight_type", [_PLUS_WEIGHT_TYPES]),
                          ("combine_embeds", [_COMBINE5]), *_WINDOW, ("embeds_scaling", [_SCALING])],
                 _FACE_OPT, ["MODEL", "IMAGE"], ["MODEL", "face_image"])


def _plus_apply(middle, optional=_APPLY_OPT):
    return _decl(_HEAD + middle, optional, ["MODEL"])


# The widget order of ComfyUI_IPAdapter_plus (IPAdapterPlus.py); tests/test_migrate.py checks these
# against that pack's own INPUT_TYPES.
PLUS_NODES = {
    "IPAdapterModelLoader": _decl([("ipadapter_file", [[]])], None, ["IPADAPTER"]),
    "IPAdapterUnifiedLoader": _decl([("model", ["MODEL"]), ("preset", [_PLUS_PRESETS])],
                                    [("ipadapter", ["IPADAPTER"])], ["MODEL", "IPADAPTER"], ["model", "ipadapter"]),
    "IPAdapter": _plus_apply([("image", ["IMAGE"]), ("weight", _f(1.0, -1, 3)), *_WINDOW,
                              ("weight_type", [["standard", "prompt is more important", "style transfer"]])],
                             [("attn_mask", ["MASK"])]),
    "IPAdapterAdvanced": _plus_apply([("image", ["IMAGE"]), ("weight", _f(1.0)), ("weight_type", [_PLUS_WEIGHT_TYPES]),
                                      ("combine_embeds", [_COMBINE5]), *_WINDOW, ("embeds_scaling", [_SCALING])]),
    "IPAdapterBatch": _plus_apply([("image", ["IMAGE"]), ("weight", _f(1.0)), ("weight_type", [_PLUS_WEIGHT_TYPES]),
                                   *_WINDOW, ("embeds_scaling", [_SCALING]),
                                   ("encode_batch_size", ["INT", {"default": 0, "min": 0, "max": 4096}])]),
    "IPAdapterStyleComposition": _plus_apply([
        ("image_style", ["IMAGE"]), ("image_composition", ["IMAGE"]), ("weight_style", _f(1.0)),
        ("weight_composition", _f(1.0)), ("expand_style", ["BOOLEAN", {"default": False}]),
        ("combine_embeds", [_COMBINE5, {"default": "average"}]), *_WINDOW, ("embeds_scaling", [_SCALING])]),
    "IPAdapterMS": _plus_apply([
        ("image", ["IMAGE"]), ("weight", _f(1.0)), ("weight_faceidv2", _f(1.0)), ("weight_type", [_PLUS_WEIGHT_TYPES]),
        ("combine_embeds", [_COMBINE5]), *_WINDOW, ("embeds_scaling", [_SCALING]),
        ("layer_weights", ["STRING", {"default": "", "multiline": True}])],
        _FACE_OPT),
    "IPAdapterPreciseStyleTransfer": _plus_apply([
        ("image", ["IMAGE"]), ("weight", _f(1.0)), ("style_boost", _f(1.0, -5, 5)), ("combine_embeds", [_COMBINE5]),
        *_WINDOW, ("embeds_scaling", [_SCALING])]),
    "IPAdapterPreciseComposition": _plus_apply([
        ("image", ["IMAGE"]), ("weight", _f(1.0)), ("composition_boost", _f(0.0, -5, 5)),
        ("combine_embeds", [_COMBINE5]), *_WINDOW, ("embeds_scaling", [_SCALING])]),
    "IPAdapterFaceID": _plus_faceid(),
    "IPAdapterFaceIDKolors": _plus_faceid(kolors=True),
    "IPAdapterInsightFaceLoader": _decl([("provider", [["CPU", "CUDA", "ROCM"]]),
                                         ("model_name", [["buffalo_l", "antelopev2"]])], None, ["INSIGHTFACE"]),
    "IPAdapterUnifiedLoaderFaceID": _decl(
        [("model", ["MODEL"]), ("preset", [_FACEID_PRESETS]), ("lora_strength", _f(0.6, 0, 1, 0.01)),
         ("provider", [["CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML"]])],
        [("ipadapter", ["IPADAPTER"])], ["MODEL", "IPADAPTER"], ["MODEL", "ipadapter"]),
}

# This pack's nodes (and the host's CLIPVisionLoader) as the converter writes them; the route and
# --object-info replace these with the running host's declarations. tests/test_migrate.py checks
# them against nodes/.
_FUSED_WEIGHT_TYPES = _PLUS_WEIGHT_TYPES + ["custom"]
TARGET_NODES = {
    "IPAdapterFusedLoader": _decl([("ipadapter_file", [[]])], None, ["IPADAPTER_FUSED"], ["ipadapter"]),
    "CLIPVisionLoader": _decl([("clip_name", [[]])], None, ["CLIP_VISION"]),
    "IPAdapterFusedApply": _decl(
        [("model", ["MODEL"]), ("ipadapter", ["IPADAPTER_FUSED"]), ("clip_vision", ["CLIP_VISION"]),
         ("image", ["IMAGE"]), ("weight", _f(1.0)), ("weight_type", [_FUSED_WEIGHT_TYPES, {"default": "linear"}]),
         *_WINDOW, ("combine_embeds", [_COMBINE5 + ["max", "min"], {"default": "concat"}]),
         ("embeds_scaling", [_SCALING, {"default": "V only"}]),
         ("middle_block", [["patch", COMPATIBLE_MIDDLE], {"default": "patch"}])],
        [("image_negative", ["IMAGE"]), ("attn_mask", ["MASK"]), ("layer_weights", ["STRING", {"default": ""}]),
         ("weight_composition", _f(1.0)), ("image_weights", ["STRING", {"default": ""}]),
         ("insightface", ["IPAF_INSIGHTFACE"]),
         ("face_structure", [["auto", "V2 (shortcut on)", "V1 (shortcut off)"], {"default": "auto"}]),
         ("face_structure_weight", _f(1.0)), ("face_embedding", [["auto", "normed", "raw"], {"default": "auto"}]),
         ("faceid_lora_strength", _f(1.0, 0.0, 2.0))],
        ["MODEL", "IMAGE"], ["MODEL", "face_crops"]),
    UNIFIED_TARGET: _decl([("model", ["MODEL"]),
                           ("preset", [["light", "standard", "vit-G", "plus", "plus-face", "full-face"],
                                       {"default": "standard"}])],
                          [("ipadapter_file", [["by preset (content)"], {"default": "by preset (content)"}]),
                           ("clip_vision_file", [["auto (by content)"], {"default": "auto (by content)"}])],
                          ["MODEL", "IPADAPTER_FUSED", "CLIP_VISION"], ["model", "ipadapter", "clip_vision"]),
    INSIGHTFACE_TARGET: _decl([("model_pack", [["buffalo_l", "antelopev2"]]),
                               ("provider", [["auto", "CPU", "CUDA"], {"default": "auto"}]),
                               ("det_size", ["INT", {"default": 640, "min": 128, "max": 2048, "step": 32}]),
                               ("face", [["largest", "by index"], {"default": "largest"}]),
                               ("face_index", ["INT", {"default": 0, "min": 0, "max": 63}]),
                               ("if_no_face", [["error", "skip image"], {"default": "error"}])],
                              None, ["IPAF_INSIGHTFACE"], ["insightface"]),
}

# That pack's types this pack has its own of.
TYPE_MAP = {"IPADAPTER": "IPADAPTER_FUSED", "INSIGHTFACE": "IPAF_INSIGHTFACE"}

# -- the rules, node by node ----------------------------------------------------------------------------

# Why each node that pack has is not converted (the report quotes these).
NO_EQUIVALENT = {
    "IPAAdapterFaceIDBatch": "it gives each latent of the batch its own reference face (unfold batch); this pack "
                             "applies every reference face to every latent",
    "IPAdapterUnifiedLoaderCommunity": "its presets (Composition, Kolors) are files this pack's loader does "
                                       "not pick; load the file with 'IPAdapter Loader (Fused)'",
    "IPAdapterBatch": "it gives each latent of the batch its own reference image (unfold batch); this pack "
                      "applies every reference to every latent",
    "IPAdapterStyleCompositionBatch": "unfold batch (one reference per latent) is not supported",
    "IPAdapterPreciseStyleTransferBatch": "unfold batch (one reference per latent) is not supported",
    "IPAdapterPreciseCompositionBatch": "unfold batch (one reference per latent) is not supported",
    "IPAdapterTiled": "tiled encoding of large references is not supported",
    "IPAdapterTiledBatch": "tiled encoding of large references is not supported",
    "IPAdapterEmbeds": "this pack has no EMBEDS type; connect the images to 'Apply IPAdapter (Fused)' "
                       "(combine_embeds, image_weights merge several)",
    "IPAdapterEmbedsBatch": "this pack has no EMBEDS type",
    "IPAdapterEncoder": "this pack has no EMBEDS type; 'Apply IPAdapter (Fused)' encodes its images itself",
    "IPAdapterCombineEmbeds": "this pack has no EMBEDS type; use combine_embeds / image_weights on "
                              "'Apply IPAdapter (Fused)' with the images batched",
    "IPAdapterSaveEmbeds": "this pack has no EMBEDS type",
    "IPAdapterLoadEmbeds": "this pack has no EMBEDS type",
    "IPAdapterClipVisionEnhancer": "the tiled CLIP vision enhancer is not supported",
    "IPAdapterClipVisionEnhancerBatch": "the tiled CLIP vision enhancer is not supported",
    "IPAdapterFromParams": "IPADAPTER_PARAMS pipelines are not converted; rebuild each region with "
                           "'IPAdapter Region (Fused)' (one per mask, chained)",
    "IPAdapterRegionalConditioning": "IPADAPTER_PARAMS pipelines are not converted; use 'IPAdapter Region "
                                     "(Fused)', which takes the mask, the image and a region prompt",
    "IPAdapterCombineParams": "IPADAPTER_PARAMS pipelines are not converted; chain 'IPAdapter Region (Fused)' nodes",
    "IPAdapterNoise": "an image helper of that pack with no counterpart here; it stays and works while "
                      "that pack is installed",
    "PrepImageForClipVision": "an image helper of that pack with no counterpart here (the apply node centre-"
                              "crops itself); it stays and works while that pack is installed",
    "IPAdapterWeights": "animation weight schedules are not supported",
    "IPAdapterWeightsFromStrategy": "animation weight schedules are not supported",
    "IPAdapterPromptScheduleFromWeightsStrategy": "animation weight schedules are not supported",
    "IPAdapterCombineWeights": "animation weight schedules are not supported",
}

_SIMPLE_WEIGHT_TYPES = {"standard": "linear", "prompt is more important": "ease out", "style transfer": "style transfer"}


@dataclass
class Rule:
    """How one of that pack's node types becomes one of this pack's."""
    target: str
    inputs: dict = field(default_factory=dict)      # that pack's input name -> this pack's (links and widgets)
    values: Optional[Callable[[dict], dict]] = None  # that pack's widget values -> this pack's (extra/changed)
    refuse: Optional[Callable[[dict, "_Graph", dict], Optional[str]]] = None  # why this instance stays
    drops: tuple = ()                               # inputs/widgets without a counterpart, named when used


def _same(*names):
    return {n: n for n in names}


_APPLY_LINKS = _same("model", "ipadapter", "image", "image_negative", "attn_mask", "clip_vision")
_APPLY_WIDGETS = _same("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling")
# weight_faceidv2 is the FaceID Plus V2 shortcut's weight, which this pack calls face_structure_weight
_FACE_INPUTS = {**_APPLY_LINKS, **_APPLY_WIDGETS, "insightface": "insightface",
                "weight_faceidv2": "face_structure_weight"}


def _compatible(extra=None):
    def values(v):
        out = {"middle_block": COMPATIBLE_MIDDLE}
        out.update(extra(v) if extra else {})
        return out
    return values


# Loaders whose IPADAPTER also carried the CLIP vision model (the converted apply node is wired to it).
_CARRIES_CLIP_VISION = ("IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID")


def _refuse_faceid(node, graph, values):
    """A FaceID use (a FaceID node, or IPAdapterMS with insightface) converts only when a CLIP vision model
    reaches it: optional there, required by this pack's apply node."""
    t = node.get("type")
    faceid_use = t != "IPAdapterMS" or graph.input_link(node, "insightface") is not None
    if t == "IPAdapterFaceIDKolors" and values.get("weight_kolors", 1.0) != 1.0:
        return (f"weight_kolors = {values['weight_kolors']} scales the Kolors UNet's encoder_hid_proj for the adapter "
                "in that pack; this pack has no counterpart (set weight_kolors to 1.0 to convert)")
    if not faceid_use or graph.input_link(node, "clip_vision") is not None:
        return None
    src = graph.source(graph.input_link(node, "ipadapter"))
    if src is not None and graph.nodes.get(src[0], {}).get("type") in _CARRIES_CLIP_VISION:
        return None
    encoder = "clip-vit-large-patch14-336" if t == "IPAdapterFaceIDKolors" else "CLIP ViT-H/14"
    return ("clip_vision is not connected and its adapter comes from a loader without a CLIP vision model (that "
            "pack stopped there with 'Missing CLIPVision model'); this pack's apply node needs one: connect a "
            f"CLIPVisionLoader with {encoder} to clip_vision, then convert")


def _refuse_style_composition(node, graph, values):
    if values.get("expand_style"):
        return "expand_style ('strong style and composition') has no counterpart here"
    a, b = graph.source(graph.input_link(node, "image_style")), graph.source(graph.input_link(node, "image_composition"))
    if a is None or a != b:
        return ("image_style and image_composition come from different images; this pack's 'style and "
                "composition' takes one reference for both")
    return None


def _refuse_boost(boost):
    def refuse(node, graph, values):
        w, b = values.get("weight", 1.0), values.get(boost, 1.0 if boost == "style_boost" else 0.0)
        if b != w:
            return (f"{boost} ({b}) differs from weight ({w}); this pack's precise types use the weight for "
                    f"both (set {boost} = weight to convert)")
        return None
    return refuse


RULES = {
    "IPAdapterModelLoader": Rule("IPAdapterFusedLoader", _same("ipadapter_file")),
    "IPAdapterUnifiedLoader": Rule(UNIFIED_TARGET, _same("model", "preset"), drops=("ipadapter",)),
    "IPAdapterAdvanced": Rule("IPAdapterFusedApply", {**_APPLY_LINKS, **_APPLY_WIDGETS}, _compatible()),
    "IPAdapter": Rule("IPAdapterFusedApply", _same("model", "ipadapter", "image", "attn_mask", "weight", "start_at",
                                                   "end_at"),
                      _compatible(lambda v: {"weight_type": _SIMPLE_WEIGHT_TYPES.get(v.get("weight_type"), "linear")})),
    "IPAdapterStyleComposition": Rule(
        "IPAdapterFusedApply", {**_APPLY_LINKS, **_APPLY_WIDGETS, "image_style": "image", "weight_style": "weight",
                                "weight_composition": "weight_composition"},
        _compatible(lambda v: {"weight_type": "style and composition"}), _refuse_style_composition,
        drops=("image_composition",)),
    "IPAdapterMS": Rule("IPAdapterFusedApply", {**_FACE_INPUTS, "layer_weights": "layer_weights"},
                        _compatible(), _refuse_faceid),
    "IPAdapterFaceID": Rule("IPAdapterFusedApply", _FACE_INPUTS, _compatible(), _refuse_faceid),
    # that pack norms the Kolors FaceID-Plus embedding (Kolors' own pipeline feeds it raw, this pack's default)
    "IPAdapterFaceIDKolors": Rule("IPAdapterFusedApply", _FACE_INPUTS,
                                  _compatible(lambda v: {"face_embedding": "normed"}), _refuse_faceid,
                                  drops=("weight_kolors",)),
    "IPAdapterInsightFaceLoader": Rule(INSIGHTFACE_TARGET, {"model_name": "model_pack"}),
    # becomes IPAdapterFusedLoader + CLIPVisionLoader + the InsightFace loader (convert_unified_faceid)
    "IPAdapterUnifiedLoaderFaceID": Rule("IPAdapterFusedLoader", {}),
    "IPAdapterPreciseStyleTransfer": Rule(
        "IPAdapterFusedApply", {**_APPLY_LINKS, **_APPLY_WIDGETS},
        _compatible(lambda v: {"weight_type": "style transfer precise"}), _refuse_boost("style_boost"),
        drops=("style_boost",)),
    "IPAdapterPreciseComposition": Rule(
        "IPAdapterFusedApply", {**_APPLY_LINKS, **_APPLY_WIDGETS},
        _compatible(lambda v: {"weight_type": "composition precise"}), _refuse_boost("composition_boost"),
        drops=("composition_boost",)),
}
# The unified loader's presets in words this pack's loader also uses (matched to its choices).
_PRESET_WORDS = [("light", "light"), ("vit-g", "vit-g"), ("plus face", "plus-face"), ("full face", "full-face"),
                 ("plus", "plus"), ("standard", "standard")]
# Without the unified loader: the files that pack's presets load on SD1.5, for the user to check.
_PRESET_FILES = {"light": "ip-adapter_sd15_light_v11.bin", "standard": "ip-adapter_sd15.safetensors",
                 "vit-g": "ip-adapter_sd15_vit-G.safetensors", "plus": "ip-adapter-plus_sd15.safetensors",
                 "plus-face": "ip-adapter-plus-face_sd15.safetensors",
                 "full-face": "ip-adapter-full-face_sd15.safetensors"}
_PRESET_ENCODERS = {"vit-g": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"}
_DEFAULT_ENCODER = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"

APPLY_TYPES = {t for t, r in RULES.items() if r.target == "IPAdapterFusedApply"}
LOADER_TYPES = {"IPAdapterModelLoader", "IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID"}
FACE_APPLY_TYPES = {"IPAdapterFaceID", "IPAdapterFaceIDKolors"}

# The FaceID unified loader's presets: the published files (SD1.5, SDXL; None where that pack has no such
# preset), matched against the files there are by name without separators, as that pack's patterns do.
_FACEID_PRESET_FILES = [
    ("faceid portrait unnorm", (None, "ip-adapter-faceid-portrait_sdxl_unnorm.bin")),
    ("faceid portrait", ("ip-adapter-faceid-portrait-v11_sd15.bin", "ip-adapter-faceid-portrait_sdxl.bin")),
    ("faceid plus v2", ("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sdxl.bin")),
    ("faceid plus", ("ip-adapter-faceid-plus_sd15.bin", None)),
    ("faceid", ("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid_sdxl.bin")),
]
_FACEID_FILE_ENDINGS = {"ip-adapter-faceid-portrait-v11_sd15.bin": ("portraitv11sd15", "portraitsd15"),
                        "ip-adapter-faceid-portrait_sdxl.bin": ("portraitsdxl",),
                        "ip-adapter-faceid-portrait_sdxl_unnorm.bin": ("portraitsdxlunnorm",),
                        "ip-adapter-faceid-plusv2_sd15.bin": ("faceidplusv2sd15",),
                        "ip-adapter-faceid-plusv2_sdxl.bin": ("faceidplusv2sdxl",),
                        "ip-adapter-faceid-plus_sd15.bin": ("faceidplussd15",),
                        "ip-adapter-faceid_sd15.bin": ("faceidsd15",), "ip-adapter-faceid_sdxl.bin": ("faceidsdxl",)}
# That pack's provider names -> onnxruntime's short names (DirectML's is "Dml")
_PROVIDERS = {"CPU": "CPU", "CUDA": "CUDA", "ROCM": "ROCM", "DirectML": "Dml", "OpenVINO": "OpenVINO",
              "CoreML": "CoreML"}
# A LoRA file published for a FaceID adapter (ip-adapter-faceid-plusv2_sd15_lora.safetensors, ...)
_FACEID_LORA = re.compile(r"faceid.*lora", re.IGNORECASE)
_LORA_LOADERS = {"LoraLoaderModelOnly", "LoraLoader"}  # the host's: lora_name, strength_model first


def _bare(file_name) -> str:
    """'sub/IP-Adapter-FaceID-PlusV2_SD15.bin' -> 'subipadapterfaceidplusv2sd15' (name matching)."""
    return re.sub(r"[^a-z0-9]", "", str(file_name).lower().rsplit(".", 1)[0])


# -- the graph ------------------------------------------------------------------------------------------

class _Graph:
    """The workflow's nodes and links, edited in place. Links in both saved forms (list or dict)."""

    def __init__(self, wf: dict):
        self.wf = wf
        self.nodes = {n["id"]: n for n in wf.get("nodes") or []}
        self.dict_links = bool(wf.get("links")) and isinstance(wf["links"][0], dict)
        self.links = {}
        for link in wf.get("links") or []:
            if isinstance(link, dict):
                self.links[link["id"]] = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                                          link["target_slot"], link.get("type", "*")]
            else:
                self.links[link[0]] = list(link[:6]) + (["*"] if len(link) < 6 else [])

    def input_link(self, node, name):
        for i in node.get("inputs") or []:
            if i.get("name") == name:
                return i.get("link")
        return None

    def source(self, link_id, depth=0):
        """(node id, slot) a link starts from, through Reroutes; None when unlinked."""
        link = self.links.get(link_id)
        if link is None or depth > 64:
            return None
        node = self.nodes.get(link[1])
        if node is not None and node.get("type") == "Reroute":
            ins = node.get("inputs") or []
            return self.source(ins[0].get("link") if ins else None, depth + 1)
        return (link[1], link[2])

    def consumers(self, node_id, slot, depth=0):
        """(node, input name, link id) fed by an output, through Reroutes (with the links on the way)."""
        out = []
        for link in list(self.links.values()):
            if link[1] != node_id or link[2] != slot or depth > 64:
                continue
            target = self.nodes.get(link[3])
            if target is None:
                continue
            if target.get("type") == "Reroute":
                out.append((target, None, link[0]))
                out += self.consumers(target["id"], 0, depth + 1)
            else:
                ins = target.get("inputs") or []
                name = ins[link[4]].get("name") if link[4] < len(ins) else None
                out.append((target, name, link[0]))
        return out

    def new_link(self, origin, o_slot, target, t_slot, ltype):
        lid = max([int(self.wf.get("last_link_id") or 0), *self.links.keys(), 0]) + 1
        self.links[lid] = [lid, origin, o_slot, target, t_slot, ltype]
        self.wf["last_link_id"] = lid
        return lid

    def new_node_id(self):
        nid = max([int(self.wf.get("last_node_id") or 0), *[k for k in self.nodes if isinstance(k, int)], 0]) + 1
        self.wf["last_node_id"] = nid
        return nid

    def drop_link(self, lid):
        link = self.links.pop(lid, None)
        if link is None:
            return
        src = self.nodes.get(link[1])
        for o in (src or {}).get("outputs") or []:
            if o.get("links") and lid in o["links"]:
                o["links"].remove(lid)
        dst = self.nodes.get(link[3])
        for i in (dst or {}).get("inputs") or []:
            if i.get("link") == lid:
                i["link"] = None

    def write_back(self):
        rows = sorted(self.links.values(), key=lambda r: r[0])
        if self.dict_links:
            self.wf["links"] = [dict(id=r[0], origin_id=r[1], origin_slot=r[2], target_id=r[3], target_slot=r[4],
                                     type=r[5]) for r in rows]
        else:
            self.wf["links"] = [list(r) for r in rows]
        self.wf["nodes"] = list(self.nodes.values())


# -- the report -----------------------------------------------------------------------------------------

@dataclass
class Entry:
    node_id: object
    node_type: str
    target: Optional[str]        # None: left in place
    reason: str = ""             # why it stays
    notes: list = field(default_factory=list)

    def line(self) -> str:
        head = f"#{self.node_id} {self.node_type}"
        if self.target:
            text = f"converted  {head} -> {self.target}"
        else:
            text = f"left as is {head}: {self.reason}"
        return "\n".join([text] + [f"           note: {n}" for n in self.notes])


@dataclass
class Report:
    entries: list = field(default_factory=list)

    @property
    def converted(self):
        return [e for e in self.entries if e.target]

    @property
    def left(self):
        return [e for e in self.entries if not e.target]

    def text(self) -> str:
        if not self.entries:
            return "no ComfyUI_IPAdapter_plus nodes in this workflow; nothing to convert"
        lines = [f"{len(self.converted)} node(s) converted, {len(self.left)} left in place"]
        lines += [e.line() for e in sorted(self.entries, key=lambda e: (e.target is None, str(e.node_id)))]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"converted": [dict(id=e.node_id, type=e.node_type, target=e.target, notes=e.notes)
                              for e in self.converted],
                "left": [dict(id=e.node_id, type=e.node_type, reason=e.reason) for e in self.left],
                "text": self.text()}


# -- the conversion -------------------------------------------------------------------------------------

def pack_node_types() -> set:
    """The node types nodes/ registers, read from its source (no import: this runs without the host)."""
    import ast

    found = set()
    for path in PACK_NODES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in node.targets)):
                found |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return found


def _widget_names(decl):
    return [n for n, _ in widget_inputs(decl)]


def _choices(spec):
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return list(kind) if isinstance(kind, (list, tuple)) else None


def _default(spec):
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    choices = _choices(spec)
    if choices is not None:
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0] if spec else None)


def _all_inputs(decl):
    inputs = decl.get("input") or {}
    order = decl.get("input_order") or {}
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        for name in order.get(section) or list(declared):
            if name in declared:
                yield name, declared[name]


def _fits(value, spec) -> bool:
    """Whether a saved value can be the value of this widget (decides an older version's layout)."""
    kind, choices = _spec_type(spec), _choices(spec)
    if choices is not None:
        return value in choices or (not choices and isinstance(value, str))
    if kind in ("INT", "FLOAT"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    return isinstance(value, str)


def _spec_type(spec):
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, (list, tuple)) else kind


class _Migration:
    def __init__(self, wf, targets, available):
        self.g = _Graph(wf)
        self.targets = targets
        self.available = available
        self.report = Report()
        self.values = {}      # node id -> that pack's widget values by name
        self.plan = {}        # node id -> Rule (to convert)
        self.unified = {}     # old unified loader id -> (node id, slot) of the CLIP vision output it became
        self.face_unified = {}  # old FaceID unified loader id -> {"insightface": (node id, slot), "lora_strength"}
        self.older = {}       # node id -> widgets an older version of that pack did not save (defaults used)

    # which nodes convert ----------------------------------------------------------------------------
    def decide(self):
        g = self.g
        reasons = {}
        for nid, node in g.nodes.items():
            t = node.get("type")
            if t in NO_EQUIVALENT:
                reasons[nid] = NO_EQUIVALENT[t]
            elif t in RULES:
                decl = PLUS_NODES[t]
                raw = node.get("widgets_values")
                widgets = widget_inputs(decl)
                if isinstance(raw, list) and len(raw) != len(widgets):
                    # older versions of that pack had fewer widgets, each added at the end with the old
                    # behaviour as its default (IPAdapter's weight_type, IPAdapterAdvanced's embeds_scaling)
                    if len(raw) > len(widgets) or not all(_fits(v, spec) for v, (_, spec) in zip(raw, widgets)):
                        reasons[nid] = (f"it holds {len(raw)} widget values where that pack's current version "
                                        f"has {len(widgets)}, and they do not fit its widgets; saved by another "
                                        "version of it, so not converted")
                        continue
                    self.older[nid] = [n for n, _ in widgets[len(raw):]]
                    raw = list(raw) + [_default(spec) for _, spec in widgets[len(raw):]]
                self.values[nid] = map_widget_values(decl, raw)
                rule = RULES[t]
                why = rule.refuse(node, g, self.values[nid]) if rule.refuse else None
                needed = {"IPAdapterUnifiedLoader": (), "IPAdapterUnifiedLoaderFaceID": (
                    rule.target, INSIGHTFACE_TARGET, "CLIPVisionLoader")}.get(t, (rule.target,))
                missing = [x for x in needed if x not in self.available]
                if missing:
                    why = why or f"{', '.join(missing)} is not available in this pack"
                if why:
                    reasons[nid] = why
                else:
                    self.plan[nid] = rule
        # An adapter loader converts only when every node its adapter feeds converts, and an apply node
        # only when its adapter comes from a loader that converts (IPADAPTER and IPADAPTER_FUSED differ);
        # the same for the InsightFace loader and the insightface inputs (INSIGHTFACE, IPAF_INSIGHTFACE).
        changed = True
        while changed:
            changed = False
            for nid in list(self.plan):
                node = g.nodes[nid]
                t = node["type"]
                if t in LOADER_TYPES or t == "IPAdapterInsightFaceLoader":
                    slot = 1 if t in ("IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID") else 0
                    for target, name, _ in g.consumers(nid, slot):
                        if target.get("type") == "Reroute" or target["id"] in self.plan:
                            continue
                        if t == "IPAdapterUnifiedLoader" and target.get("type") == "IPAdapterUnifiedLoader":
                            continue
                        what = "InsightFace model" if t == "IPAdapterInsightFaceLoader" else "adapter"
                        reasons[nid] = (f"its {what} also feeds #{target['id']} {target.get('type')}, which stays; "
                                        "convert or remove that node first")
                        del self.plan[nid]
                        changed = True
                        break
                elif t in APPLY_TYPES:
                    src = g.source(g.input_link(node, "ipadapter"))
                    if src is None or src[0] not in self.plan:
                        what = "nothing" if src is None else f"#{src[0]} {g.nodes.get(src[0], {}).get('type')}"
                        reasons[nid] = f"its ipadapter input comes from {what}, which is not converted"
                        del self.plan[nid]
                        changed = True
                        continue
                    face_link = g.input_link(node, "insightface")
                    src = g.source(face_link) if face_link is not None else None
                    if face_link is not None and (src is None or src[0] not in self.plan):
                        what = "nothing" if src is None else f"#{src[0]} {g.nodes.get(src[0], {}).get('type')}"
                        reasons[nid] = f"its insightface input comes from {what}, which is not converted"
                        del self.plan[nid]
                        changed = True
        for nid, why in reasons.items():
            self.report.entries.append(Entry(nid, g.nodes[nid].get("type"), None, why))

    # one node ---------------------------------------------------------------------------------------
    def convert(self, nid, rule, target_type=None, value_overrides=None):
        g = self.g
        node = g.nodes[nid]
        old_type = node["type"]
        target_type = target_type or rule.target
        decl, old_decl = self.targets[target_type], PLUS_NODES[old_type]
        entry = Entry(nid, old_type, target_type)
        values = self.values[nid]
        new_values = {rule.inputs[k]: v for k, v in values.items() if k in rule.inputs}
        if rule.values:
            new_values.update(rule.values(values))
        new_values.update(value_overrides or {})
        if self.older.get(nid):
            entry.notes.append(f"saved by an older version of that pack: {', '.join(self.older[nid])} taken as "
                               "that version's behaviour (the default)")
        for name in rule.drops:
            if name in values and values[name] != _default(dict(_all_inputs(old_decl))[name]):
                entry.notes.append(f"{name} = {values[name]!r} has no counterpart here and is dropped")

        # inputs: every link input of the target, then the widgets that arrived through a link
        old_inputs = node.get("inputs") or []
        linked = {i["name"]: i.get("link") for i in old_inputs if i.get("link") is not None}
        new_inputs, slot_of = [], {}
        widgets = set(_widget_names(decl))
        for name, spec in _all_inputs(decl):
            t = _spec_type(spec)
            inverse = [k for k, v in rule.inputs.items() if v == name and k in linked]
            if name in widgets and not inverse:
                continue
            entry_in = {"name": name, "type": t, "link": linked[inverse[0]] if inverse else None}
            if name in widgets:
                entry_in["widget"] = {"name": name}
            slot_of[name] = len(new_inputs)
            new_inputs.append(entry_in)
        for old_name, lid in linked.items():
            new_name = rule.inputs.get(old_name)
            if new_name is None or new_name not in slot_of or new_inputs[slot_of[new_name]]["link"] != lid:
                entry.notes.append(f"the link into {old_name} has no counterpart here and is removed")
                g.drop_link(lid)
                continue
            link = g.links[lid]
            link[4] = slot_of[new_name]
            link[5] = TYPE_MAP.get(link[5], link[5])

        # outputs by type (that pack's outputs each have a distinct type)
        out_types = decl.get("output") or []
        out_names = decl.get("output_name") or out_types
        new_outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                       for i, (n, t) in enumerate(zip(out_names, out_types))]
        for lid, link in list(g.links.items()):
            if link[1] != nid:
                continue
            old_t = (old_decl["output"][link[2]] if link[2] < len(old_decl["output"]) else None)
            want = TYPE_MAP.get(old_t, old_t)
            if want not in out_types:
                entry.notes.append(f"the {old_t} output has no counterpart here; its link is removed")
                g.drop_link(lid)
                continue
            link[2] = out_types.index(want)
            link[5] = want
            new_outputs[link[2]]["links"].append(lid)
            self._retype_reroutes(link[3], want)

        node["type"] = target_type
        node["inputs"] = new_inputs
        node["outputs"] = new_outputs
        node["widgets_values"] = [new_values.get(n, _default(s)) for n, s in widget_inputs(decl)]
        # room for the widgets this pack's node has (the front end keeps a saved size as it is)
        size = node.get("size") or [0, 0]
        size = [size.get("0", 0), size.get("1", 0)] if isinstance(size, dict) else list(size)  # old saves: {"0", "1"}
        rows = max(len(new_inputs), len(new_outputs))
        node["size"] = [max(size[0], 320), max(size[1], 30 + 22 * rows + 26 * len(node["widgets_values"]))]
        props = node.setdefault("properties", {})
        props["Node name for S&R"] = target_type
        for stale in ("cnr_id", "ver", "aux_id"):  # they name the pack a node comes from
            props.pop(stale, None)
        self.report.entries.append(entry)
        return entry

    def _retype_reroutes(self, node_id, new_type, depth=0):
        node = self.g.nodes.get(node_id)
        if node is None or node.get("type") != "Reroute" or depth > 64:
            return
        for o in node.get("outputs") or []:
            o["type"] = new_type
            for lid in o.get("links") or []:
                if lid in self.g.links:
                    self.g.links[lid][5] = new_type
                    self._retype_reroutes(self.g.links[lid][3], new_type, depth + 1)

    # the unified loader -----------------------------------------------------------------------------
    def convert_unified(self, nid, rule):
        g = self.g
        preset = str(self.values[nid].get("preset", ""))
        word = next((w for key, w in _PRESET_WORDS if key in preset.lower()), "standard")
        if UNIFIED_TARGET in self.available:
            choices = _choices(dict(_all_inputs(self.targets[UNIFIED_TARGET])).get("preset", [[]])) or []
            match = next((c for c in choices if c.lower() == word), None)
            entry = self.convert(nid, rule, value_overrides={"preset": match or (choices[0] if choices else word)})
            if match is None:
                entry.notes.append(f"preset {preset!r} has no exact counterpart; check the preset")
            self.unified[nid] = (nid, 2)
            return
        # no unified loader in this pack: the adapter loader plus the host's CLIP vision loader; what
        # consumed its MODEL output takes the model it was given
        node = g.nodes[nid]
        self._bypass_model(nid)
        file = _PRESET_FILES.get(word, _PRESET_FILES["standard"])
        loader_rule = Rule("IPAdapterFusedLoader", {})
        entry = self.convert(nid, loader_rule, value_overrides={"ipadapter_file": file})
        entry.target = "IPAdapterFusedLoader + CLIPVisionLoader"
        encoder = _PRESET_ENCODERS.get(word, _DEFAULT_ENCODER)
        cv_id = self._add_node("CLIPVisionLoader", node, 120, [encoder])
        entry.notes.append(f"this pack has no unified loader yet: preset {preset!r} became the file {file!r} "
                           f"(SD1.5 name) and a CLIPVisionLoader #{cv_id} with {encoder!r}; choose the files you have")
        self.unified[nid] = (cv_id, 0)

    def _bypass_model(self, nid):
        """What the loader's MODEL output fed takes the model the loader was given (a loader of this pack
        does not pass the model through)."""
        g = self.g
        model_src = g.source(g.input_link(g.nodes[nid], "model"))
        for lid in [lid for lid, link in g.links.items() if link[1] == nid and link[2] == 0]:
            link = g.links[lid]
            if model_src is None:
                g.drop_link(lid)
                continue
            link[1], link[2] = model_src
            outs = g.nodes[model_src[0]].get("outputs") or []
            if model_src[1] < len(outs):
                if outs[model_src[1]].get("links") is None:
                    outs[model_src[1]]["links"] = []
                outs[model_src[1]]["links"].append(lid)

    def _add_node(self, ntype, near, dy, widgets_values):
        """A new loader node (no inputs, one output) below `near`; returns its id."""
        decl = self.targets[ntype]
        out_type = decl["output"][0]
        out_name = (decl.get("output_name") or decl["output"])[0]
        nid = self.g.new_node_id()
        pos = list(near.get("pos") or [0, 0])
        self.g.nodes[nid] = {"id": nid, "type": ntype, "pos": [pos[0], pos[1] + dy],
                             "size": [315, 58 + 26 * max(0, len(widgets_values) - 1)], "flags": {},
                             "order": near.get("order", 0), "mode": near.get("mode", 0), "inputs": [],
                             "outputs": [{"name": out_name, "type": out_type, "links": [], "slot_index": 0}],
                             "properties": {"Node name for S&R": ntype}, "widgets_values": list(widgets_values)}
        return nid

    # FaceID ---------------------------------------------------------------------------------------------
    def _choices_of(self, ntype, name):
        return _choices(dict(_all_inputs(self.targets[ntype])).get(name, [[]])) or []

    def _provider(self, theirs):
        """(this pack's provider choice, note or None) for that pack's provider name."""
        want = _PROVIDERS.get(theirs, theirs)
        choices = self._choices_of(INSIGHTFACE_TARGET, "provider")
        match = next((c for c in choices if str(c).lower() == str(want).lower()), None)
        if match is not None:
            return match, None
        # the loader accepts a name its list lacks (a workflow from another machine) and runs on the CPU then
        return want, (f"provider {want!r} is not offered by the onnxruntime installed here: the face models run on "
                      "the CPU (the log says so) until a build with it is installed; or choose auto")

    def _faceid_file(self, preset):
        """(ipadapter_file, note) for a FaceID unified preset: the matching file among this host's, else the
        published name."""
        key = preset.lower()
        sd15, sdxl = next((files for start, files in _FACEID_PRESET_FILES if key.startswith(start)),
                          _FACEID_PRESET_FILES[-1][1])
        choices = self._choices_of("IPAdapterFusedLoader", "ipadapter_file")

        def found(published):
            if published is None:
                return None
            for ending in _FACEID_FILE_ENDINGS[published]:
                hits = [c for c in choices if _bare(c).endswith(ending)]
                if hits:
                    return hits[0]
            return None

        have15, havexl = found(sd15), found(sdxl)
        if have15 and havexl:
            return have15, f"the SD1.5 file; on SDXL choose {havexl!r}"
        if have15 or havexl:
            return have15 or havexl, None
        published = sd15 or sdxl
        where = "not found in models/ipadapter here; " if choices else ""
        other = f"; on SDXL choose {sdxl!r}" if sd15 and sdxl else ""
        return published, f"{where}the name h94/IP-Adapter-FaceID publishes{other}"

    def convert_unified_faceid(self, nid, rule):
        """That pack's FaceID unified loader put the LoRA on the model and carried the CLIP vision and
        InsightFace models inside IPADAPTER: here the adapter loader, a CLIP vision loader and the InsightFace
        loader, the model passing on as it came, and the LoRA strength on the apply nodes (which apply the
        LoRA held in the FaceID file)."""
        g = self.g
        node = g.nodes[nid]
        values = self.values[nid]
        preset = str(values.get("preset", ""))
        file, file_note = self._faceid_file(preset)
        others = [t for t, _, _ in g.consumers(nid, 0)
                  if t.get("type") != "Reroute" and not (t["id"] in self.plan and t.get("type") in APPLY_TYPES)]
        self._bypass_model(nid)
        chained = g.input_link(node, "ipadapter")
        g.drop_link(g.input_link(node, "model"))
        entry = self.convert(nid, rule, value_overrides={"ipadapter_file": file})
        entry.target = f"IPAdapterFusedLoader + CLIPVisionLoader + {INSIGHTFACE_TARGET}"
        cv_id = self._add_node("CLIPVisionLoader", node, 120, [_DEFAULT_ENCODER])
        provider, provider_note = self._provider(values.get("provider", "CPU"))
        if_values = {"model_pack": "buffalo_l", "provider": provider}
        if_id = self._add_node(INSIGHTFACE_TARGET, node, 240, [if_values.get(n, _default(s)) for n, s
                                                               in widget_inputs(self.targets[INSIGHTFACE_TARGET])])
        self.unified[nid] = (cv_id, 0)
        strength = values.get("lora_strength", 0.6)
        self.face_unified[nid] = {"insightface": (if_id, 0), "lora_strength": strength}
        entry.notes.append(f"preset {preset!r} became the file {file!r}" + (f" ({file_note})" if file_note else "")
                           + f", a CLIPVisionLoader #{cv_id} with {_DEFAULT_ENCODER!r} and an InsightFace Loader "
                           f"(Fused) #{if_id} with buffalo_l; the model goes straight on to the nodes it fed")
        if "portrait" in preset.lower():
            entry.notes.append("Portrait files hold no LoRA; lora_strength is not used")
        else:
            entry.notes.append(f"lora_strength {strength} became faceid_lora_strength of the apply nodes it feeds: "
                               "this pack applies the LoRA held inside the FaceID file (no LoRA file needed)")
        if provider_note:
            entry.notes.append(provider_note)
        if others and "portrait" not in preset.lower():
            entry.notes.append(f"{', '.join('#%s %s' % (t['id'], t.get('type')) for t in others)} took the model with "
                               "the FaceID LoRA from that loader and now takes it without (this pack's apply node puts "
                               "the LoRA on the model it gives out)")
        if chained is not None:
            entry.notes.append("its ipadapter input (a pipeline from another unified loader) has no counterpart "
                               "here; its link is removed")

    def convert_insightface(self, nid, rule):
        values = self.values[nid]
        provider, note = self._provider(values.get("provider", "CPU"))
        entry = self.convert(nid, rule, value_overrides={"provider": provider})
        packs = self._choices_of(INSIGHTFACE_TARGET, "model_pack")
        name = values.get("model_name")
        if packs and name not in packs:
            entry.notes.append(f"the model pack {name!r} is not in models/insightface/models here; that pack let "
                               "insightface download it, this pack never downloads: unzip it into "
                               f"models/insightface/models/{name}/")
        if note:
            entry.notes.append(note)
        entry.notes.append("that pack took the face insightface lists first (highest detection score); this pack "
                           "takes the largest face (face 'by index' picks another)")

    def _face_values(self, nid):
        """(widget values, notes, InsightFace output to connect) for an apply node doing FaceID: the
        FaceID unified loader's settings, face_structure pinned where that pack read the file name
        differently, the strength of a FaceID LoRA loader on the model path."""
        g = self.g
        node = g.nodes[nid]
        t = node["type"]
        values, notes, face_src = {}, [], None
        src = g.source(g.input_link(node, "ipadapter"))
        unified = self.face_unified.get(src[0]) if src else None
        if unified is not None:
            face_src = unified["insightface"] if g.input_link(node, "insightface") is None else None
            values["faceid_lora_strength"] = unified["lora_strength"]
            if "weight_faceidv2" not in self.values[nid]:  # that pack's default: twice the weight
                w = 2 * float(self.values[nid].get("weight", 1.0))
                values["face_structure_weight"] = min(max(w, -1.0), 5.0)
                notes.append(f"face_structure_weight = {values['face_structure_weight']} (that pack used 2 x weight "
                             "for the FaceID Plus V2 shortcut of nodes without weight_faceidv2"
                             + (f", {w} here, above this pack's range" if w != values["face_structure_weight"] else "")
                             + ")")
        elif t not in FACE_APPLY_TYPES and g.input_link(node, "insightface") is None:
            return values, notes, None  # not a FaceID use
        elif g.input_link(node, "insightface") is None:
            notes.append("insightface is not connected (that pack needed it for FaceID files too): connect an "
                         "InsightFace Loader (Fused)")
        # face_structure: that pack reads V2 only from 'plusv2' in the file name
        file = self.values.get(src[0], {}).get("ipadapter_file") if src else None  # IPAdapterModelLoader's
        if file is not None and t != "IPAdapterFaceIDKolors":
            name = str(file).lower()
            theirs = "V2 (shortcut on)" if "plusv2" in name else "V1 (shortcut off)"
            ours = "V2 (shortcut on)" if "v2" in name else "V1 (shortcut off)" if "plus" in name else None
            not_plus = ours is None and ("portrait" in name or "faceid" in name)  # FaceID / Portrait: no shortcut
            if ours != theirs and not not_plus:
                values["face_structure"] = theirs
                notes.append(f"face_structure = {theirs!r}: that pack reads V2 only from 'plusv2' in the file name, "
                             f"and this pack's 'auto' could read {name!r} differently (FaceID Plus files only)")
        # a FaceID LoRA already loaded on the model path
        lora = self._faceid_lora_loader(node)
        if lora is not None:
            lnode, lname, strength = lora
            notes.append(f"#{lnode['id']} {lnode.get('type')} loads {lname!r} on this model: this pack applies "
                         "the LoRA held inside the FaceID file itself, and skips its own when it finds the same LoRA "
                         "already loaded, so that loader can be removed"
                         + (f" (faceid_lora_strength is set to its strength_model {strength})"
                            if strength is not None and unified is None else ""))
            if strength is not None and unified is None:
                values["faceid_lora_strength"] = strength
        elif unified is None and t != "IPAdapterFaceIDKolors":
            notes.append("no FaceID LoRA was loaded on this model in that pack's graph; this pack applies the LoRA "
                         "held inside FaceID and FaceID Plus files at faceid_lora_strength 1.0 (as trained); set it "
                         "to 0 for that graph's exact pictures")
        return values, notes, face_src

    def _faceid_lora_loader(self, node):
        """(LoRA loader node, lora name, strength_model or None) of a FaceID LoRA upstream on the model path."""
        g = self.g
        seen = set()
        src = g.source(g.input_link(node, "model"))
        while src is not None and src[0] not in seen and len(seen) < 64:
            seen.add(src[0])
            up = g.nodes.get(src[0]) or {}
            wv = up.get("widgets_values")
            if "lora" in str(up.get("type", "")).lower() and isinstance(wv, list):
                name = next((v for v in wv if isinstance(v, str) and _FACEID_LORA.search(v)), None)
                if name is not None:
                    strength = None
                    if up.get("type") in _LORA_LOADERS and len(wv) > 1 and isinstance(wv[1], (int, float)):
                        strength = wv[1] if 0.0 <= wv[1] <= 2.0 else None
                    return up, name, strength
            src = g.source(g.input_link(up, "model"))
        return None

    def _connect(self, nid, input_name, origin, ltype):
        g = self.g
        node = g.nodes[nid]
        slot = next(i for i, x in enumerate(node["inputs"]) if x["name"] == input_name)
        lid = g.new_link(origin[0], origin[1], nid, slot, ltype)
        node["inputs"][slot]["link"] = lid
        g.nodes[origin[0]]["outputs"][origin[1]]["links"].append(lid)

    # apply nodes without a CLIP vision link take the unified loader's ------------------------------------
    def connect_clip_vision(self, nid, entry):
        g = self.g
        node = g.nodes[nid]
        if g.input_link(node, "clip_vision") is not None:
            return
        src = g.source(g.input_link(node, "ipadapter"))
        if src is not None and src[0] in self.unified:
            self._connect(nid, "clip_vision", self.unified[src[0]], "CLIP_VISION")
        else:
            entry.notes.append("no CLIP vision model is connected (that pack needed one here too): connect a "
                               "CLIPVisionLoader to clip_vision")

    def run(self):
        self.decide()
        for nid, rule in list(self.plan.items()):
            if self.g.nodes[nid]["type"] == "IPAdapterUnifiedLoader":
                self.convert_unified(nid, rule)
            elif self.g.nodes[nid]["type"] == "IPAdapterUnifiedLoaderFaceID":
                self.convert_unified_faceid(nid, rule)
        for nid, rule in list(self.plan.items()):
            t = self.g.nodes[nid]["type"]
            if t == "IPAdapterInsightFaceLoader":
                self.convert_insightface(nid, rule)
            elif t in PLUS_NODES and t not in ("IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID"):
                face_values, notes, face_src = ({}, [], None)
                if rule.target == "IPAdapterFusedApply":
                    face_values, notes, face_src = self._face_values(nid)
                entry = self.convert(nid, rule, value_overrides=face_values)
                entry.notes += notes
                if rule.target == "IPAdapterFusedApply":
                    self.connect_clip_vision(nid, entry)
                    if face_src is not None:
                        self._connect(nid, "insightface", face_src, "IPAF_INSIGHTFACE")
        self.g.write_back()
        return self.report


def declarations_from_classes(classes: dict) -> dict:
    """object_info-like declarations of node classes (the route passes the host's NODE_CLASS_MAPPINGS)."""
    out = {}
    for name, cls in classes.items():
        try:
            inputs = cls.INPUT_TYPES()
        except Exception:  # a declaration that cannot be read here keeps the static one
            continue
        outputs = list(getattr(cls, "RETURN_TYPES", ()))
        out[name] = {"input": {"required": inputs.get("required", {}), "optional": inputs.get("optional", {})},
                     "output": outputs, "output_name": list(getattr(cls, "RETURN_NAMES", None) or outputs)}
    return out


def migrate(workflow: dict, object_info: Optional[dict] = None) -> tuple[dict, Report]:
    """(converted copy of `workflow`, report). object_info: this pack's (and the host's) declarations
    as /object_info gives them; without it the static TARGET_NODES and nodes/ sources are used."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise ValueError("not a front-end workflow (no 'nodes' list); API prompts are not converted")
    wf = copy.deepcopy(workflow)
    targets = dict(TARGET_NODES)
    if object_info:
        targets.update({k: v for k, v in object_info.items() if k in TARGET_NODES})
        available = set(object_info)
    else:
        available = pack_node_types() | {"CLIPVisionLoader"}
    report = _Migration(wf, targets, available).run()
    theirs = set(PLUS_NODES) | set(NO_EQUIVALENT)
    subgraphs = (wf.get("definitions") or {}).get("subgraphs") or []
    if any(n.get("type") in theirs for s in subgraphs for n in s.get("nodes") or []):
        report.entries.append(Entry("subgraph", "(nodes inside subgraphs)", None,
                                    "nodes inside subgraphs are not converted; unpack the subgraph first"))
    groups = ((wf.get("extra") or {}).get("groupNodes") or {})
    if any(n.get("type") in theirs for g in groups.values() if isinstance(g, dict) for n in g.get("nodes") or []):
        report.entries.append(Entry("group node", "(nodes inside group nodes)", None,
                                    "nodes inside group nodes are not converted; convert the group to nodes first"))
    return wf, report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Convert a workflow's ComfyUI_IPAdapter_plus nodes to IPAdapter Fused "
                                            "nodes (front-end JSON in, front-end JSON out) and print what changed.")
    p.add_argument("input", help="workflow .json saved by the ComfyUI front end")
    p.add_argument("output", help="where to write the converted workflow")
    p.add_argument("--object-info", help="a saved /object_info of a host with this pack (exact declarations)")
    args = p.parse_args(argv)
    try:
        workflow = json.loads(Path(args.input).read_text(encoding="utf-8"))
        info = json.loads(Path(args.object_info).read_text(encoding="utf-8")) if args.object_info else None
        converted, report = migrate(workflow, info)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    Path(args.output).write_text(json.dumps(converted, indent=2), encoding="utf-8")
    print(report.text())
    return 0
