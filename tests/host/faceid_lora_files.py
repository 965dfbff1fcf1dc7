"""Test-side makers for the FaceID LoRA: random checkpoint LoRA dicts shaped for a host UNet, and the
separately published LoRA file's key layout (ip-adapter-faceid*_lora.safetensors).

Written from the layouts, not from the pack: the transformer blocks are enumerated here in diffusers'
`attn_processors` order (down blocks, up blocks, mid block: UNet2DConditionModel assigns
`down_blocks` and `up_blocks` before `mid_block`, and each BasicTransformerBlock yields attn1 then
attn2), named with diffusers module paths. The published file is kohya-style with those paths:
`lora_unet_<path with _>_attn1_to_q.lora_down.weight` / `.lora_up.weight`, `to_out_0` for to_out,
and no `.alpha` (scale 1, like the checkpoint's processors). A host LoRA loader maps these names back
to its own keys with its own diffusers table, so a wrong order or name here or in the pack fails the
comparison.
"""
from __future__ import annotations

import torch

TARGETS = {"q": ("to_q", "to_q"), "k": ("to_k", "to_k"), "v": ("to_v", "to_v"), "out": ("to_out.0", "to_out_0")}


def _transformer_child(block):
    for name, child in block.named_children():
        if hasattr(child, "transformer_blocks"):
            return name, child
    return None, None


def diffusers_transformer_blocks(diffusion_model, num_res_blocks) -> list[tuple[str, str]]:
    """(diffusers path, host path) of every transformer block, in diffusers attn_processors order.
    `num_res_blocks`: per level (the host's unet_config value)."""
    nrb = list(num_res_blocks)
    down, up, mid = [], [], []
    # host input_blocks: 0 = conv_in, then per level nrb (res [+ transformer]) and one downsample
    i = 1
    for level, n in enumerate(nrb):
        for r in range(n + 1):
            if i >= len(diffusion_model.input_blocks):
                break
            name, st = _transformer_child(diffusion_model.input_blocks[i])
            if st is not None:
                for t in range(len(st.transformer_blocks)):
                    down.append((f"down_blocks.{level}.attentions.{r}.transformer_blocks.{t}",
                                 f"input_blocks.{i}.{name}.transformer_blocks.{t}"))
            i += 1
    j = 0
    for u, n in enumerate(reversed(nrb)):
        for r in range(n + 1):
            name, st = _transformer_child(diffusion_model.output_blocks[j])
            if st is not None:
                for t in range(len(st.transformer_blocks)):
                    up.append((f"up_blocks.{u}.attentions.{r}.transformer_blocks.{t}",
                               f"output_blocks.{j}.{name}.transformer_blocks.{t}"))
            j += 1
    name, st = _transformer_child(diffusion_model.middle_block)
    if st is not None:
        for t in range(len(st.transformer_blocks)):
            mid.append((f"mid_block.attentions.0.transformer_blocks.{t}",
                        f"middle_block.{name}.transformer_blocks.{t}"))
    return down + up + mid


def processor_layers(diffusion_model, num_res_blocks) -> list[tuple[str, str]]:
    """(diffusers attention path, host attention path) per processor N: 2j = attn1, 2j+1 = attn2 of block j."""
    out = []
    for dpath, hpath in diffusers_transformer_blocks(diffusion_model, num_res_blocks):
        out += [(f"{dpath}.attn1", f"{hpath}.attn1"), (f"{dpath}.attn2", f"{hpath}.attn2")]
    return out


def random_faceid_lora(diffusion_model, num_res_blocks, rank: int = 4, seed: int = 0, scale: float = 0.05) -> dict:
    """N -> {"q","k","v","out"} -> (down (r, in), up (out, r)) with the shapes of `diffusion_model`'s layers."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for n, (_, hpath) in enumerate(processor_layers(diffusion_model, num_res_blocks)):
        attn = diffusion_model.get_submodule(hpath)
        lora[n] = {}
        for name, (target, _) in TARGETS.items():
            out_f, in_f = attn.get_submodule(target).weight.shape
            down = torch.randn(rank, in_f, generator=g) * scale
            up = torch.randn(out_f, rank, generator=g) * scale
            lora[n][name] = (down, up)
    return lora


def published_lora_state_dict(lora: dict, diffusion_model, num_res_blocks) -> dict:
    """The same tensors under the published LoRA file's keys (kohya-style diffusers names, no alpha)."""
    sd = {}
    for n, (dpath, _) in enumerate(processor_layers(diffusion_model, num_res_blocks)):
        stem = "lora_unet_" + dpath.replace(".", "_")
        for name, (_, suffix) in TARGETS.items():
            down, up = lora[n][name]
            sd[f"{stem}_{suffix}.lora_down.weight"] = down.contiguous()
            sd[f"{stem}_{suffix}.lora_up.weight"] = up.contiguous()
    return sd


def expected_weights(lora: dict, diffusion_model, num_res_blocks, base_state: dict, strength: float = 1.0) -> dict:
    """{host state-dict key: W + strength * up @ down} for every LoRA layer, from `base_state`."""
    want = {}
    for n, (_, hpath) in enumerate(processor_layers(diffusion_model, num_res_blocks)):
        for name, (target, _) in TARGETS.items():
            key = f"diffusion_model.{hpath}.{target}.weight"
            down, up = lora[n][name]
            want[key] = base_state[key] + strength * (up.float() @ down.float())
    return want
