"""Adapter checkpoints: safe loading, family detection, projection networks.

Never imports the host (ComfyUI): everything here runs and is tested with plain torch."""
from .adapter import IPAdapterWeights, load_adapter_file
from .encoding import COMBINE_METHODS, check_embeds, combine_embeds
from .families import AdapterSpec, detect_family, expected_shapes
from .loading import AdapterFormatError, load_adapter_state
from .projections import LinearTokens, Resampler, TokenMLP, build_projection
from .synthetic import save_synthetic_adapter, sd15_layer_dims, sdxl_layer_dims, synthetic_adapter_state

__all__ = [
    "AdapterFormatError",
    "AdapterSpec",
    "COMBINE_METHODS",
    "IPAdapterWeights",
    "LinearTokens",
    "Resampler",
    "TokenMLP",
    "build_projection",
    "check_embeds",
    "combine_embeds",
    "detect_family",
    "expected_shapes",
    "load_adapter_file",
    "load_adapter_state",
    "save_synthetic_adapter",
    "sd15_layer_dims",
    "sdxl_layer_dims",
    "synthetic_adapter_state",
]
