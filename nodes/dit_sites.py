"""The blocks of a host DiT, read off the module tree, and the DiT families this pack knows.

A DiT adapter names its layers by the host's dit patch keys (("double_block", i),
("single_block", i)); this module says which keys a model has, how wide and how many heads
each block is, and how the model patchifies its latent, so an adapter can be checked against
the model before anything is patched. Models of families no adapter exists for get an
error that names them, never a shape error later."""
from __future__ import annotations

from dataclasses import dataclass

from .schedules import Site

# Host module (comfy.ldm.<name>) -> the family name users know, for DiTs no adapter fits.
_UNSUPPORTED = {
    "hydit": "Hunyuan-DiT",
    "qwen_image": "Qwen-Image",
    "wan": "Wan",
    "hunyuan_video": "HunyuanVideo",
    "hunyuan3d": "Hunyuan3D",
    "lumina": "Lumina 2",
    "hidream": "HiDream",
    "aura": "AuraFlow",
    "pixart": "PixArt",
    "cosmos": "Cosmos",
    "genmo": "Mochi",
    "lightricks": "LTX-Video",
    "chroma_radiance": "Chroma Radiance",
    "ace": "ACE-Step",
    "omnigen": "OmniGen 2",
    "cascade": "Stable Cascade",
    "audio": "Stable Audio",
}

SUPPORTED_DITS = "Flux (dev, schnell, Kontext), Chroma and SD3/SD3.5"


@dataclass(frozen=True)
class DitModel:
    """What the DiT binder needs to know about a host DiT."""
    architecture: str        # "flux" | "sd3"
    name: str                # "Flux" | "Chroma" | "SD3"
    blocks: tuple[Site, ...]  # every block in forward order; Site.block is "double" | "single" | "joint"
    patch_size: int
    hidden_size: int
    heads: int

    def site(self, key: tuple) -> Site:
        for s in self.blocks:
            if s.key == key:
                return s
        raise KeyError(key)

    def describe(self) -> str:
        kinds = {}
        for s in self.blocks:
            kinds[s.block] = kinds.get(s.block, 0) + 1
        parts = ", ".join(f"{n} {k} blocks" for k, n in kinds.items())
        return f"a {self.name} model ({parts}, width {self.hidden_size}, {self.heads} heads)"


def _module_family(diffusion_model) -> str:
    parts = type(diffusion_model).__module__.split(".")
    return parts[2] if len(parts) > 2 and parts[0] == "comfy" and parts[1] == "ldm" else ""


def is_dit(diffusion_model) -> bool:
    return not hasattr(diffusion_model, "input_blocks")


def unsupported_dit_message(diffusion_model) -> str:
    family = _module_family(diffusion_model)
    name = _UNSUPPORTED.get(family, type(diffusion_model).__name__)
    return (f"the model is {name}, for which no IP-Adapter exists in this pack; image-prompt adapters work on "
            f"SD1.5, SDXL and Kolors UNets and on the DiTs {SUPPORTED_DITS}")


def dit_model(diffusion_model) -> DitModel:
    """The blocks of a Flux-type (Flux, Chroma) or MMDiT (SD3, SD3.5) model."""
    family = _module_family(diffusion_model)
    if family in ("flux", "chroma") and hasattr(diffusion_model, "double_blocks"):
        heads = int(diffusion_model.num_heads)
        hidden = int(diffusion_model.hidden_size)
        blocks = []
        for i, _ in enumerate(diffusion_model.double_blocks):
            blocks.append(Site(("double_block", i), "double", len(blocks), hidden, 0, heads))
        for i, _ in enumerate(diffusion_model.single_blocks):
            blocks.append(Site(("single_block", i), "single", len(blocks), hidden, 0, heads))
        name = "Chroma" if family == "chroma" else "Flux"
        return DitModel("flux", name, tuple(blocks), int(diffusion_model.patch_size), hidden, heads)
    if family == "modules" and hasattr(diffusion_model, "joint_blocks"):
        blocks = []
        heads = hidden = 0
        for i, jb in enumerate(diffusion_model.joint_blocks):
            attn = jb.x_block.attn
            heads = int(attn.num_heads)
            hidden = int(attn.qkv.out_features // 3)
            blocks.append(Site(("double_block", i), "joint", i, hidden, 0, heads))
        patch = diffusion_model.x_embedder.patch_size
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        return DitModel("sd3", "SD3", tuple(blocks), patch, hidden, heads)
    raise ValueError(unsupported_dit_message(diffusion_model))
