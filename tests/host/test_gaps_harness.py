"""A per-layer probe for host tests, and the tests that show it sees what the host computes.

Comparing sampled latents of random-weight tiny UNets amplifies rounding (issue 6: 1e-3 from
1e-7 differences after two CFG steps), so the gap and property tests compare each attn2
layer's output instead: the host's own `attn2_patch` and `attn2_output_patch` hooks record,
at every cross-attention call of a real sampling run, the layer's inputs (normed hidden
states and context) and its output after `to_out`. A reference is then evaluated on exactly
those inputs, so a small difference in one layer cannot grow through the next ones.

The hooks only observe (they return their inputs unchanged), and they sit on different host
hooks than the replacement patches under test, which keep their keys and lookups."""
from __future__ import annotations

import dataclasses

import pytest

# 224-pixel input like the real encoders, 56-pixel patches: 17 tokens of width 64,
# image_embeds of width 32 (the sizes the other host tests use).
CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


def image(torch, seed=0, n=1, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def make_adapter(host, model, layout, tmp_path, seed=0, layer_dims=None):
    """A synthetic adapter for `model` loaded through the pack's loader; returns
    (LoadedAdapter, checkpoint state dict, file path)."""
    import comfy.model_patcher
    import safetensors.torch

    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    ctx = sites[0].context_dim
    kw = {}
    if layout == "plus":  # the resampler sizes ComfyUI_IPAdapter_plus hard-codes
        kw = dict(resampler_dim=1280, resampler_heads=20) if ctx == 2048 else dict(resampler_dim=768, resampler_heads=12)
    width = CLIP["projection_dim"] if layout == "base" else CLIP["hidden_size"]
    tokens = 17 if layout == "full-face" else None
    dims = layer_dims or [s.width for s in sites]
    path = tmp_path / f"{layout}_{ctx}_{seed}_{dims[0]}.safetensors"
    save_synthetic_adapter(path, layout, dims, ctx, width, tokens=tokens, seed=seed, **kw)
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(weights, load_device=host.torch.device("cpu"),
                                               offload_device=host.torch.device("cpu"))
    return LoadedAdapter(name=path.name, weights=weights, patcher=patcher), safetensors.torch.load_file(str(path)), path


def apply(model, adapter, cv, img, **kw):
    from ipadapter_fused.nodes.apply import apply_adapter
    return apply_adapter(model, adapter, cv, img, **kw)


def attn2_modules(model) -> dict:
    """{(block_name, block_id, block_index): the CrossAttention module} of the UNet."""
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    unet = model.get_model_object("diffusion_model")
    groups = {"input": list(unet.input_blocks), "middle": [unet.middle_block], "output": list(unet.output_blocks)}
    out = {}
    for site in unet_attn2_sites(unet):
        name, block_id, index = site.key
        block = groups[name][block_id]
        st = next(m for m in block.modules() if hasattr(m, "transformer_blocks"))
        out[site.key] = st.transformer_blocks[index].attn2
    return out


@dataclasses.dataclass
class Call:
    key: tuple
    x: object        # normed hidden states entering attn2, (B, L, width)
    context: object  # the context attn2 reads, (B, T, C)
    extra: dict      # extra_options of the call (light copy)
    out: object      # attn2's output after to_out


class LayerProbe:
    """Records every attn2 call of the runs of the model returned by `attach`."""

    def __init__(self):
        self.calls: list[Call] = []
        self._pending = None

    def attach(self, model):
        m = model.clone()
        m.set_model_attn2_patch(self._before)
        m.set_model_attn2_output_patch(self._after)
        return m

    def _before(self, n, context, value, extra):
        self._pending = (n.clone(), context.clone(), dict(extra))
        return n, context, value

    def _after(self, out, extra):
        n, context, before = self._pending
        key = (before["block"][0], before["block"][1], before["block_index"])
        self.calls.append(Call(key, n, context, before, out.clone()))
        self._pending = None
        return out

    def sigmas(self) -> list[float]:
        """The distinct sigmas the run evaluated, in order."""
        seen = []
        for c in self.calls:
            s = float(c.extra["sigmas"].reshape(-1)[0])
            if not seen or seen[-1] != s:
                seen.append(s)
        return seen


def check_layers(torch, model, calls, reference, atol=2e-6, rtol=2e-5, min_calls=1):
    """For every recorded call: the layer's recorded output against
    to_out(reference(key, q, k, v, extra)) on the same inputs (q, k, v projected by the layer).
    Returns the largest absolute difference."""
    modules = attn2_modules(model)
    assert len(calls) >= min_calls, f"only {len(calls)} attn2 calls were recorded"
    worst = 0.0
    with torch.inference_mode():
        for i, c in enumerate(calls):
            attn2 = modules[c.key]
            q, k, v = attn2.to_q(c.x), attn2.to_k(c.context), attn2.to_v(c.context)
            want = attn2.to_out(reference(c.key, q, k, v, c.extra))
            diff = (c.out - want).abs().max().item()
            worst = max(worst, diff)
            torch.testing.assert_close(c.out, want, atol=atol, rtol=rtol,
                                       msg=lambda m: f"call {i} at {c.key}, sigma {float(c.extra['sigmas'][0]):.4g}: {m}")
    return worst


def host_attention(q, k, v, heads):
    import comfy.ldm.modules.attention as host_attention_module
    return host_attention_module.optimized_attention(q, k, v, heads)


def image_term(state, n, tokens, q, extra):
    """The written-out image term of adapter layer `n` (checkpoint index): for every row, the host's
    attention of q over t W_k^T, t W_v^T with t the row chunk's tokens (negative for uncond rows)."""
    import torch

    wk, wv = state[f"ip_adapter.{n}.to_k_ip.weight"], state[f"ip_adapter.{n}.to_v_ip.weight"]
    per = q.shape[0] // len(extra["cond_or_uncond"])
    rows = []
    for b in range(q.shape[0]):
        t = tokens[1 if extra["cond_or_uncond"][b // per] == 1 else 0].reshape(1, -1, wk.shape[1])
        rows.append(host_attention(q[b:b + 1], t @ wk.T, t @ wv.T, extra["n_heads"]))
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------------
# The probe itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_probe_sees_every_layer_of_an_unpatched_model(host, kind, tiny_sd15, tiny_sdxl, sampler, cond):
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    probe = LayerProbe()
    sampler(probe.attach(model), cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)
    keys = [s.key for s in unet_attn2_sites(model.get_model_object("diffusion_model"))]
    assert sorted({c.key for c in probe.calls}) == sorted(keys)
    assert len(probe.calls) == 2 * len(keys) and len(probe.sigmas()) == 2
    check_layers(host.torch, model, probe.calls, lambda key, q, k, v, extra: host_attention(q, k, v, extra["n_heads"]),
                 atol=0, rtol=0)


def test_probe_notices_a_wrong_layer(host, tiny_sd15, sampler, cond):
    """A replacement that is off by a small amount on one layer is caught at that layer."""
    model = tiny_sd15()
    target = ("output", 4, 0)

    def off(q, k, v, extra):
        return host_attention(q, k, v, extra["n_heads"]) * (1 + 1e-4)

    patched = model.clone()
    patched.set_model_attn2_replace(off, *target)
    probe = LayerProbe()
    sampler(probe.attach(patched), cond("sd15", seed=1), cond("sd15", seed=2), steps=1, latent_size=16)
    with pytest.raises(AssertionError, match=r"output', 4, 0"):
        check_layers(host.torch, model, probe.calls, lambda key, q, k, v, extra: host_attention(q, k, v, extra["n_heads"]))
