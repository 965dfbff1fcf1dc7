"""CLIP vision files for image prompts: the host's loader where it knows the file, the host's own
ClipVisionModel built from the file's shapes where it does not, and SigLIP's pooling head kept.

- Known sizes (ViT-L/H/bigG, SigLIP so400m 384/512): comfy.clip_vision.load, as the host's 'Load CLIP
  Vision' node does. Known = the facts read off the header match one of the host's own JSON configs.
- Other sizes: the host hard-codes its configs, so a smaller tower returns None there. The config is read
  off the safetensors header (models/vision_encoder.py) and the host's ClipVisionModel is built from it.
- SigLIP files with `vision_model.head.*`: the host loads with strict=False and drops the head, which
  InstantX Flux needs (pooler_output). The head's tensors are read here (safetensors only) and attached as
  POOLING_HEAD_ATTR; nodes/encode.py runs it on the last hidden state."""
from __future__ import annotations

import functools
import glob
import json
import logging
import os
import tempfile

from ..models.loading import AdapterFormatError, read_safetensors_header
from ..models.siglip_head import SigLIPPoolingHead
from ..models.vision_encoder import (
    VisionEncoderError,
    VisionTowerConfig,
    host_config_facts,
    infer_vision_config,
    read_pooling_head_state,
)
from .encode import POOLING_HEAD_ATTR, encoder_kind
from .loaders import _clip_visions, _file_key, _lock

FOLDER = "clip_vision"
CATEGORY = "ipadapter_fused"
_log = logging.getLogger("ipadapter_fused")


@functools.lru_cache(maxsize=None)
def _host_configs(config_dir: str) -> tuple:
    """(facts, heads) of every CLIP / SigLIP config the host ships (comfy/clip_vision_*.json)."""
    out = []
    for path in sorted(glob.glob(os.path.join(config_dir, "clip_vision_*.json"))):
        with open(path) as f:
            cfg = json.load(f)
        facts = host_config_facts(cfg)
        if facts is not None:
            out.append((facts, int(cfg["num_attention_heads"])))
    return tuple(out)


def host_known_heads(config: VisionTowerConfig):
    """The host config's head count when the host ships a config with these facts, else None."""
    import comfy.clip_vision

    config_dir = os.path.dirname(os.path.realpath(comfy.clip_vision.__file__))
    for facts, heads in _host_configs(config_dir):
        if facts == config.facts():
            return heads
    return None


def _host_load(path: str, name: str, pickled: bool = False):
    import comfy.clip_vision

    try:
        cv = comfy.clip_vision.load(path)
    except Exception as e:
        if pickled:  # torch's own text about a refused pickle advises weights_only=False: not passed on
            raise VisionEncoderError(f"{name}: the host could not read it as a weights-only torch file "
                                     f"({type(e).__name__}); use the .safetensors version of the encoder") from None
        if not isinstance(e, RuntimeError):
            raise
        # a known key set with other shapes: load_state_dict's size mismatch
        raise VisionEncoderError(f"{name}: the host could not load it as a CLIP vision model ({str(e)[:300]})") from e
    if cv is None:
        raise VisionEncoderError(f"{name} is not a CLIP vision model the host can load")
    return cv


def _build_from_shapes(path: str, name: str, config: VisionTowerConfig):
    """The host's ClipVisionModel for a size the host has no config for (config from the file's shapes)."""
    import comfy.clip_vision
    import comfy.utils

    with tempfile.TemporaryDirectory() as d:
        cfg_path = os.path.join(d, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(config.host_config(), f)
        cv = comfy.clip_vision.ClipVisionModel(cfg_path)  # reads the file in __init__
    sd = comfy.utils.load_torch_file(path)  # a .safetensors file: no pickle
    if config.layout == "openclip":
        sd = comfy.clip_vision.convert_to_transformers(sd, "visual.")
    try:
        missing, _ = cv.load_sd(sd)
    except RuntimeError as e:
        raise VisionEncoderError(f"{name}: the weights do not fit the tower read from its shapes "
                                 f"({config.describe()}): {str(e)[:300]}") from e
    if missing:
        raise VisionEncoderError(f"{name}: the vision tower misses {', '.join(missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''}; the file is damaged or incomplete")
    # The head count is not in the weights (q, k, v are width x width however they split)
    _log.info("IPAdapter Fused: %s is a size the host has no config for; built the host's CLIP vision model "
              "from its shapes: %s (head count assumed: width / 64, or the published tower's count, "
              "activation %s; neither is stored in the file)", name, config.describe(),
              config.host_config()["hidden_act"])
    return cv


def _is_dinov2(header) -> bool:
    return any(k.startswith("encoder.layer.") and "layer_scale" in k for k in header)


def load_vision_encoder(path: str, name: str | None = None):
    """A host ClipVisionModel for the file at `path` (with SigLIP's pooling head attached when the file
    has one). Raises VisionEncoderError naming the file when it is not a vision encoder."""
    import comfy.utils

    name = name or os.path.basename(path)
    try:
        header = read_safetensors_header(path)
    except AdapterFormatError as e:
        raise VisionEncoderError(str(e)) from e
    if header is None and path.lower().endswith((".safetensors", ".sft")):
        raise VisionEncoderError(f"{name}: the safetensors header is not a plain table of tensors; the file is "
                                 "damaged or not a model")
    if header is None:
        # .bin / .pt: only the host's loader, and only while it unpickles with weights_only=True
        if not getattr(comfy.utils, "ALWAYS_SAFE_LOAD", False):
            raise VisionEncoderError(f"{name} is not a .safetensors file, and this torch cannot load pickled files "
                                     "safely (weights_only); use the .safetensors version of the encoder")
        cv = _host_load(path, name, pickled=True)
        if encoder_kind(cv) == "siglip":
            _log.warning("IPAdapter Fused: %s is not .safetensors; SigLIP's pooling head is read from .safetensors "
                         "files only, so InstantX Flux cannot use this file (SD3.5 can). Use model.safetensors of "
                         "google/siglip-so400m-patch14-384.", name)
        return cv
    try:
        config = infer_vision_config(header, name)
    except VisionEncoderError:
        if _is_dinov2(header):  # the host's other image encoder; its loader knows its sizes
            return _host_load(path, name)
        raise
    heads = host_known_heads(config)
    if heads is not None:
        cv = _host_load(path, name)
    else:
        cv = _build_from_shapes(path, name, config)
        heads = config.heads
    if config.pooling_head:
        try:
            head = SigLIPPoolingHead.from_state(read_pooling_head_state(path), heads)
        except AdapterFormatError as e:
            raise VisionEncoderError(f"{name}: {e}") from e
        setattr(cv, POOLING_HEAD_ATTR, head)
    return cv


def load_clip_vision(name: str):
    """`name` from the host's clip_vision folder, loaded once while in use (keyed by path, mtime, size)."""
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"CLIP vision file {name!r} was not found in the '{FOLDER}' model folder")
    key = _file_key(path)
    with _lock:
        hit = _clip_visions.get(key)
        if hit is None:
            hit = load_vision_encoder(path, name)
            _clip_visions[key] = hit
        return hit


class IPAdapterFusedClipVisionLoader:
    DESCRIPTION = ("Loads a CLIP or SigLIP vision encoder from models/clip_vision, like the host's 'Load CLIP "
                   "Vision', and also keeps SigLIP's attention-pooling head (InstantX Flux reads its pooled output) "
                   "and loads encoder sizes the host has no config for. Plugs into any CLIP_VISION input.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {
            "clip_name": (folder_paths.get_filename_list(FOLDER),
                          {"tooltip": "A vision encoder from models/clip_vision: CLIP ViT-L/14 (XLabs Flux), ViT-H/14 "
                                      "or ViT-bigG/14 (SD1.5 / SDXL adapters), or SigLIP so400m-patch14-384 with its "
                                      "pooling head (InstantX Flux and SD3.5). Recognised by its contents, not its name."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name):
        from .model_files import validate_file
        return validate_file(FOLDER, clip_name, "CLIP vision file")

    def load(self, clip_name):
        return (load_clip_vision(clip_name),)
