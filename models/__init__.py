"""Adapter checkpoints: safe loading, family detection, projection networks.

Never imports the host (ComfyUI): everything here runs and is tested with plain torch."""
from .adapter import IPAdapterWeights, load_adapter_file
from .encoding import COMBINE_METHODS, check_embeds, combine_embeds, combine_embeds_weighted
from .families import AdapterSpec, detect_family, expected_shapes
from .loading import AdapterFormatError, load_adapter_state
from .projections import LinearTokens, Resampler, TokenMLP, build_projection
from .synthetic import save_synthetic_adapter, sd15_layer_dims, sdxl_layer_dims, synthetic_adapter_state
from .dit_adapter import DiTAdapterWeights, Projected
from .dit_families import detect_dit_family, dit_family_of, expected_dit_shapes, with_dit_blocks
from .dit_projections import MLPTokens, TimeResampler, XLabsTokens
from .synthetic import DIT_LAYOUTS, dit_adapter_spec, save_synthetic_dit_adapter, synthetic_dit_adapter_state
from .synthetic import save_synthetic_mip_adapter, synthetic_mip_state
from .families import EncoderPart, FaceSpec, LayersPart, LoraSpec, ProjectionPart
from .face_families import FACE_KINDS, describe_face, detect_face_family, expected_face_shapes, face_family_of
from .face_projections import FaceIDMLP, FaceIDPlusProjection, FacePerceiver
from .synthetic import face_adapter_spec, save_synthetic_face_adapter, synthetic_face_state

__all__ = [
    "FACE_KINDS",
    "FaceIDMLP",
    "FaceIDPlusProjection",
    "FacePerceiver",
    "EncoderPart",
    "FaceSpec",
    "LayersPart",
    "LoraSpec",
    "ProjectionPart",
    "describe_face",
    "detect_face_family",
    "expected_face_shapes",
    "face_adapter_spec",
    "face_family_of",
    "save_synthetic_face_adapter",
    "synthetic_face_state",
    "AdapterFormatError",
    "AdapterSpec",
    "COMBINE_METHODS",
    "DIT_LAYOUTS",
    "DiTAdapterWeights",
    "MLPTokens",
    "Projected",
    "TimeResampler",
    "XLabsTokens",
    "detect_dit_family",
    "dit_adapter_spec",
    "dit_family_of",
    "expected_dit_shapes",
    "save_synthetic_dit_adapter",
    "synthetic_dit_adapter_state",
    "with_dit_blocks",
    "IPAdapterWeights",
    "LinearTokens",
    "Resampler",
    "TokenMLP",
    "build_projection",
    "check_embeds",
    "combine_embeds",
    "combine_embeds_weighted",
    "detect_family",
    "expected_shapes",
    "load_adapter_file",
    "load_adapter_state",
    "save_synthetic_adapter",
    "save_synthetic_mip_adapter",
    "sd15_layer_dims",
    "sdxl_layer_dims",
    "synthetic_adapter_state",
    "synthetic_mip_state",
]
