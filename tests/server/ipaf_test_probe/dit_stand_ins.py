"""Test-only stand-ins for the two Flux loaders a tiny model cannot go through (never shipped with the pack).

tests/server/test_dit_workflows.py runs the shipped Flux workflows headless and swaps exactly two nodes of the
converted prompt for these; every other node (the pack's loaders and apply node, CLIPTextEncode, FluxGuidance,
KSampler, VAELoader, VAEDecode, SaveImage) is the host's or the pack's own:

- UNETLoader -> IPAFTestTinyFluxLoader. The host's Flux detection hard-codes width 3072, 24 heads, context
  4096 and the RoPE axes (comfy/model_detection.py), so a narrow Flux file does not load through UNETLoader.
  This node reads the tiny file written by tiny_models.write_tiny_dit and builds the host's own Flux model
  from the config in its metadata (tests/host/dit_models.load_tiny_dit_file).
- DualCLIPLoader -> IPAFTestTinyFluxText. Flux's text encoders are CLIP-L and T5-XXL (4.7 B parameters; the
  host's config is fixed). This node returns a text encoder that gives random but deterministic conditioning
  (seeded by the prompt's text) of the tiny model's widths, in the host's format: [[context, {pooled_output}]].
"""
from __future__ import annotations

import importlib
import sys
import zlib
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1].parent  # <pack>/tests (this folder is linked into custom_nodes)


def _dit_models():
    host_tests = str(TESTS / "host")
    if host_tests not in sys.path:
        sys.path.append(host_tests)
    return importlib.import_module("dit_models")


class IPAFTestTinyFluxLoader:
    CATEGORY = "ipaf_test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet_name):
        import folder_paths
        return (_dit_models().load_tiny_dit_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name)),)


class _StandInTextEncoder:
    """What CLIPTextEncode calls on a CLIP: tokenize(text), then encode_from_tokens_scheduled(tokens)."""

    def __init__(self, context_dim: int, pooled_dim: int, tokens: int):
        self.context_dim, self.pooled_dim, self.tokens = context_dim, pooled_dim, tokens

    def tokenize(self, text, **kwargs):
        return str(text)

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        import torch
        g = torch.Generator().manual_seed(zlib.crc32(tokens.encode("utf-8")))
        cond = torch.randn(1, self.tokens, self.context_dim, generator=g)
        extra = {"pooled_output": torch.randn(1, self.pooled_dim, generator=g)}
        extra.update(add_dict or {})
        return [[cond, extra]]


class IPAFTestTinyFluxText:
    CATEGORY = "ipaf_test"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"context_dim": ("INT", {"default": 64, "min": 1, "max": 4096}),
                             "pooled_dim": ("INT", {"default": 32, "min": 1, "max": 4096}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    def load(self, context_dim, pooled_dim, tokens):
        return (_StandInTextEncoder(context_dim, pooled_dim, tokens),)


NODE_CLASS_MAPPINGS = {"IPAFTestTinyFluxLoader": IPAFTestTinyFluxLoader, "IPAFTestTinyFluxText": IPAFTestTinyFluxText}
