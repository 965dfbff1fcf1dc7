"""Test-only stand-ins for the Kolors loaders of ComfyUI-Kolors-MZ and for SDXL's text encoders (never
shipped with the pack).

The host (0.3.64) has no Kolors model of its own; users load Kolors with the MinusZoneAI ComfyUI-Kolors-MZ
nodes, and workflows/kolors_faceid.json uses them. tests/server/test_face_workflows.py swaps exactly those
three node types for these (same input names, so the workflow's links and widget values map unchanged);
every other node is the host's or the pack's own:

- MZ_KolorsUNETLoaderV2 -> IPAFTestKolorsUNetLoader. The real node loads Kolors' UNet (an SDXL UNet with
  4096-wide text context) as the host's SDXL model whose diffusion model carries `encoder_hid_proj`
  (Linear 4096 -> 2048, with bias) and applies it to the context in its forward (ComfyUI-Kolors-MZ,
  hook_comfyui_kolors_v2.py). This node loads the tiny SDXL UNet file through the host's own
  load_diffusion_model and adds the same: an `encoder_hid_proj` Linear(TEXT_WIDTH -> 2048) (seeded) applied
  to the context in the diffusion model's forward. The tiny Kolors FaceID adapter's tokens are TEXT_WIDTH
  (256) wide, so they go through that same projection, as the real 4096-wide ones do.
- MZ_ChatGLM3Loader -> IPAFTestKolorsChatGLM3Loader and MZ_ChatGLM3_V2 -> IPAFTestKolorsChatGLM3Text.
  ChatGLM3-6B cannot be made small. The text node gives random but deterministic conditioning (seeded by
  the text) in the host's format: context TEXT_WIDTH wide (what the UNet's encoder_hid_proj reads) and a
  pooled output as wide as the tiny SDXL model's label embedding expects (1280; Kolors' own is 4096 with a
  wider label embedding, which the host's SDXL class cannot be given).

SDXL workflows (faceid_sdxl_references.json, instantid_sdxl.json): CheckpointLoaderSimple -> IPAFTestTinySDXLCheckpoint.
SDXL's text encoders are CLIP-L and CLIP-G (694 M parameters, the host's config is fixed), most of the tiny
SDXL checkpoint's 2.2 GB and of the time its runs take; tests/server/test_workflows.py runs sdxl_basic.json
with them. This node loads a tiny SDXL file holding the UNet and a TAESD VAE through the host's own
load_checkpoint_guess_config (output_clip=False) and returns a text encoder that gives random but
deterministic conditioning (seeded by the text) of SDXL's widths: context 2048, pooled 1280.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def _dit_stand_ins():
    # by path: tests/server/test_face_workflows.py loads this file alone, outside the probe package
    spec = importlib.util.spec_from_file_location("ipaf_dit_stand_ins", Path(__file__).with_name("dit_stand_ins.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# random but deterministic conditioning seeded by the text, in the host's format (shared with the Flux stand-ins)
_StandInTextEncoder = _dit_stand_ins()._StandInTextEncoder

TEXT_WIDTH = 256       # the tiny Kolors FaceID adapter's token width (models/synthetic.py, size "tiny")
SDXL_CONTEXT = 2048
SDXL_POOLED = 1280
TEXT_TOKENS = 8
PROJ_SEED = 11


def add_encoder_hid_proj(diffusion_model, in_width: int = TEXT_WIDTH, seed: int = PROJ_SEED):
    """Give a host SDXL diffusion model Kolors' text projection: the attribute and its use in forward."""
    import torch

    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(in_width, SDXL_CONTEXT, bias=True)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(SDXL_CONTEXT, in_width, generator=g) / in_width ** 0.5)
        proj.bias.copy_(0.02 * torch.randn(SDXL_CONTEXT, generator=g))
    diffusion_model.encoder_hid_proj = proj
    forward = diffusion_model.forward

    def kolors_forward(*args, **kwargs):
        context = kwargs.get("context")
        if context is not None and context.shape[-1] == in_width:
            kwargs["context"] = proj(context.to(proj.weight.dtype)).to(context.dtype)
        return forward(*args, **kwargs)

    diffusion_model.forward = kolors_forward
    return proj


class IPAFTestKolorsUNetLoader:
    CATEGORY = "ipaf_test"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet_name):
        import comfy.sd
        import folder_paths
        model = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        add_encoder_hid_proj(model.model.diffusion_model)
        return (model,)


class IPAFTestTinySDXLCheckpoint:
    CATEGORY = "ipaf_test"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    def load(self, ckpt_name):
        import comfy.sd
        import folder_paths
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, _, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=False)[:3]
        return (model, _StandInTextEncoder(SDXL_CONTEXT, SDXL_POOLED, TEXT_TOKENS), vae)


class _StandInChatGLM3:
    def __init__(self, name: str):
        self.name = name


class IPAFTestKolorsChatGLM3Loader:
    CATEGORY = "ipaf_test"
    RETURN_TYPES = ("CHATGLM3MODEL",)
    RETURN_NAMES = ("chatglm3_model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"chatglm3_checkpoint": ("STRING", {"default": ""})}}

    def load(self, chatglm3_checkpoint):
        return (_StandInChatGLM3(chatglm3_checkpoint),)


class IPAFTestKolorsChatGLM3Text:
    CATEGORY = "ipaf_test"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"chatglm3_model": ("CHATGLM3MODEL",), "text": ("STRING", {"multiline": True})}}

    def encode(self, chatglm3_model, text):
        return (_StandInTextEncoder(TEXT_WIDTH, SDXL_POOLED, TEXT_TOKENS).encode_from_tokens_scheduled(str(text)),)


# workflow node type (ComfyUI-Kolors-MZ) -> stand-in
MZ_STAND_INS = {"MZ_KolorsUNETLoaderV2": "IPAFTestKolorsUNetLoader",
                "MZ_ChatGLM3Loader": "IPAFTestKolorsChatGLM3Loader",
                "MZ_ChatGLM3_V2": "IPAFTestKolorsChatGLM3Text"}

NODE_CLASS_MAPPINGS = {"IPAFTestTinySDXLCheckpoint": IPAFTestTinySDXLCheckpoint,
                       "IPAFTestKolorsUNetLoader": IPAFTestKolorsUNetLoader,
                       "IPAFTestKolorsChatGLM3Loader": IPAFTestKolorsChatGLM3Loader,
                       "IPAFTestKolorsChatGLM3Text": IPAFTestKolorsChatGLM3Text}
