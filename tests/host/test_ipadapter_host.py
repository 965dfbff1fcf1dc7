"""The pack inside the real host: tiny UNets built by the host's own SD1.5 / SDXL configs,
the host's sampler, a tiny host CLIP vision model and synthetic adapters with the real
key layouts. Compared against (a) the decoupled cross-attention formula written out
independently, (b) ComfyUI_IPAdapter_plus itself for the compatibility mode."""
from __future__ import annotations

import pytest
import util

# 224-pixel input like the real encoders (the established pack always resizes to 224),
# with 56-pixel patches: 17 tokens of width 64, image_embeds of width 32.
CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


def _image(torch, seed=0, n=1, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def _adapter(host, model, layout, tmp_path, seed=0):
    """A synthetic adapter shaped for `model`, loaded through the pack's loader code."""
    import comfy.model_patcher

    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    ctx = sites[0].context_dim
    kw = {}
    if layout == "plus":
        # the dims ComfyUI_IPAdapter_plus hard-codes: 768 x 12 heads (SD1.5), 1280 x 20 (SDXL)
        kw = dict(resampler_dim=1280, resampler_heads=20) if ctx == 2048 else dict(resampler_dim=768, resampler_heads=12)
    width = CLIP["projection_dim"] if layout == "base" else CLIP["hidden_size"]
    tokens = 17 if layout == "full-face" else None
    path = tmp_path / f"{layout}_{ctx}_{seed}.safetensors"
    save_synthetic_adapter(path, layout, [s.width for s in sites], ctx, width, tokens=tokens, seed=seed, **kw)
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(weights, load_device=host.torch.device("cpu"),
                                               offload_device=host.torch.device("cpu"))
    return LoadedAdapter(name=path.name, weights=weights, patcher=patcher), path


def _apply(model, adapter, cv, image, **kw):
    from ipadapter_fused.nodes.apply import apply_adapter
    return apply_adapter(model, adapter, cv, image, **kw)


def _run(sampler, cond, kind, model, **kw):
    return sampler(model, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16, **kw)


class FormulaAttn2:
    """The original IP-Adapter formulation for one layer, written out with the adapter's raw
    checkpoint tensors: Attn(q, K, V) + w * Attn(q, t W_k^T, t W_v^T), t = the image tokens of
    the row's chunk (positive for cond rows, negative for uncond rows). Attn is the host's own
    attention function, so the comparison is not blurred by two softmax implementations."""

    def __init__(self, state, n, tokens, weight):
        self.wk = state[f"ip_adapter.{n}.to_k_ip.weight"]
        self.wv = state[f"ip_adapter.{n}.to_v_ip.weight"]
        self.tokens, self.weight = tokens, weight

    def __call__(self, q, k, v, extra):
        import comfy.ldm.modules.attention as host_attention
        import torch

        heads = extra["n_heads"]

        def attn(q_, k_, v_):
            return host_attention.optimized_attention(q_, k_, v_, heads)

        out = attn(q, k, v)
        chunks = extra["cond_or_uncond"]
        per = q.shape[0] // len(chunks)
        rows = []
        for b in range(q.shape[0]):
            t = self.tokens[1 if chunks[b // per] == 1 else 0].reshape(1, -1, self.wk.shape[1])
            rows.append(attn(q[b:b + 1], t @ self.wk.T, t @ self.wv.T))
        return out + self.weight * torch.cat(rows)


@pytest.mark.parametrize("kind,layout", [("sd15", "base"), ("sd15", "plus"), ("sdxl", "base"), ("sdxl", "full-face")])
def test_matches_formula_on_every_layer(host, kind, layout, tiny_sd15, tiny_sdxl, tiny_clip_vision, sampler, cond,
                                        tmp_path):
    import safetensors.torch

    from ipadapter_fused.nodes.encode import encode_images, image_tokens
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    cv = tiny_clip_vision(**CLIP)
    adapter, path = _adapter(host, model, layout, tmp_path)
    image = _image(torch)
    weight = 0.8

    patched = _apply(model, adapter, cv, image, weight=weight, middle_block="patch")
    got = _run(sampler, cond, kind, patched)

    state = safetensors.torch.load_file(str(path))
    pos, neg = encode_images(cv, adapter.spec, image, None)
    tokens = image_tokens(adapter.weights, pos, neg, "concat")
    if layout == "base":  # the projection written out too: LayerNorm(proj(e)) per token
        C = adapter.spec.context_dim
        proj = lambda e: torch.nn.functional.layer_norm(
            torch.nn.functional.linear(e, state["image_proj.proj.weight"], state["image_proj.proj.bias"]).reshape(-1, 4, C),
            (C,), state["image_proj.norm.weight"], state["image_proj.norm.bias"])
        torch.testing.assert_close(tokens, torch.stack([proj(pos), proj(neg)]), atol=1e-5, rtol=1e-5)
    reference = model.clone()
    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    for i, site in enumerate(sites):
        reference.set_model_attn2_replace(FormulaAttn2(state, 2 * i + 1, tokens, weight), *site.key)
    want = _run(sampler, cond, kind, reference)
    plain = _run(sampler, cond, kind, model)
    assert (want - plain).abs().max() > 0.1 * want.abs().max(), "the adapter must change the result"
    # Each layer in one real forward: the same q/k/v through the pack's patch and the formula.
    # fp32 on CPU; the terms are summed in the same order, only the batching of the image term differs.
    keys = [s.key for s in sites]
    log = util.compare_layers(patched, reference, kind, keys)
    assert sorted({k for k, _, _ in log}) == sorted(keys), "every site is patched and called"
    util.assert_layers_match(log)
    # The sampled latent, at the bound the measured rounding amplification justifies (util.LATENT_BOUND).
    util.assert_latents_match(got, want)


CASES = [
    ("sd15", "base", dict(weight=0.9)),
    ("sd15", "plus", dict(weight=1.2, weight_type="ease in", embeds_scaling="K+mean(V) w/ C penalty",
                          start_at=0.0, end_at=0.6)),
    ("sd15", "base", dict(weight=0.7, weight_type="style transfer precise", embeds_scaling="K+V")),
    ("sdxl", "base", dict(weight=1.0, weight_type="weak middle")),
    ("sdxl", "plus", dict(weight=0.8, weight_type="composition precise", embeds_scaling="K+V w/ C penalty")),
    ("sdxl", "base", dict(weight=0.6, weight_type="strong style transfer", n_images=2, combine_embeds="concat")),
    ("sd15", "plus", dict(weight=0.5, weight_type="reverse in-out", n_images=3, combine_embeds="norm average",
                          negative=True)),
    ("sd15", "base", dict(weight=1.0, mask=True)),
]


@pytest.mark.parametrize("kind,layout,opts", CASES)
def test_compat_mode_reproduces_ipadapter_plus(host, ipadapter_plus, kind, layout, opts, tiny_sd15, tiny_sdxl,
                                               tiny_clip_vision, sampler, cond, tmp_path):
    from ipadapter_fused.models import load_adapter_state

    torch = host.torch
    opts = dict(opts)
    n_images = opts.pop("n_images", 1)
    negative = _image(torch, seed=9) if opts.pop("negative", False) else None
    mask = None
    if opts.pop("mask", False):
        mask = torch.zeros(1, 128, 128)
        mask[:, 20:90, 10:70] = 1.0
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    cv = tiny_clip_vision(**CLIP)
    adapter, path = _adapter(host, model, layout, tmp_path)
    image = _image(torch, n=n_images)

    ours = _apply(model, adapter, cv, image, middle_block="skip (IPAdapter_plus compatible)",
                  image_negative=negative, attn_mask=mask, **opts)
    theirs, _ = ipadapter_plus.IPAdapterPlus.ipadapter_execute(
        model.clone(), load_adapter_state(path), cv, image=image, image_negative=negative, attn_mask=mask, **opts)
    a = _run(sampler, cond, kind, ours)
    b = _run(sampler, cond, kind, theirs)
    assert (a - _run(sampler, cond, kind, model)).abs().max() > 1e-3 * a.abs().max()
    # Layer by layer in one forward (each site's patch as the host would pick it in either model),
    # then the sampled latents at the measured bound.
    util.assert_layers_match(util.compare_layers(ours, theirs, kind, util.attn2_sites(model)))
    util.assert_latents_match(a, b)


def test_middle_block_is_patched_unlike_ipadapter_plus(host, tiny_sd15, tiny_clip_vision, sampler, cond, tmp_path):
    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, _ = _adapter(host, model, "base", tmp_path)
    image = _image(torch)
    full = _run(sampler, cond, "sd15", _apply(model, adapter, cv, image))
    compat = _run(sampler, cond, "sd15", _apply(model, adapter, cv, image, middle_block="skip (IPAdapter_plus compatible)"))
    weak_mid = _run(sampler, cond, "sd15", _apply(model, adapter, cv, image, weight_type="weak middle"))
    assert (full - compat).abs().max() > 1e-5
    assert (full - weak_mid).abs().max() > 1e-5


def test_clone_isolation_and_repeatability(host, tiny_sdxl, tiny_clip_vision, sampler, cond, tmp_path):
    torch = host.torch
    model = tiny_sdxl()
    cv = tiny_clip_vision(**CLIP)
    adapter, _ = _adapter(host, model, "plus", tmp_path)
    before = _run(sampler, cond, "sdxl", model)
    patched = _apply(model, adapter, cv, _image(torch))
    branch = model.clone()
    first = _run(sampler, cond, "sdxl", patched)
    second = _run(sampler, cond, "sdxl", patched)
    assert torch.equal(first, second), "running twice must give identical results"
    assert torch.equal(_run(sampler, cond, "sdxl", model), before), "the input model must be untouched"
    assert torch.equal(_run(sampler, cond, "sdxl", branch), before), "a branch without the adapter is untouched"
    assert (first - before).abs().max() > 1e-4
    assert adapter.patcher in patched.get_additional_models_with_key("ipadapter_fused")
    assert patched.clone().model_options["transformer_options"]["patches_replace"]["attn2"] is not \
        patched.model_options["transformer_options"]["patches_replace"]["attn2"]


def test_stacking_order_does_not_matter(host, tiny_sd15, tiny_clip_vision, sampler, cond, tmp_path):
    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    a, _ = _adapter(host, model, "base", tmp_path, seed=1)
    b, _ = _adapter(host, model, "plus", tmp_path, seed=2)
    img1, img2 = _image(torch, 1), _image(torch, 2)
    ab = _apply(_apply(model, a, cv, img1, weight=0.7), b, cv, img2, weight=0.4, weight_type="ease out")
    ba = _apply(_apply(model, b, cv, img2, weight=0.4, weight_type="ease out"), a, cv, img1, weight=0.7)
    # content-ordered sums: bit-identical whatever the build
    assert torch.equal(_run(sampler, cond, "sd15", ab), _run(sampler, cond, "sd15", ba))


def test_bad_inputs_fail_before_patching(host, tiny_sd15, tiny_sdxl, tiny_clip_vision, tmp_path):
    torch = host.torch
    sd15, sdxl = tiny_sd15(), tiny_sdxl()
    cv = tiny_clip_vision(**CLIP)
    sdxl_adapter, _ = _adapter(host, sdxl, "base", tmp_path)
    sd15_adapter, _ = _adapter(host, sd15, "base", tmp_path)
    options = repr(sd15.model_options)

    with pytest.raises(ValueError, match=r"made for SDXL.*SD1\.5 model"):
        _apply(sd15, sdxl_adapter, cv, _image(torch))
    with pytest.raises(ValueError, match="holds no images"):
        _apply(sd15, sd15_adapter, cv, _image(torch)[:0])
    wrong_cv = tiny_clip_vision(image_size=224, patch_size=56, hidden_size=64, projection_dim=48)
    with pytest.raises(ValueError, match="width 32.*gives width 48"):
        _apply(sd15, sd15_adapter, wrong_cv, _image(torch))
    nan_image = _image(torch)
    nan_image[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _apply(sd15, sd15_adapter, cv, nan_image)
    with pytest.raises(ValueError, match="start_at"):
        _apply(sd15, sd15_adapter, cv, _image(torch), start_at=0.8, end_at=0.2)
    assert repr(sd15.model_options) == options, "a failed apply must leave the model as it was"
    assert "patches_replace" not in sd15.model_options.get("transformer_options", {})


def test_fused_backend_in_the_host(host, tiny_sd15, tiny_clip_vision, sampler, cond, tmp_path, monkeypatch):
    """The whole UNet through the fused kernel (Triton interpreter on CPU) against the torch
    path: same patch, same adapters, only the backend differs."""
    import os

    from ipadapter_fused.attention import dispatch

    if not dispatch.triton_available():
        pytest.skip("triton is not installed in the host's Python")
    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    a, _ = _adapter(host, model, "base", tmp_path, seed=1)
    b, _ = _adapter(host, model, "plus", tmp_path, seed=2)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :40] = 1.0
    patched = _apply(_apply(model, a, cv, _image(torch, 1), weight=0.7, attn_mask=mask), b, cv, _image(torch, 2),
                     weight=0.5, embeds_scaling="K+V")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    want = _run(sampler, cond, "sd15", patched)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    got = _run(sampler, cond, "sd15", patched)
    # fp32; the kernel's online softmax and the host's sub-quadratic attention round differently,
    # and two sampling steps with CFG amplify that
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert (got - _run(sampler, cond, "sd15", model)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_foreign_patch_on_the_same_keys_keeps_working(host, ipadapter_plus, kind, tiny_sd15, tiny_sdxl,
                                                      tiny_clip_vision, sampler, cond, tmp_path):
    """ComfyUI_IPAdapter_plus patches first (SD1.5: on 2-element keys), ours second: its image
    prompt must still act, exactly as if it had stacked both adapters itself."""
    from ipadapter_fused.models import load_adapter_state

    torch = host.torch
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    cv = tiny_clip_vision(**CLIP)
    a, path_a = _adapter(host, model, "base", tmp_path, seed=1)
    b, path_b = _adapter(host, model, "base", tmp_path, seed=2)
    img_a, img_b = _image(torch, 1), _image(torch, 2)
    execute = ipadapter_plus.IPAdapterPlus.ipadapter_execute
    theirs_a, _ = execute(model.clone(), load_adapter_state(path_a), cv, image=img_a, weight=0.8)
    mixed = _apply(theirs_a, b, cv, img_b, weight=0.6, middle_block="skip (IPAdapter_plus compatible)")
    both_theirs, _ = execute(theirs_a, load_adapter_state(path_b), cv, image=img_b, weight=0.6)
    got = _run(sampler, cond, kind, mixed)
    util.assert_layers_match(util.compare_layers(mixed, both_theirs, kind, util.attn2_sites(model)))
    util.assert_latents_match(got, _run(sampler, cond, kind, both_theirs))
    assert (got - _run(sampler, cond, kind, _apply(model, b, cv, img_b, weight=0.6,
                                                   middle_block="skip (IPAdapter_plus compatible)"))).abs().max() > 1e-4


def test_run_cache_is_released_after_sampling(host, tiny_sd15, tiny_clip_vision, sampler, cond, tmp_path):
    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, _ = _adapter(host, model, "base", tmp_path)
    patched = _apply(model, adapter, cv, _image(torch))
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    entry = next(iter(attn2.values())).entries[0]
    seen = []
    orig = entry.layer_kv
    entry.layer_kv = lambda *a: (seen.append(a[0]), orig(*a))[1]
    _run(sampler, cond, "sd15", patched)
    assert sorted(set(seen)) == list(range(16)) and len(seen) == 16, "K/V once per layer per run"
    assert not entry._cache, "K/V, masks and packs are dropped when sampling ends"
