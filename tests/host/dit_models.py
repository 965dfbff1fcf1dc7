"""Tiny random-weight DiTs (Flux dev, Chroma, SD3.5-Large-style MMDiT) as real host ModelPatchers.

The weights come from tools/ipaf_runner/tiny_models.py (flux_state / chroma_state / sd3_state: the real key
layouts, so the same state can be written to a .safetensors file with write_tiny_dit). How each is built:

- SD3: through the host's own loader, comfy.sd.load_diffusion_model_state_dict (what UNETLoader calls): the
  host detects every size from the shapes (width = 64 x depth, heads = depth, one joint block per depth).
- Flux / Chroma: the host's detection hard-codes width 3072, 24 heads, context 4096 and RoPE axes
  (16, 56, 56) (comfy/model_detection.py, the Flux/Chroma branch), so a narrow state cannot go through it.
  They are built the way the loader does it, with our config in place of detect_unet_config:
  comfy.model_detection.model_config_from_unet_config (the host picks Flux / Chroma from it), get_model,
  load_model_weights, ModelPatcher. Every key of the state must land in the model (checked).

What each model takes (the host's conditioning format, [[context, {extras}]]):

  kind    latent      context (B, L, width)      extras                        notes
  flux    16 ch, /8   any L, context_in_dim      pooled_output (B, vec_in_dim)  guidance (default 3.5) -> guidance_in;
                      (real: T5-XXL 4096)        (real: CLIP-L 768), guidance   model_type FLUX; cfg 1 usual
  chroma  16 ch, /8   any L, context_in_dim      pooled_output key required by  guidance default 0; no vec:
                      (real: T5-XXL 4096)        the host (encode_adm), None ok modulations from the approximator
  sd3     16 ch, /8   any L, context_dim         pooled_output (B, adm)         model_type FLOW (shift 3)
                      (real: 77 CLIP-L|G rows    (real: CLIP-L 768 + CLIP-G
                      padded to 4096, then T5    1280 = 2048)
                      rows, >= 77; width 4096)

The host needs the "pooled_output" key in every cond dict for all three (Flux.encode_adm / SD3.encode_adm read
it; KeyError without it); Chroma ignores its value (None is fine). Real Flux T5 context: >= 256 rows.

Patch size 2 for all three: image tokens = ceil(h/2) * ceil(w/2) of the latent. Block keys for
patches_replace["dit"]: Flux / Chroma ("double_block", i) for i < depth, ("single_block", i) for
i < depth_single_blocks; SD3 ("double_block", i) for every joint block.
"""
from __future__ import annotations

import json

import util

KINDS = ("flux", "chroma", "sd3")
LATENT_CHANNELS = {"flux": 16, "chroma": 16, "sd3": 16}
_MODELS = {}


def tiny_models():
    """tools/ipaf_runner/tiny_models.py (the state writers and the default configs)."""
    util.load_runner()
    import importlib
    return importlib.import_module("ipaf_runner.tiny_models")


def dit_config(kind: str, **overrides) -> dict:
    tm = tiny_models()
    return dict(tm.DIT_STATES[kind][1], **overrides)


def dit_state(kind: str, seed: int = 0, **overrides) -> dict:
    tm = tiny_models()
    make, _ = tm.DIT_STATES[kind]
    return make(dit_config(kind, **overrides), seed=seed)


def _check_all_loaded(diffusion_model, state: dict, kind: str) -> None:
    have = set(diffusion_model.state_dict().keys())
    given = set(state.keys())
    missing, unexpected = sorted(have - given), sorted(given - have)
    if missing or unexpected:
        raise AssertionError(f"tiny {kind}: the host model and the written state disagree: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")


def model_from_state(kind: str, state: dict, config: dict | None = None):
    """A host ModelPatcher (float32, CPU) for a tiny DiT state dict (keys without prefix).

    sd3: through comfy.sd.load_diffusion_model_state_dict. flux / chroma: `config` (TINY_*_CONFIG keys)
    gives what the host's detection would hard-code; see the module docstring."""
    host = util.prepare_host()
    torch = host.torch
    import comfy.model_detection
    import comfy.sd
    cpu = torch.device("cpu")
    if kind == "sd3":
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options={"dtype": torch.float32})
        if patcher is None:
            raise AssertionError("the host did not detect the tiny SD3 state")
        _check_all_loaded(patcher.model.diffusion_model, state, kind)
        return patcher
    cfg = {k: v for k, v in (config or dit_config(kind)).items()}
    cfg["image_model"] = kind
    model_config = comfy.model_detection.model_config_from_unet_config(cfg, state)
    if model_config is None or model_config.unet_config.get("image_model") != kind:
        raise AssertionError(f"the host picked no {kind} model config for {cfg}")
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state, "", device=cpu)
    _check_all_loaded(model.diffusion_model, state, kind)
    model.load_model_weights(dict(state), "")
    model.eval()
    return host.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def build_dit(kind: str, seed: int = 0, **overrides):
    """A fresh clone of the tiny `kind` model (built once per kind, seed and config)."""
    key = (kind, seed, json.dumps(overrides, sort_keys=True))
    if key not in _MODELS:
        cfg = dit_config(kind, **overrides)
        _MODELS[key] = model_from_state(kind, dit_state(kind, seed, **overrides), cfg)
    return _MODELS[key].clone()


def load_tiny_dit_file(path):
    """A ModelPatcher from a file written by tiny_models.write_tiny_dit (config read from its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[tiny_models().DIT_CONFIG_METADATA])
    kind = meta.pop("kind")
    return model_from_state(kind, load_file(str(path)), meta)


def diffusion_model(patcher):
    return patcher.get_model_object("diffusion_model")


def block_keys(patcher) -> list[tuple]:
    """The patches_replace["dit"] keys the host looks up, in forward order."""
    dm = diffusion_model(patcher)
    if hasattr(dm, "joint_blocks"):
        return [("double_block", i) for i in range(len(dm.joint_blocks))]
    return ([("double_block", i) for i in range(len(dm.double_blocks))]
            + [("single_block", i) for i in range(len(dm.single_blocks))])


# --------------------------------------------------------------------------------------------------
# Conditioning and sampling
# --------------------------------------------------------------------------------------------------
def make_dit_cond(kind: str, patcher=None, seed: int = 0, tokens: int = 8, batch: int = 1, guidance=None,
                  config: dict | None = None):
    """Random (deterministic) text conditioning in the host's format for the tiny `kind` model."""
    torch = util.prepare_host().torch
    cfg = config or dit_config(kind)
    if patcher is not None:
        cfg = dict(cfg, **_widths(patcher, kind))
    g = torch.Generator().manual_seed(seed)
    if kind == "sd3":
        ctx = torch.randn(batch, tokens, cfg["context_dim"], generator=g)
        return [[ctx, {"pooled_output": torch.randn(batch, cfg["adm_in_channels"], generator=g)}]]
    ctx = torch.randn(batch, tokens, cfg["context_in_dim"], generator=g)
    if kind == "flux":
        extra = {"pooled_output": torch.randn(batch, cfg["vec_in_dim"], generator=g)}
        if guidance is not None:
            extra["guidance"] = guidance
        return [[ctx, extra]]
    extra = {"pooled_output": None}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[ctx, extra]]


def _widths(patcher, kind):
    dm = diffusion_model(patcher)
    if kind == "sd3":
        return {"context_dim": dm.context_embedder.in_features, "adm_in_channels": dm.y_embedder.mlp[0].in_features}
    out = {"context_in_dim": dm.txt_in.in_features}
    if kind == "flux":
        out["vec_in_dim"] = dm.vector_in.in_layer.in_features
    return out


def dit_latent(kind: str, size: int = 8, batch: int = 1, width: int | None = None):
    torch = util.prepare_host().torch
    return torch.zeros(batch, LATENT_CHANNELS[kind], size, width or size)


def sample_dit(patcher, kind: str, *, seed: int = 0, steps: int = 3, cfg: float = 1.0, latent_size: int = 8,
               batch: int = 1, positive=None, negative=None, sampler_name: str = "euler",
               scheduler: str = "simple", tokens: int = 8):
    """Sample the tiny DiT with the host's comfy.sample.sample (KSampler's path); returns the latent.
    cfg 1.0 (Flux's usual) makes the host skip the negative entirely."""
    positive = positive or make_dit_cond(kind, patcher, seed=1, tokens=tokens, batch=batch)
    negative = negative or make_dit_cond(kind, patcher, seed=2, tokens=tokens, batch=batch)
    return util.sample(patcher, positive, negative, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                       scheduler=scheduler, latent=dit_latent(kind, latent_size, batch))
