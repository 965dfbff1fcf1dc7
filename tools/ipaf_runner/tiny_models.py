"""Tiny random-weight models in the real file layouts, for the selfcheck and the server tests.

The host detects a model from its keys and shapes, so these files are what ComfyUI expects of an
SD1.5 checkpoint (320 channels at every level, CLIP-L text encoder, TAESD as VAE), a CLIP ViT-L/14
vision model and IP-Adapters (base, Plus, Full-face) made by the pack's models/synthetic.py. They are
cached under ~/.cache/ipadapter_fused, keyed by SELFCHECK_MODELS_VERSION. Images made with them are
noise; they show that the pack loads, patches and samples."""
from __future__ import annotations

import importlib
import os
import sys
import time
import types
from pathlib import Path

from .errors import RunnerError, log

PACK_ROOT = Path(__file__).resolve().parents[2]
# Bump when the generated host models change (names, shapes, init): the cache is keyed by it.
SELFCHECK_MODELS_VERSION = 1

# Selfcheck file names (tools/ipaf_runner/selfcheck_sd15.json refers to them).
SC_CHECKPOINT = "ipaf_selfcheck_sd15.safetensors"
SC_CLIP_VISION = "ipaf_selfcheck_clip_vision_vitl.safetensors"
SC_ADAPTER = "ipaf_selfcheck_sd15_base.safetensors"
SC_IMAGE = "ipaf_selfcheck_input.png"
SC_PREFIX_IP = "ipaf_selfcheck_ip"
SC_PREFIX_PLAIN = "ipaf_selfcheck_plain"
# More adapters and a second UNet for the server tests
ADAPTER_FILES = {"base": SC_ADAPTER, "plus": "ipaf_selfcheck_sd15_plus.safetensors",
                 "full-face": "ipaf_selfcheck_sd15_full_face.safetensors"}
SC_UNET_B = "ipaf_selfcheck_sd15_unet_b.safetensors"
# SD1.5 attn2 sites of the selfcheck UNet: 16 layers, all 320 wide (channel_mult 1,1,1,1);
# CLIP ViT-L/14: image_embeds 768 wide (base), penultimate hidden states 1024 wide (Plus, Full-face).
SC_LAYER_DIMS = [320] * 16
SC_CONTEXT = 768
ENCODER_WIDTH = {"base": 768, "plus": 1024, "full-face": 1024}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ipadapter_fused"


def _import_pack_module(name: str):
    """Import a submodule of this pack (e.g. 'models.synthetic') without running the pack's __init__
    (which imports the node classes)."""
    pkg = "ipadapter_fused_tools_pkg"
    if pkg not in sys.modules:
        module = types.ModuleType(pkg)
        module.__path__ = [str(PACK_ROOT)]
        module.__package__ = pkg
        sys.modules[pkg] = module
    return importlib.import_module(f"{pkg}.{name}")


def _gen(shape, fan_in, gen, scale=1.0):
    import torch
    return torch.randn(*shape, generator=gen) * (scale / max(1, fan_in) ** 0.5)


class _UNetStateWriter:
    """Writes random LDM-layout UNet weights into a state dict, in a fixed order (so a seed always
    gives the same file): matrices and kernels N(0, scale^2 / fan_in), norms 1, biases 0."""

    def __init__(self, seed: int, prefix: str, time_dim: int, context_dim: int):
        import torch
        self.torch = torch
        self.g = torch.Generator().manual_seed(seed)
        self.sd = {}
        self.prefix, self.T, self.context_dim = prefix, time_dim, context_dim

    def lin(self, name, out_f, in_f, bias=True, scale=1.0):
        self.sd[self.prefix + name + ".weight"] = _gen((out_f, in_f), in_f, self.g, scale)
        if bias:
            self.sd[self.prefix + name + ".bias"] = self.torch.zeros(out_f)

    def conv(self, name, out_c, in_c, k, bias=True, scale=1.0):
        self.sd[self.prefix + name + ".weight"] = _gen((out_c, in_c, k, k), in_c * k * k, self.g, scale)
        if bias:
            self.sd[self.prefix + name + ".bias"] = self.torch.zeros(out_c)

    def norm(self, name, c):
        self.sd[self.prefix + name + ".weight"] = self.torch.ones(c)
        self.sd[self.prefix + name + ".bias"] = self.torch.zeros(c)

    def resblock(self, name, cin, cout):
        self.norm(f"{name}.in_layers.0", cin)
        self.conv(f"{name}.in_layers.2", cout, cin, 3)
        self.lin(f"{name}.emb_layers.1", cout, self.T)
        self.norm(f"{name}.out_layers.0", cout)
        self.conv(f"{name}.out_layers.3", cout, cout, 3, scale=0.5)
        if cin != cout:
            self.conv(f"{name}.skip_connection", cout, cin, 1)

    def transformer(self, name, c, depth=1, conv_proj=False):
        """A SpatialTransformer: SD1.x projects in and out with 1x1 convs, SDXL with linears."""
        proj = (lambda n, scale=1.0: self.conv(n, c, c, 1, scale=scale)) if conv_proj else \
            (lambda n, scale=1.0: self.lin(n, c, c, scale=scale))
        self.norm(f"{name}.norm", c)
        proj(f"{name}.proj_in")
        for d in range(depth):
            b = f"{name}.transformer_blocks.{d}"
            for attn, kv_dim in (("attn1", c), ("attn2", self.context_dim)):
                self.lin(f"{b}.{attn}.to_q", c, c, bias=False)
                self.lin(f"{b}.{attn}.to_k", c, kv_dim, bias=False)
                self.lin(f"{b}.{attn}.to_v", c, kv_dim, bias=False)
                self.lin(f"{b}.{attn}.to_out.0", c, c)
            self.lin(f"{b}.ff.net.0.proj", 8 * c, c)
            self.lin(f"{b}.ff.net.2", c, 4 * c)
            for n in ("norm1", "norm2", "norm3"):
                self.norm(f"{b}.{n}", c)
        proj(f"{name}.proj_out", scale=0.5)


def sd15_unet_state(model_channels=320, channel_mult=(1, 1, 1, 1), num_res_blocks=2, attn_levels=(0, 1, 2),
                    context_dim=768, in_channels=4, seed=0, prefix="model.diffusion_model."):
    """An LDM-layout UNet state dict (SD1.x key names; 1x1-conv proj_in/out; GEGLU feed-forward).

    The host takes the structure from the keys: model_channels from input_blocks.0.0, the channel
    multipliers from each ResBlock's out_layers.3, the attention depth from transformer_blocks.N, and
    picks SD1.5 by context_dim 768 + model_channels 320 + conv proj_in + no label_emb."""
    C = model_channels
    T = 4 * C

    w = _UNetStateWriter(seed, prefix, T, context_dim)
    sd = w.sd
    lin, conv, norm, resblock = w.lin, w.conv, w.norm, w.resblock

    def transformer(name, c):
        w.transformer(name, c, conv_proj=True)

    lin("time_embed.0", T, C)
    lin("time_embed.2", T, T)
    conv("input_blocks.0.0", C, in_channels, 3)
    skips = [C]
    ch = C
    idx = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out_c = C * mult
            resblock(f"input_blocks.{idx}.0", ch, out_c)
            ch = out_c
            if level in attn_levels:
                transformer(f"input_blocks.{idx}.1", ch)
            skips.append(ch)
            idx += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level in reversed(range(len(channel_mult))):
        mult = channel_mult[level]
        for i in range(num_res_blocks + 1):
            skip = skips.pop()
            out_c = C * mult
            resblock(f"output_blocks.{idx}.0", ch + skip, out_c)
            ch = out_c
            sub = 1
            if level in attn_levels:
                transformer(f"output_blocks.{idx}.1", ch)
                sub = 2
            if level != 0 and i == num_res_blocks:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    norm("out.0", ch)
    conv("out.2", 4, ch, 3, scale=0.5)
    return sd


def clip_text_state(prefix="cond_stage_model.transformer.text_model.", width=768, layers=12, heads=12,
                    intermediate=3072, vocab=49408, positions=77, seed=1):
    """HF-layout CLIP text encoder (the host's SD1 text encoder config is fixed: ViT-L/14 text tower)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = {prefix + "embeddings.token_embedding.weight": torch.randn(vocab, width, generator=g) * 0.02,
          prefix + "embeddings.position_embedding.weight": torch.randn(positions, width, generator=g) * 0.01}
    _encoder_layers(sd, prefix, layers, width, intermediate, g)
    sd[prefix + "final_layer_norm.weight"] = torch.ones(width)
    sd[prefix + "final_layer_norm.bias"] = torch.zeros(width)
    return sd


def _encoder_layers(sd, prefix, layers, width, intermediate, g):
    """The HF CLIP encoder layers shared by the text and the vision tower."""
    import torch
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{n}.weight"] = _gen((width, width), width, g)
            sd[p + f"self_attn.{n}.bias"] = torch.zeros(width)
        sd[p + "mlp.fc1.weight"] = _gen((intermediate, width), width, g)
        sd[p + "mlp.fc1.bias"] = torch.zeros(intermediate)
        sd[p + "mlp.fc2.weight"] = _gen((width, intermediate), intermediate, g, 0.5)
        sd[p + "mlp.fc2.bias"] = torch.zeros(width)
        for n in ("layer_norm1", "layer_norm2"):
            sd[p + n + ".weight"] = torch.ones(width)
            sd[p + n + ".bias"] = torch.zeros(width)


def clip_vision_state(width=1024, layers=24, intermediate=4096, patch=14, image_size=224, projection=768, seed=2):
    """HF-layout CLIP vision tower. The host picks its config by keys: 23+ layers and 257 positions
    select ViT-L/14 (width 1024, 24 layers, projection 768), the smallest it accepts."""
    import torch
    g = torch.Generator().manual_seed(seed)
    p = "vision_model."
    positions = (image_size // patch) ** 2 + 1
    sd = {p + "embeddings.class_embedding": torch.randn(width, generator=g) * 0.02,
          p + "embeddings.patch_embedding.weight": _gen((width, 3, patch, patch), 3 * patch * patch, g),
          p + "embeddings.position_embedding.weight": torch.randn(positions, width, generator=g) * 0.02}
    for n in ("pre_layrnorm", "post_layernorm"):
        sd[p + n + ".weight"] = torch.ones(width)
        sd[p + n + ".bias"] = torch.zeros(width)
    _encoder_layers(sd, p, layers, width, intermediate, g)
    sd["visual_projection.weight"] = _gen((projection, width), width, g)
    return sd


def taesd_state(latent_channels=4, seed=3):
    """Tiny AutoEncoder (TAESD) layout: taesd_encoder.* / taesd_decoder.* Sequential indices."""
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, out_c, in_c, k=3, bias=True, scale=1.0):
        sd[name + ".weight"] = _gen((out_c, in_c, k, k), in_c * k * k, g, scale)
        if bias:
            sd[name + ".bias"] = torch.zeros(out_c)

    def block(name):
        for j in (0, 2, 4):
            conv(f"{name}.conv.{j}", 64, 64, scale=1.0 if j < 4 else 0.5)

    e = "taesd_encoder"
    conv(f"{e}.0", 64, 3)
    block(f"{e}.1")
    for start in (2, 6, 10):
        conv(f"{e}.{start}", 64, 64, bias=False)
        for k in range(1, 4):
            block(f"{e}.{start + k}")
    conv(f"{e}.14", latent_channels, 64)
    d = "taesd_decoder"
    conv(f"{d}.1", 64, latent_channels)
    for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):
        block(f"{d}.{i}")
    for i in (7, 12, 17):
        conv(f"{d}.{i}", 64, 64, bias=False)
    conv(f"{d}.19", 3, 64, scale=0.3)
    sd[f"{d}.19.bias"] = torch.full((3,), 0.5)
    sd["vae_scale"] = torch.tensor(0.18215)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def _save(sd: dict, path: Path, dtype="float16") -> None:
    import torch
    from safetensors.torch import save_file
    dt = getattr(torch, dtype)
    out = {k: (v.to(dt) if v.is_floating_point() and v.dim() > 0 else v.float()).contiguous() for k, v in sd.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    save_file(out, str(tmp), metadata={"generated_by": "ipadapter-fused selfcheck (random weights)"})
    os.replace(tmp, path)


def make_adapter(path: Path, layout: str = "base", layer_dims=SC_LAYER_DIMS, context_dim: int = SC_CONTEXT,
                 encoder_width: int | None = None, seed: int = 0) -> Path:
    """An IP-Adapter with random weights in the public key layout, made by the pack's models/synthetic.py;
    by default one that fits the selfcheck UNet and CLIP vision model."""
    try:
        synthetic = _import_pack_module("models.synthetic")
    except ImportError as exc:
        raise RunnerError(f"the pack's models/synthetic.py is not importable ({exc}); it makes the tiny adapters")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part.safetensors")
    synthetic.save_synthetic_adapter(str(tmp), layout, list(layer_dims), context_dim,
                                     encoder_width or ENCODER_WIDTH[layout], seed=seed)
    os.replace(tmp, path)
    return path


def make_input_image(path: Path, size: int = 96) -> Path:
    """A small picture with structure (gradients and a red square): the image prompt's input."""
    from PIL import Image
    import numpy as np
    yy, xx = np.mgrid[0:size, 0:size] * (96.0 / size)
    img = np.stack([xx * 2.6, yy * 2.6, (xx + yy) * 1.3], -1)
    q = size // 3
    img[q:2 * q, q:2 * q] = [250, 40, 40]
    Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(path)
    return Path(path)


def _cached(path: Path, what: str, make) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"making {path} ({what}) ...")
        make(path)
    return path


def _make_checkpoint(path: Path) -> None:
    sd = sd15_unet_state()
    sd.update(clip_text_state())
    sd.update({"first_stage_model." + k: v for k, v in taesd_state().items()})
    _save(sd, path)


def host_models(work_dir: Path, cache_dir: Path | None = None, adapters=("base",), unet_b: bool = False) -> dict:
    """The tiny models, {host folder: [files]}: checkpoints and clip_vision (cached), ipadapter (the
    layouts asked for, made afresh in work_dir: they follow the pack's models/synthetic.py and take
    well under a second) and, with unet_b, diffusion_models/SC_UNET_B (cached; a UNet of the same
    shape with other weights)."""
    import torch
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root = Path(cache_dir or default_cache_dir()) / f"selfcheck-models-v{SELFCHECK_MODELS_VERSION}"
    t0 = time.time()
    out = {
        "checkpoints": [_cached(root / "checkpoints" / SC_CHECKPOINT,
                                "SD1.5-layout UNet with 320 channels at every level, CLIP-L text encoder, TAESD as VAE",
                                _make_checkpoint)],
        "clip_vision": [_cached(root / "clip_vision" / SC_CLIP_VISION, "CLIP ViT-L/14 vision layout",
                                lambda p: _save(clip_vision_state(), p))],
        "ipadapter": [make_adapter(Path(work_dir) / "ipadapter" / ADAPTER_FILES[layout], layout)
                      for layout in adapters],
    }
    if unet_b:
        out["diffusion_models"] = [_cached(root / "diffusion_models" / SC_UNET_B, "a second UNet of the same shape",
                                           lambda p: _save(sd15_unet_state(seed=7, prefix=""), p))]
    if time.time() - t0 > 1:
        log(f"tiny models ready in {time.time() - t0:.1f} s (cached in {root})")
    return out


def image_stats(paths: list) -> list[dict]:
    import hashlib
    from PIL import Image
    import numpy as np
    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
        out.append({"path": str(p), "shape": list(a.shape), "min": float(a.min()), "max": float(a.max()),
                    "std": float(a.std()), "sha1": hashlib.sha1(a.tobytes()).hexdigest()})
    return out


# --------------------------------------------------------------------------------------------------
# SDXL: the host's SDXL detection wants model_channels 320, transformer depths (0, 2, 10) on three
# levels, linear proj_in/out, context 2048 and a 2816-wide label embedding; its text encoders are
# fixed-size (CLIP-L and CLIP-G, ~820M parameters together), so the SDXL checkpoint is the big one.
# --------------------------------------------------------------------------------------------------
SC_SDXL_CHECKPOINT = "ipaf_selfcheck_sdxl.safetensors"
SC_SDXL_ADAPTER = "ipaf_selfcheck_sdxl_base.safetensors"
SC_SDXL_LAYER_DIMS = [320] * 70
SC_SDXL_CONTEXT = 2048


def sdxl_unet_state(model_channels=320, depths=(0, 2, 10), context_dim=2048, adm_in_channels=2816,
                    num_res_blocks=2, in_channels=4, seed=0, prefix="model.diffusion_model."):
    """An SGM-layout SDXL UNet state dict with `model_channels` at every level (channel_mult 1,1,1)."""
    C = model_channels
    T = 4 * C

    w = _UNetStateWriter(seed, prefix, T, context_dim)
    sd = w.sd
    lin, conv, norm, resblock, transformer = w.lin, w.conv, w.norm, w.resblock, w.transformer

    lin("time_embed.0", T, C)
    lin("time_embed.2", T, T)
    lin("label_emb.0.0", T, adm_in_channels)
    lin("label_emb.0.2", T, T)
    conv("input_blocks.0.0", C, in_channels, 3)
    idx = 1
    for level, depth in enumerate(depths):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{idx}.0", C, C)
            if depth:
                transformer(f"input_blocks.{idx}.1", C, depth)
            idx += 1
        if level != len(depths) - 1:
            conv(f"input_blocks.{idx}.0.op", C, C, 3)
            idx += 1
    resblock("middle_block.0", C, C)
    transformer("middle_block.1", C, depths[-1])
    resblock("middle_block.2", C, C)
    idx = 0
    for level in reversed(range(len(depths))):
        for i in range(num_res_blocks + 1):
            resblock(f"output_blocks.{idx}.0", 2 * C, C)
            sub = 1
            if depths[level]:
                transformer(f"output_blocks.{idx}.1", C, depths[level])
                sub = 2
            if level != 0 and i == num_res_blocks:
                conv(f"output_blocks.{idx}.{sub}.conv", C, C, 3)
            idx += 1
    norm("out.0", C)
    conv("out.2", 4, C, 3, scale=0.5)
    return sd


def _make_sdxl_checkpoint(path: Path) -> None:
    import torch
    sd = sdxl_unet_state()
    sd.update(clip_text_state(prefix="conditioner.embedders.0.transformer.text_model."))
    # CLIP-G (ViT-bigG text tower) in the HF layout under the SGM prefix; the host reads it as is
    g_prefix = "conditioner.embedders.1.model.transformer."
    sd.update(clip_text_state(prefix=g_prefix + "text_model.", width=1280, layers=32, heads=20,
                              intermediate=5120, seed=4))
    sd[g_prefix + "text_projection.weight"] = _gen((1280, 1280), 1280, torch.Generator().manual_seed(5))
    sd.update({"first_stage_model." + k: v for k, v in taesd_state().items()})
    _save(sd, path)


def sdxl_models(work_dir: Path, cache_dir: Path | None = None) -> dict:
    """{host folder: [files]} for an SDXL run: the tiny SDXL checkpoint (cached; 1.7 GB, CLIP-G is
    most of it) and a base adapter for its 70 layers (made in work_dir); CLIP vision is the ViT-L one."""
    root = Path(cache_dir or default_cache_dir()) / f"selfcheck-models-v{SELFCHECK_MODELS_VERSION}"
    ckpt = _cached(root / "checkpoints" / SC_SDXL_CHECKPOINT,
                   "SDXL-layout UNet with 320 channels at every level, CLIP-L + CLIP-G text encoders, TAESD",
                   _make_sdxl_checkpoint)
    adapter = make_adapter(Path(work_dir) / "ipadapter" / SC_SDXL_ADAPTER, "base", SC_SDXL_LAYER_DIMS,
                           SC_SDXL_CONTEXT, ENCODER_WIDTH["base"])
    return {"checkpoints": [ckpt], "ipadapter": [adapter]}


# --------------------------------------------------------------------------------------------------
# Tiny DiTs (Flux dev, Chroma, SD3.5-Large-style MMDiT) in the real diffusion-model key layouts, for the
# DiT image-prompt tests (tests/host/dit_models.py builds host models from these state dicts).
#
# What the host (0.3.64) reads from the shapes when it loads a file (comfy/model_detection.py):
# - MMDiT: everything. hidden = 64 * depth (x_embedder rows), heads = depth, one joint block per depth
#   (the last one's context half is pre_only), context width from context_embedder, pooled width from
#   y_embedder, qk_norm "rms" from ln_q keys, pos_embed_max_size = sqrt(pos_embed rows). So a tiny SD3
#   file loads through UNETLoader / comfy.sd.load_diffusion_model_state_dict as is.
# - Flux / Chroma: only the block counts, in/vec widths and the Flux/Chroma switch. hidden 3072, 24 heads,
#   context 4096, axes (16, 56, 56) are hard-coded (Chroma also its approximator 64 -> 5120 x 5 -> 3072),
#   so a narrow Flux/Chroma file does not load through UNETLoader; tests build the host's own model
#   classes with the config written into the file's metadata (key DIT_CONFIG_METADATA).
# Weights: matrices N(0, 1/fan_in), biases N(0, 0.02^2), norm scales 1 + N(0, 0.1^2): nothing is a
# neutral value, so a reference that skips a bias or a norm scale fails its comparison.
# --------------------------------------------------------------------------------------------------
DIT_CONFIG_METADATA = "ipaf_tiny_dit_config"

TINY_FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                        hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                        axes_dim=[8, 28, 28], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
# Chroma: in/out channels are the patchified width (16 x 2 x 2); the approximator maps
# [16 timestep + 16 guidance + 32 index] features to one modulation vector of width hidden_size.
TINY_CHROMA_CONFIG = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64,
                          hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                          axes_dim=[8, 28, 28], theta=10000, patch_size=2, qkv_bias=True,
                          in_dim=64, out_dim=128, hidden_dim=64, n_layers=2)
# SD3.5-Large-style: qk_norm rms, no x_block_self_attn (that is SD3.5 Medium). depth 2 = width 128, 2 heads.
TINY_SD3_CONFIG = dict(depth=2, in_channels=16, patch_size=2, context_dim=64, adm_in_channels=32,
                       pos_embed_max_size=16, qk_norm=True)


class _DiTStateWriter:
    """Random DiT weights in a fixed order (a seed always gives the same state)."""

    def __init__(self, seed: int, prefix: str):
        import torch
        self.torch = torch
        self.g = torch.Generator().manual_seed(seed)
        self.sd = {}
        self.prefix = prefix

    def lin(self, name, out_f, in_f, bias=True, scale=1.0):
        self.sd[self.prefix + name + ".weight"] = _gen((out_f, in_f), in_f, self.g, scale)
        if bias:
            self.sd[self.prefix + name + ".bias"] = self.torch.randn(out_f, generator=self.g) * 0.02

    def scale(self, name, n, key="scale"):
        self.sd[f"{self.prefix}{name}.{key}"] = 1.0 + 0.1 * self.torch.randn(n, generator=self.g)

    def tensor(self, name, shape, fan_in, scale=1.0):
        self.sd[self.prefix + name] = _gen(shape, fan_in, self.g, scale)

    def mlp_embedder(self, name, in_dim, hidden):
        self.lin(f"{name}.in_layer", hidden, in_dim)
        self.lin(f"{name}.out_layer", hidden, hidden)


def _flux_blocks(w, cfg, modulated: bool):
    h = cfg["hidden_size"]
    head_dim = h // cfg["num_heads"]
    mlp = int(h * cfg["mlp_ratio"])
    for i in range(cfg["depth"]):
        b = f"double_blocks.{i}"
        for s in ("img", "txt"):
            if modulated:
                w.lin(f"{b}.{s}_mod.lin", 6 * h, h)
            w.lin(f"{b}.{s}_attn.qkv", 3 * h, h, bias=cfg["qkv_bias"])
            w.scale(f"{b}.{s}_attn.norm.query_norm", head_dim)
            w.scale(f"{b}.{s}_attn.norm.key_norm", head_dim)
            w.lin(f"{b}.{s}_attn.proj", h, h)
            w.lin(f"{b}.{s}_mlp.0", mlp, h)
            w.lin(f"{b}.{s}_mlp.2", h, mlp, scale=0.5)
    for i in range(cfg["depth_single_blocks"]):
        b = f"single_blocks.{i}"
        w.lin(f"{b}.linear1", 3 * h + mlp, h)
        w.lin(f"{b}.linear2", h, h + mlp, scale=0.5)
        w.scale(f"{b}.norm.query_norm", head_dim)
        w.scale(f"{b}.norm.key_norm", head_dim)
        if modulated:
            w.lin(f"{b}.modulation.lin", 3 * h, h)


def flux_state(config=None, seed=0, prefix="") -> dict:
    """A Flux diffusion-model state dict (BFL / ComfyUI key names) for `config` (TINY_FLUX_CONFIG by default)."""
    cfg = dict(TINY_FLUX_CONFIG, **(config or {}))
    h, p = cfg["hidden_size"], cfg["patch_size"]
    w = _DiTStateWriter(seed, prefix)
    w.lin("img_in", h, cfg["in_channels"] * p * p)
    w.mlp_embedder("time_in", 256, h)
    w.mlp_embedder("vector_in", cfg["vec_in_dim"], h)
    if cfg["guidance_embed"]:
        w.mlp_embedder("guidance_in", 256, h)
    w.lin("txt_in", h, cfg["context_in_dim"])
    _flux_blocks(w, cfg, modulated=True)
    w.lin("final_layer.linear", p * p * cfg["out_channels"], h, scale=0.5)
    w.lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return w.sd


def chroma_state(config=None, seed=0, prefix="") -> dict:
    """A Chroma diffusion-model state dict: Flux blocks without per-block modulation, plus the
    distilled_guidance_layer (approximator) that computes every block's modulations at once."""
    cfg = dict(TINY_CHROMA_CONFIG, **(config or {}))
    h = cfg["hidden_size"]
    w = _DiTStateWriter(seed, prefix)
    w.lin("img_in", h, cfg["in_channels"])
    w.lin("txt_in", h, cfg["context_in_dim"])
    a = "distilled_guidance_layer"
    w.lin(f"{a}.in_proj", cfg["hidden_dim"], cfg["in_dim"])
    for j in range(cfg["n_layers"]):
        w.mlp_embedder(f"{a}.layers.{j}", cfg["hidden_dim"], cfg["hidden_dim"])
        w.scale(f"{a}.norms.{j}", cfg["hidden_dim"])
    w.lin(f"{a}.out_proj", cfg["out_dim"], cfg["hidden_dim"])
    _flux_blocks(w, cfg, modulated=False)
    w.lin("final_layer.linear", cfg["out_channels"], h, scale=0.5)
    return w.sd


def sd3_state(config=None, seed=0, prefix="") -> dict:
    """An SD3 / SD3.5 MMDiT state dict (SAI key names) for `config` (TINY_SD3_CONFIG by default)."""
    cfg = dict(TINY_SD3_CONFIG, **(config or {}))
    depth, p = cfg["depth"], cfg["patch_size"]
    h, head_dim = 64 * depth, 64
    w = _DiTStateWriter(seed, prefix)
    w.tensor("x_embedder.proj.weight", (h, cfg["in_channels"], p, p), cfg["in_channels"] * p * p)
    w.sd[prefix + "x_embedder.proj.bias"] = w.torch.randn(h, generator=w.g) * 0.02
    w.tensor("pos_embed", (1, cfg["pos_embed_max_size"] ** 2, h), 1, scale=0.1)
    w.lin("t_embedder.mlp.0", h, 256)
    w.lin("t_embedder.mlp.2", h, h)
    w.lin("y_embedder.mlp.0", h, cfg["adm_in_channels"])
    w.lin("y_embedder.mlp.2", h, h)
    w.lin("context_embedder", h, cfg["context_dim"])
    for i in range(depth):
        for part in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{part}"
            pre_only = part == "context_block" and i == depth - 1
            w.lin(f"{b}.adaLN_modulation.1", (2 if pre_only else 6) * h, h)
            w.lin(f"{b}.attn.qkv", 3 * h, h)
            if cfg["qk_norm"]:
                w.scale(f"{b}.attn.ln_q", head_dim, key="weight")
                w.scale(f"{b}.attn.ln_k", head_dim, key="weight")
            if not pre_only:
                w.lin(f"{b}.attn.proj", h, h)
                w.lin(f"{b}.mlp.fc1", 4 * h, h)
                w.lin(f"{b}.mlp.fc2", h, 4 * h, scale=0.5)
    w.lin("final_layer.linear", p * p * cfg["in_channels"], h, scale=0.5)
    w.lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return w.sd


DIT_STATES = {"flux": (flux_state, TINY_FLUX_CONFIG), "chroma": (chroma_state, TINY_CHROMA_CONFIG),
              "sd3": (sd3_state, TINY_SD3_CONFIG)}


def write_tiny_dit(path: Path, kind: str, config=None, seed=0) -> Path:
    """Write the tiny `kind` ('flux' / 'chroma' / 'sd3') diffusion model as float32 .safetensors (keys without
    prefix, as in diffusion_models/ files), with its config as JSON in the metadata (DIT_CONFIG_METADATA).
    The SD3 file loads through UNETLoader as is; Flux / Chroma files need the config (see above)."""
    import json
    from safetensors.torch import save_file
    make, base = DIT_STATES[kind]
    cfg = dict(base, **(config or {}))
    sd = make(cfg, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp),
              metadata={"generated_by": "ipadapter-fused tiny DiT (random weights)",
                        DIT_CONFIG_METADATA: json.dumps({"kind": kind, **cfg})})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Vision encoders smaller than any the host ships a config for (the pack's CLIP vision loader builds the
# host's ClipVisionModel from their shapes). Norm scales and biases are not neutral, so a loader that
# drops one is caught by a comparison.
# --------------------------------------------------------------------------------------------------
TINY_SIGLIP = dict(width=64, layers=2, intermediate=128, patch=14, image_size=56)
TINY_CLIP_VISION = dict(width=64, layers=2, intermediate=128, patch=14, image_size=56, projection=32)


def _unneutral_(sd: dict, g) -> dict:
    import torch
    for k, v in sd.items():
        if k.endswith(".bias"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.02
        elif "norm" in k and k.endswith(".weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
    return sd


def siglip_vision_state(width=64, layers=2, intermediate=128, patch=14, image_size=56, head=True, seed=4) -> dict:
    """HF-layout SigLIP vision tower (no class token, no pre-LayerNorm, patch bias), with the attention-pooling
    head `vision_model.head.*` (probe, MultiheadAttention in_proj/out_proj, layernorm, mlp) when `head`."""
    import torch
    g = torch.Generator().manual_seed(seed)
    p = "vision_model."
    positions = (image_size // patch) ** 2
    sd = {p + "embeddings.patch_embedding.weight": _gen((width, 3, patch, patch), 3 * patch * patch, g),
          p + "embeddings.patch_embedding.bias": torch.zeros(width),
          p + "embeddings.position_embedding.weight": torch.randn(positions, width, generator=g) * 0.02,
          p + "post_layernorm.weight": torch.ones(width), p + "post_layernorm.bias": torch.zeros(width)}
    _encoder_layers(sd, p, layers, width, intermediate, g)
    if head:
        h = p + "head."
        sd[h + "probe"] = torch.randn(1, 1, width, generator=g)
        sd[h + "attention.in_proj_weight"] = _gen((3 * width, width), width, g)
        sd[h + "attention.in_proj_bias"] = torch.zeros(3 * width)
        sd[h + "attention.out_proj.weight"] = _gen((width, width), width, g)
        sd[h + "attention.out_proj.bias"] = torch.zeros(width)
        sd[h + "layernorm.weight"] = torch.ones(width)
        sd[h + "layernorm.bias"] = torch.zeros(width)
        sd[h + "mlp.fc1.weight"] = _gen((intermediate, width), width, g)
        sd[h + "mlp.fc1.bias"] = torch.zeros(intermediate)
        sd[h + "mlp.fc2.weight"] = _gen((width, intermediate), intermediate, g, 0.5)
        sd[h + "mlp.fc2.bias"] = torch.zeros(width)
    return _unneutral_(sd, g)


def write_tiny_siglip(path: Path, head: bool = True, seed: int = 4, **sizes) -> Path:
    """A tiny SigLIP vision tower (TINY_SIGLIP sizes unless given) as float32 .safetensors, with its pooling head."""
    sd = siglip_vision_state(**dict(TINY_SIGLIP, **sizes), head=head, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(sd, path, dtype="float32")
    return path


def write_tiny_clip_vision(path: Path, seed: int = 5, **sizes) -> Path:
    """A tiny HF-layout CLIP vision tower (TINY_CLIP_VISION sizes unless given) as float32 .safetensors."""
    import torch
    sd = clip_vision_state(**dict(TINY_CLIP_VISION, **sizes), seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(_unneutral_(sd, torch.Generator().manual_seed(seed + 1)), path, dtype="float32")
    return path


# --------------------------------------------------------------------------------------------------
# DiT workflows on tiny models (tests/server/test_dit_workflows.py): adapters sized for the tiny DiTs, the
# one text encoder the host's SD3 path accepts alone (CLIP-L: the host's config is the full-size one, so the
# file is full size, cached), and TAESD-layout 16-channel VAEs the host's VAELoader lists as taesd3 / taef1.
# --------------------------------------------------------------------------------------------------
CLIP_L_TEXT = "ipaf_clip_l_text.safetensors"


def make_dit_adapter(path: Path, family: str, seed: int = 0, **dims) -> Path:
    """A random DiT adapter ('xlabs', 'instantx-flux', 'instantx-sd3') in its published key layout, made by the
    pack's models/synthetic.py; dims: hidden, heads, double_blocks, single_blocks, tokens, encoder_width, ..."""
    synthetic = _import_pack_module("models.synthetic")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part.safetensors")
    synthetic.save_synthetic_dit_adapter(tmp, family, None, seed=seed, **dims)
    os.replace(tmp, path)
    return path


def clip_l_text_encoder(cache_dir: Path | None = None) -> Path:
    """A CLIP-L text encoder file (HF keys text_model.*, random weights, float16; ~250 MB, cached)."""
    root = Path(cache_dir or default_cache_dir()) / f"selfcheck-models-v{SELFCHECK_MODELS_VERSION}"
    return _cached(root / "text_encoders" / CLIP_L_TEXT, "CLIP-L text encoder layout (full size: the host's config)",
                   lambda p: _save(clip_text_state(prefix="text_model."), p))


def write_taesd_pair(folder: Path, name: str, latent_channels: int = 16, seed: int = 3) -> list:
    """{name}_encoder.safetensors and {name}_decoder.safetensors in `folder` (the host's vae_approx layout:
    keys without the taesd_encoder. / taesd_decoder. prefix). name: taesd3 or taef1 (16 channels)."""
    sd = taesd_state(latent_channels=latent_channels, seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for part in ("encoder", "decoder"):
        prefix = f"taesd_{part}."
        path = folder / f"{name}_{part}.safetensors"
        _save({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, path, dtype="float32")
        out.append(path)
    return out
