"""The cross-attention sites of a host UNet, read off the module tree itself.

Reading the real model (instead of assuming SD1.5 or SDXL tables) gives the host's patch
keys, the transformer indices and each layer's width for any UNet built like the
LDM one (SD1.5, SD2, SDXL, Kolors), and lets an adapter be checked against the model
before anything is patched."""
from __future__ import annotations

from .schedules import Site

_ORDER = {"input": 0, "output": 1, "middle": 2}  # checkpoint (diffusers processor) order


def _transformers(block):
    for m in block.modules():
        if hasattr(m, "transformer_blocks"):
            yield m


def unet_attn2_sites(diffusion_model) -> list[Site]:
    """Sites in checkpoint order (input blocks, output blocks, middle block)."""
    return [site for site, _ in unet_attn2_layers(diffusion_model)]


def unet_attn2_layers(diffusion_model) -> list:
    """(Site, attn2 module) pairs in checkpoint order, for the few features that read a layer's
    own weights (multi-reference routing projects entity words with its to_k)."""
    for name in ("input_blocks", "middle_block", "output_blocks"):
        if not hasattr(diffusion_model, name):
            raise ValueError(
                f"this model has no '{name}': it is not a UNet (a DiT such as Flux or SD3 needs an adapter made for it)"
            )
    groups = [("input", list(diffusion_model.input_blocks)), ("middle", [diffusion_model.middle_block]),
              ("output", list(diffusion_model.output_blocks))]
    sites = []
    t_idx = 0
    for block_name, blocks in groups:  # forward order, which is what transformer_index counts
        for block_id, block in enumerate(blocks):
            for st in _transformers(block):
                for index, tb in enumerate(st.transformer_blocks):
                    attn2 = getattr(tb, "attn2", None)
                    if attn2 is None:
                        continue
                    sites.append((Site(
                        key=(block_name, block_id, index),
                        block=block_name,
                        transformer_index=t_idx,
                        width=attn2.to_q.out_features,
                        context_dim=attn2.to_k.in_features,
                        heads=attn2.heads,
                    ), attn2))
                t_idx += 1
    sites.sort(key=lambda pair: (_ORDER[pair[0].block], pair[0].key[1], pair[0].key[2]))
    return sites
