"""Kolors IP-Adapter-Plus on a Kolors-shaped UNet in the real host.

ComfyUI 0.3.64 has no Kolors model of its own; the Kolors loaders (ComfyUI-Kolors-MZ) give an SDXL-shaped
UNet that also carries `encoder_hid_proj` (ChatGLM's 4096-wide text -> the 2048-wide context). The tiny
SDXL UNet with such a projection attached stands in for it here. Kolors' Plus adapter reads CLIP ViT-L/14
at 336 px, so the tiny encoder here also runs at 336."""
from __future__ import annotations

import pytest
import util

CLIP_336 = dict(image_size=336, patch_size=56, hidden_size=64, projection_dim=32)


@pytest.fixture
def kolors_unet(host, tiny_sdxl):
    torch = host.torch
    model = tiny_sdxl()
    unet = model.get_model_object("diffusion_model")
    unet.encoder_hid_proj = torch.nn.Linear(4096, 2048)  # on the shared tiny UNet for this test only
    try:
        yield model
    finally:
        del unet.encoder_hid_proj
        host.mm.unload_all_models()


def _kolors_plus(host, model, tmp_path, kolors=True):
    import comfy.model_patcher

    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    # Kolors' resampler is 2048 wide (SDXL Plus: 1280), 16 tokens; one layer, 2 heads keep it small
    width = 2048 if kolors else 1280
    path = tmp_path / f"kolors_plus_{width}.safetensors"
    save_synthetic_adapter(path, "plus", [s.width for s in sites], 2048, CLIP_336["hidden_size"], tokens=16,
                           resampler_dim=width, resampler_heads=2, depth=1, seed=3)
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(weights, load_device=host.torch.device("cpu"),
                                               offload_device=host.torch.device("cpu"))
    return LoadedAdapter(name=path.name, weights=weights, patcher=patcher), path


def test_kolors_plus_matches_formula_on_every_layer(host, kolors_unet, tiny_clip_vision, sampler, cond, tmp_path):
    import safetensors.torch
    from test_ipadapter_host import FormulaAttn2

    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = kolors_unet
    adapter, path = _kolors_plus(host, model, tmp_path)
    assert adapter.spec.resampler_dim == 2048 and adapter.spec.tokens == 16
    cv = tiny_clip_vision(**CLIP_336)
    image = torch.rand(1, 400, 300, 3, generator=torch.Generator().manual_seed(4))
    patched = apply_adapter(model, adapter, cv, image, weight=0.9)
    got = sampler(patched, cond("sdxl", seed=1), cond("sdxl", seed=2), steps=2, latent_size=16)

    # the encoder at its own 336 px (the host's preprocessing), a black 336 px image as the negative
    pos = cv.encode_image(image)["penultimate_hidden_states"]
    neg = cv.encode_image(torch.zeros(1, 336, 336, 3))["penultimate_hidden_states"]
    assert pos.shape[1] == (336 // 56) ** 2 + 1
    with torch.no_grad():
        tokens = torch.stack([adapter.weights.image_tokens(pos), adapter.weights.image_tokens(neg)])
    state = safetensors.torch.load_file(str(path))
    reference = model.clone()
    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    for i, site in enumerate(sites):
        reference.set_model_attn2_replace(FormulaAttn2(state, 2 * i + 1, tokens, 0.9), *site.key)
    want = sampler(reference, cond("sdxl", seed=1), cond("sdxl", seed=2), steps=2, latent_size=16)
    keys = [s.key for s in sites]
    util.assert_layers_match(util.compare_layers(patched, reference, "sdxl", keys))
    util.assert_latents_match(got, want)


def test_kolors_and_sdxl_adapters_stay_apart(host, kolors_unet, tiny_sdxl, tiny_clip_vision, tmp_path):
    from ipadapter_fused.nodes.apply import apply_adapter

    torch = host.torch
    cv = tiny_clip_vision(**CLIP_336)
    image = torch.rand(1, 64, 64, 3)
    sdxl_plus, _ = _kolors_plus(host, kolors_unet, tmp_path, kolors=False)
    with pytest.raises(ValueError, match="Kolors UNet"):
        apply_adapter(kolors_unet, sdxl_plus, cv, image)
    kolors_plus, _ = _kolors_plus(host, kolors_unet, tmp_path)
    del kolors_unet.get_model_object("diffusion_model").encoder_hid_proj
    try:
        with pytest.raises(ValueError, match="made for Kolors"):
            apply_adapter(tiny_sdxl(), kolors_plus, cv, image)
    finally:
        kolors_unet.get_model_object("diffusion_model").encoder_hid_proj = torch.nn.Linear(4096, 2048)
