"""Helpers for tests that run inside the real host (ComfyUI), on CPU, with tiny models.

Nothing here is imported by the pack. The host is found through $COMFYUI_PATH, else the snapshot beside the
pack (<pack>/../shared/host/ComfyUI); ComfyUI_IPAdapter_plus (reference for the compatibility mode) through
$IPADAPTER_PLUS_PATH, else <pack>/../shared/host/ComfyUI_IPAdapter_plus.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
RUNNER = PACK_ROOT / "tools" / "ipaf_runner"
HOST_ENV = "COMFYUI_PATH"
IPAPLUS_ENV = "IPADAPTER_PLUS_PATH"
SHARED_HOST = PACK_ROOT.parent / "shared" / "host"
HOST_DEFAULT = SHARED_HOST / "ComfyUI"
IPAPLUS_DEFAULT = SHARED_HOST / "ComfyUI_IPAdapter_plus"
# Set by .ci/run: a host test that skips (no host, a dependency missing) fails the run instead.
REQUIRE_ENV = "IPADAPTER_FUSED_REQUIRE_HOST"


def host_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")

_HOST = None
_HOST_ERROR = None


def load_runner():
    """The runner's package tools/ipaf_runner (converter, client, tiny-model makers)."""
    tools = str(RUNNER.parent)
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return importlib.import_module("ipaf_runner")


def host_path() -> Path | None:
    """$COMFYUI_PATH, else the shared snapshot when it exists, else None (no host at all)."""
    p = os.environ.get(HOST_ENV)
    if p:
        return Path(p).expanduser().resolve()
    return HOST_DEFAULT.resolve() if HOST_DEFAULT.is_dir() else None


def prepare_host():
    """Put the host on sys.path (first: its `nodes`, `utils`, `app` must win over same-named folders),
    force CPU, import the host modules the tests use. Returns a namespace of them; raises on failure."""
    global _HOST, _HOST_ERROR
    if _HOST is not None:
        return _HOST
    if _HOST_ERROR is not None:
        raise RuntimeError(_HOST_ERROR)
    path = host_path()
    if path is None:
        _HOST_ERROR = f"no host: ${HOST_ENV} is not set and {HOST_DEFAULT} does not exist"
        raise RuntimeError(_HOST_ERROR)
    if not (path / "comfy" / "model_management.py").is_file():
        _HOST_ERROR = f"${HOST_ENV}={path} is not a ComfyUI folder"
        raise RuntimeError(_HOST_ERROR)
    try:
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
        import comfy.options  # noqa: F401  (args parsing stays off: the host parses no argv here)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import torch
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models
        import comfy.clip_vision
        import comfy.ldm.modules.attention as attention
        import folder_paths
    except Exception as exc:  # missing deps, wrong folder, ...
        _HOST_ERROR = f"cannot import the host from {path}: {type(exc).__name__}: {exc}"
        # leave no half-imported host behind for the rest of the session
        if str(path) in sys.path:
            sys.path.remove(str(path))
        for name in [m for m, mod in sys.modules.items()
                     if str(getattr(mod, "__file__", "") or "").startswith(str(path) + os.sep)]:
            del sys.modules[name]
        raise RuntimeError(_HOST_ERROR) from exc
    if mm.get_torch_device().type != "cpu":
        _HOST_ERROR = "the host did not pick the CPU"
        raise RuntimeError(_HOST_ERROR)
    _HOST = types.SimpleNamespace(
        path=path, torch=torch, mm=mm, model_patcher=comfy.model_patcher, sample=comfy.sample,
        samplers=comfy.samplers, supported_models=comfy.supported_models, clip_vision=comfy.clip_vision,
        attention=attention, folder_paths=folder_paths)
    return _HOST


# --------------------------------------------------------------------------------------------------
# Tiny UNets built with the host's own model configs
# --------------------------------------------------------------------------------------------------
# The block structure is the real one (SD1.5: 16 attn2 sites; SDXL: 70), with fewer channels.
STRUCTURE = {
    "sd15": {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "transformer_depth_middle": 1},
    "sdxl": {"num_classes": "sequential", "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10},
}
CONFIG_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
POOLED_DIM = {"sd15": None, "sdxl": 1280}
ATTN2_SITES = {"sd15": 16, "sdxl": 70}
# SD1.5: 8 heads (head dim = width / 8); SDXL: head dim 64 (heads = width / 64). SDXL's first level
# has no attention, so model_channels 32 keeps head dim 64 with 1 and 2 heads.
DEFAULT_CHANNELS = {"sd15": 32, "sdxl": 32}


def unet_config(kind: str, model_channels: int | None = None) -> dict:
    """The host's config for `kind` ('sd15' / 'sdxl') with the real structure and fewer channels."""
    host = prepare_host()
    cls = getattr(host.supported_models, CONFIG_CLASS[kind])
    cfg = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False}
    cfg.update(cls.unet_config)
    cfg.update(getattr(cls, "unet_extra_config", {}))
    cfg.update(STRUCTURE[kind])
    cfg["model_channels"] = model_channels or DEFAULT_CHANNELS[kind]
    return cfg


def init_weights_(module, seed: int = 0, scale: float = 1.0) -> None:
    """Deterministic init for modules the host builds uninitialised (comfy.ops skips init):
    norm weights 1, biases 0, other vectors N(0, 0.02^2), matrices and kernels N(0, scale^2 / fan_in)."""
    torch = prepare_host().torch
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for _, mod in module.named_modules():
            is_norm = isinstance(mod, norms) or "norm" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "bias":
                    value = torch.zeros(p.shape)
                elif is_norm:
                    value = torch.ones(p.shape)
                elif p.dim() <= 1:
                    value = torch.randn(p.shape, generator=g) * 0.02
                else:
                    value = torch.randn(p.shape, generator=g) * (scale / p[0].numel() ** 0.5)
                p.copy_(value.to(p.dtype))


_UNETS = {}


def build_unet(kind: str, model_channels: int | None = None, seed: int = 0):
    """A host ModelPatcher around a tiny UNet built by the host's SD15 / SDXL config (float32, CPU).
    Built once per (kind, channels, seed); every call returns a fresh clone."""
    key = (kind, model_channels or DEFAULT_CHANNELS[kind], seed)
    if key not in _UNETS:
        host = prepare_host()
        torch = host.torch
        cfg = unet_config(kind, model_channels)
        model_config = getattr(host.supported_models, CONFIG_CLASS[kind])(cfg)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({}, "", device=torch.device("cpu"))
        init_weights_(model.diffusion_model, seed=seed)
        model.eval()
        patcher = host.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                  offload_device=torch.device("cpu"))
        _UNETS[key] = patcher
    return _UNETS[key].clone()


def attn2_sites(model_patcher) -> list[tuple]:
    """The (block_name, block_id, block_index) of every cross-attention of the UNet, in forward order,
    read from the module tree (input blocks, middle block, output blocks)."""
    unet = model_patcher.model.diffusion_model
    sites = []

    def scan(blocks, name):
        for block_id, block in enumerate(blocks):
            for layer in block:
                tbs = getattr(layer, "transformer_blocks", None)
                if tbs is None:
                    continue
                for index, tb in enumerate(tbs):
                    if getattr(tb, "attn2", None) is not None:
                        sites.append((name, block_id, index))

    scan(unet.input_blocks, "input")
    mid = unet.middle_block
    for layer in mid:
        for index, tb in enumerate(getattr(layer, "transformer_blocks", []) or []):
            if getattr(tb, "attn2", None) is not None:
                sites.append(("middle", 0, index))
    scan(unet.output_blocks, "output")
    return sites


# --------------------------------------------------------------------------------------------------
# Conditioning and sampling
# --------------------------------------------------------------------------------------------------
def make_cond(kind: str, seed: int = 0, tokens: int = 77, batch: int = 1, width: int = 128, height: int = 128):
    """Random (deterministic) text conditioning in the host's format: [[tensor, {extras}]]."""
    torch = prepare_host().torch
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, CONTEXT_DIM[kind], generator=g)
    extra = {}
    if POOLED_DIM[kind]:
        extra = {"pooled_output": torch.randn(batch, POOLED_DIM[kind], generator=g), "width": width, "height": height,
                 "crop_w": 0, "crop_h": 0, "target_width": width, "target_height": height}
    return [[cond, extra]]


def sample(model_patcher, positive, negative, *, seed: int = 0, steps: int = 2, cfg: float = 5.0,
           sampler_name: str = "euler", scheduler: str = "normal", latent_size: int = 16, batch: int = 1,
           denoise: float = 1.0, latent=None):
    """Sample with the host's comfy.sample.sample (the path KSampler takes) on CPU; returns the latent."""
    host = prepare_host()
    torch = host.torch
    if latent is None:
        latent = torch.zeros(batch, 4, latent_size, latent_size)
    noise = host.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        out = host.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                 latent, denoise=denoise, disable_pbar=True, seed=seed)
    return out


# --------------------------------------------------------------------------------------------------
# Tiny CLIP vision (the host's ClipVisionModel with a small config)
# --------------------------------------------------------------------------------------------------
def tiny_clip_vision_config(hidden_size=64, layers=3, heads=4, intermediate=128, image_size=56, patch_size=14,
                            projection_dim=32, hidden_act="gelu") -> dict:
    """A config with the keys the host's ClipVisionModel reads (HF CLIPVisionConfig names)."""
    return {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": hidden_act, "hidden_size": hidden_size,
            "image_size": image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": intermediate, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
            "num_attention_heads": heads, "num_channels": 3, "num_hidden_layers": layers,
            "patch_size": patch_size, "projection_dim": projection_dim, "torch_dtype": "float32"}


def make_clip_vision(config_dir: Path, seed: int = 0, **config):
    """comfy.clip_vision.ClipVisionModel from a tiny config written to `config_dir`, random weights.

    encode_image(image) returns image_embeds (B, projection_dim) and penultimate_hidden_states
    (B, (image_size/patch)^2 + 1, hidden_size)."""
    host = prepare_host()
    cfg = tiny_clip_vision_config(**config)
    path = Path(config_dir) / "tiny_clip_vision_config.json"
    path.write_text(json.dumps(cfg))
    cv = host.clip_vision.ClipVisionModel(str(path))
    init_weights_(cv.model, seed=seed)
    return cv


# --------------------------------------------------------------------------------------------------
# Recording what the host calls and looks up
# --------------------------------------------------------------------------------------------------
class RecordingAttn2:
    """An attn2 replacement that computes plain attention (the host's optimized_attention) and records
    each call: its key tag, and extra_options (keys and light values)."""

    def __init__(self, tag=None):
        self.tag = tag
        self.calls = []

    def __call__(self, q, k, v, extra_options):
        host = prepare_host()
        light = {}
        for key, value in extra_options.items():
            if isinstance(value, (int, float, str, bool, type(None))):
                light[key] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in value):
                light[key] = type(value)(value)
            elif hasattr(value, "shape"):
                light[key] = ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
            else:
                light[key] = type(value).__name__
        self.calls.append({"tag": self.tag, "q": tuple(q.shape), "k": tuple(k.shape), "extra": light})
        return host.attention.optimized_attention(q, k, v, extra_options["n_heads"])

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone(); keep one recorder
        return self


class LookupRecorder(dict):
    """A patches_replace["attn2"] dict that records the keys the host tests with `in`."""

    def __init__(self, base, log):
        super().__init__(base)
        self.log = log

    def __contains__(self, key):
        self.log.append(key)
        return super().__contains__(key)


def record_lookups(model_patcher, log: list) -> None:
    """Record every attn2 key the UNet looks up during sampling.

    The host copies model_options' nested dicts on the way (plain dict copies), so the recorder is put
    into the per-call transformer_options from a model_function_wrapper, right before apply_model."""
    previous = model_patcher.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        c = dict(args["c"])
        to = dict(c.get("transformer_options", {}))
        pr = dict(to.get("patches_replace", {}))
        pr["attn2"] = LookupRecorder(pr.get("attn2", {}), log)
        to["patches_replace"] = pr
        c["transformer_options"] = to
        if previous is not None:
            return previous(apply_model, {**args, "c": c})
        return apply_model(args["input"], args["timestep"], **c)

    model_patcher.set_model_unet_function_wrapper(wrapper)


# --------------------------------------------------------------------------------------------------
# ComfyUI_IPAdapter_plus, the reference of the compatibility mode
# --------------------------------------------------------------------------------------------------
def ipadapter_plus_path() -> Path | None:
    p = os.environ.get(IPAPLUS_ENV) or (IPAPLUS_DEFAULT if IPAPLUS_DEFAULT.is_dir() else None)
    if not p:
        return None
    p = Path(p).expanduser().resolve()
    return p if (p / "IPAdapterPlus.py").is_file() else None


def load_ipadapter_plus():
    """Import ComfyUI_IPAdapter_plus (from $IPADAPTER_PLUS_PATH) as the package `ipadapter_plus_ref`.
    Its modules: .IPAdapterPlus (ipadapter_execute, nodes), .CrossAttentionPatch, .image_proj_models,
    .utils. Returns the package; raises FileNotFoundError when it is not there."""
    path = ipadapter_plus_path()
    if path is None:
        raise FileNotFoundError(f"ComfyUI_IPAdapter_plus not found (set ${IPAPLUS_ENV})")
    prepare_host()
    name = "ipadapter_plus_ref"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
    pkg = sys.modules[name]
    importlib.import_module(name + ".IPAdapterPlus")
    return pkg


# --------------------------------------------------------------------------------------------------
# Exactness: each layer in one forward, and sampled latents within a measured bound
# --------------------------------------------------------------------------------------------------
# Sampling a random-weight tiny UNet amplifies rounding. Measured with torch 2.13.0 (CPU build) and
# 2.14.1 (CUDA build on the CPU), 2 euler steps, cfg 5, 16x16 latents: the latents reach |x| ~ 650-850,
# and scaling the adapter weight by (1 + 1e-7) -- a one-ulp change of one input -- moves the sampled
# latent by 1.9e-6 (SD1.5) to 3.8e-6 (SDXL) of its largest value, while the pack and the written-out
# formula differ per layer by at most 4.2e-7 of the layer's output (tests/host/test_exactness_host.py).
# The torch builds batch their CPU matmuls differently, so exactly equal latents across builds are not
# a property of the formula. Latents are therefore compared at LATENT_BOUND of their largest value:
# 5x the measured one-ulp response, and still 5 orders of magnitude below what an adapter changes
# (an adapter moves these latents by ~0.75 of their largest value).
LATENT_BOUND = 2e-5
# Per layer in one forward (fp32): both sides run the host's attention on the same q/k/v; only the
# batching of the image term differs. Measured worst case 4.2e-7 of the output's largest value.
LAYER_BOUND = 2e-6


def assert_latents_match(got, want, what: str = "sampled latent") -> None:
    torch = prepare_host().torch
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= LATENT_BOUND * max(scale, 1.0), (
        f"{what}: max difference {err:.3g} exceeds {LATENT_BOUND:g} x max|latent| ({scale:.3g})")


def host_attn2_patch(model_patcher, key):
    """The attn2 replacement the host would call for the site `key` (3-tuple first, then its 2-tuple
    fallback), or None when the site runs unpatched."""
    attn2 = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    if key in attn2:
        return attn2[key]
    return attn2.get(tuple(key[:2]))


def plain_attn2(q, k, v, extra_options):
    """What an unpatched site computes between to_q/to_k/to_v and to_out."""
    attention = prepare_host().attention
    return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                         attn_precision=extra_options.get("attn_precision"))


class LayerComparison:
    """Registered on one site of a real UNet forward: evaluates two candidates on the same q/k/v and
    keeps both outputs; the forward continues with the first (so later layers see realistic inputs)."""

    def __init__(self, key, first, second, log):
        self.key, self.first, self.second, self.log = key, first, second, log

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        a = (self.first or plain_attn2)(q, k, v, extra_options)
        b = (self.second or plain_attn2)(q, k, v, extra_options)
        self.log.append((self.key, a.detach().clone(), b.detach().clone()))
        return a


def compare_layers(first_model, second_model, kind: str, sites, steps: int = 1, **sample_kw):
    """Run first_model (its wrappers and options) with every site replaced by a LayerComparison of
    the patch each model would have there. Returns [(key, first_out, second_out)] for every call."""
    log: list = []
    probe = first_model.clone()
    for key in sites:
        probe.set_model_attn2_replace(
            LayerComparison(key, host_attn2_patch(first_model, key), host_attn2_patch(second_model, key), log), *key)
    sample(probe, make_cond(kind, seed=1), make_cond(kind, seed=2), steps=steps, latent_size=16, **sample_kw)
    return log


def assert_layers_match(log, bound: float = LAYER_BOUND) -> float:
    """Every layer's two outputs agree to `bound` of the output's largest value. Returns the worst ratio."""
    assert log, "no attention site was called"
    worst = 0.0
    for key, a, b in log:
        scale = max(float(b.abs().max()), 1e-6)
        ratio = float((a - b).abs().max()) / scale
        assert ratio <= bound, f"site {key}: max difference {ratio:.3g} x max|out| exceeds {bound:g}"
        worst = max(worst, ratio)
    return worst
