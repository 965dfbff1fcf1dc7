"""Bad graph inputs to the apply node, inside the host: each a clear ValueError before any
sampling step runs, and the model left unpatched. The one input that must work although it
looks extreme (a 4096 x 4096 reference) is checked for its result and its memory."""
from __future__ import annotations

import pytest

CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


def _image(torch, n=1, h=64, w=64, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def setup(host, tiny_sd15, tiny_clip_vision, tmp_path):
    """(model, adapter, clip vision): the tiny SD1.5 UNet, a base adapter for it loaded by the
    pack's loader code, the tiny host CLIP vision at the real encoder size (224)."""
    import comfy.model_patcher

    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    model = tiny_sd15()
    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    path = tmp_path / "base.safetensors"
    save_synthetic_adapter(path, "base", [s.width for s in sites], sites[0].context_dim, CLIP["projection_dim"], seed=3)
    weights = load_adapter_file(path).eval()
    cpu = host.torch.device("cpu")
    adapter = LoadedAdapter(path.name, weights, comfy.model_patcher.ModelPatcher(weights, cpu, cpu))
    return model, adapter, tiny_clip_vision(**CLIP)


def _apply(model, adapter, cv, image, weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, **optional):
    from ipadapter_fused.nodes.ipadapter_nodes import IPAdapterFusedApply

    return IPAdapterFusedApply().apply(model, adapter, cv, image, weight, weight_type, start_at, end_at, "concat",
                                       "V only", "patch", **optional)[0]


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_mb(field):
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) / 1024


def _bad_cases(torch):
    one_mask_4d = torch.ones(1, 1, 64, 64)
    return [
        ("empty image batch", dict(image=_image(torch, n=0)), r"the image input holds no images \(a batch of 0\)"),
        ("1x1 image", dict(image=_image(torch, h=1, w=1)), "the image input is 1x1 pixels; a reference image needs at least 16"),
        ("1-pixel-high strip", dict(image=_image(torch, h=1, w=4096)), "is 4096x1 pixels"),
        ("empty negative batch", dict(image_negative=_image(torch, n=0)), "the image_negative input holds no images"),
        ("image without channels dim", dict(image=torch.rand(64, 64, 3)), r"must be an IMAGE batch of shape \(N, H, W, C\)"),
        ("2-channel image", dict(image=torch.rand(1, 64, 64, 2)), "has 2 channels per pixel"),
        ("NaN pixel", dict(image=_image(torch).index_fill_(1, torch.tensor([3]), float("nan"))), "NaN or infinite pixel"),
        ("4-d mask", dict(attn_mask=one_mask_4d), r"attn_mask must be a MASK of shape \(H, W\) or \(N, H, W\), got \(1, 1, 64, 64\)"),
        ("1-d mask", dict(attn_mask=torch.ones(64)), r"attn_mask must be a MASK .* got \(64,\)"),
        ("weight NaN", dict(weight=float("nan")), "weight is nan; it must be a finite number"),
        ("weight inf", dict(weight=float("inf")), "weight is inf; it must be a finite number"),
        ("weight_composition NaN", dict(weight_composition=float("nan")), "weight_composition is nan"),
        ("start_at NaN", dict(start_at=float("nan")), "start_at is nan"),
        ("layer_weights garbage", dict(weight_type="custom", layer_weights="input: strong"),
         r"layer_weights 'input: strong' is not understood: write 'index:factor' pairs"),
        ("layer_weights half pairs", dict(weight_type="custom", layer_weights="0:1.0, 0.5"), "is not understood"),
        ("layer_weights fractional index", dict(layer_weights="2.5:1"), "is not understood"),
        ("layer_weights NaN factor", dict(layer_weights="3:nan"), "holds a factor that is not a finite number"),
        ("layer_weights missing layer", dict(weight_type="custom", layer_weights="3:1.0, 16:1.0, 40:0.5"),
         r"names transformer indices \[16, 40\], but this model has 16 cross-attention transformers "
         r"\(valid indices 0\.\.15\)"),
        ("layer_weights too many factors", dict(layer_weights=", ".join(["1.0"] * 17)), r"indices \[16\]"),
        ("custom without layer_weights", dict(weight_type="custom"), "weight_type 'custom' needs layer_weights"),
    ]


def test_bad_inputs_fail_before_patching(host, setup):
    """Every case raises its message from the node, and the model it was given is untouched."""
    torch = host.torch
    model, adapter, cv = setup
    before = repr(model.model_options)
    for name, kw, words in _bad_cases(torch):
        kw = dict(kw)
        image = kw.pop("image", _image(torch))
        with pytest.raises(ValueError, match=words):
            _apply(model, adapter, cv, image, **kw)
        assert repr(model.model_options) == before, name


def test_mask_batch_is_checked_against_the_latent_batch_before_any_step(host, setup, sampler, cond):
    """The latent batch is known only when sampling starts: 3 masks for 2 latents fail there,
    before the first attention call; 1 mask or 2 masks for 2 latents sample."""
    torch = host.torch
    model, adapter, cv = setup
    pos, neg = cond("sd15", seed=1), cond("sd15", seed=2)
    mask3 = torch.zeros(3, 64, 64)
    mask3[:, :, :32] = 1
    patched = _apply(model, adapter, cv, _image(torch), attn_mask=mask3)
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    entry = next(iter(attn2.values())).entries[0]
    calls = []
    original = entry.layer_kv
    entry.layer_kv = lambda *a: (calls.append(a), original(*a))[1]
    with pytest.raises(ValueError, match=r"attn_mask holds 3 masks but the latent batch has 2 images; "
                                         r"connect 1 mask \(used for every image\) or 2 \(one per image\)"):
        sampler(patched, pos, neg, steps=1, latent_size=16, batch=2)
    assert calls == [], "no step may run"

    # the same three masks with a latent batch of 3 run; one per image means different rows differ
    out3 = sampler(patched, pos, neg, steps=1, latent_size=16, batch=3)
    assert calls and torch.isfinite(out3).all()
    # two masks for two latents: each latent reads its own mask (here: second mask empty = no image prompt)
    mask2 = torch.stack([mask3[0], torch.zeros(64, 64)])
    out2 = sampler(_apply(model, adapter, cv, _image(torch), attn_mask=mask2), pos, neg, steps=1, latent_size=16,
                   batch=2)
    base = sampler(model, pos, neg, steps=1, latent_size=16, batch=2)
    assert (out2[0] - base[0]).abs().max() > 1e-4, "the first latent's mask lets the image prompt act"
    torch.testing.assert_close(out2[1], base[1], rtol=0, atol=0)


def test_4096_reference_image_works_in_encoder_memory(host, setup):
    """A 4096 x 4096 reference gives exactly the tokens of the same picture resized to the
    encoder's 224 beforehand (independent torch resize), and encoding it allocates far less
    than one more copy of the image (192 MB)."""
    import torch.nn.functional as F

    from ipadapter_fused.nodes.encode import encode_images

    torch = host.torch
    model, adapter, cv = setup
    g = torch.Generator().manual_seed(5)
    # smooth content plus noise, so the resize has something to average
    coarse = torch.rand(1, 3, 16, 16, generator=g)
    big = F.interpolate(coarse, size=(4096, 4096), mode="bilinear").movedim(1, -1).contiguous()
    big += 0.05 * torch.rand(big.shape, generator=g)
    big.clamp_(0, 1)
    small = F.interpolate(big.movedim(-1, 1), size=(224, 224), mode="bicubic", antialias=True).movedim(1, -1)

    _reset_peak_rss()
    rss = _rss_mb("VmRSS")
    pos_big, _ = encode_images(cv, adapter.spec, big, None)
    grown = _rss_mb("VmHWM") - rss
    pos_small, _ = encode_images(cv, adapter.spec, small, None)
    torch.testing.assert_close(pos_big, pos_small, rtol=0, atol=0)
    assert grown < 96, f"encoding a 4096x4096 image raised the peak memory by {grown:.0f} MB"

    patched = _apply(model, adapter, cv, big)
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    tokens = next(iter(attn2.values())).entries[0].tokens
    torch.testing.assert_close(tokens[0, 0], adapter.weights.image_tokens(pos_small)[0], rtol=0, atol=0)


def test_extreme_strip_is_cut_before_the_host_resizes_it(host, setup):
    """A 16 x 16384 strip would become a 224 x 229376 image (600 MB) inside the host's resize;
    the pack cuts it to its centre first. The encoder sees the same centre square."""
    from ipadapter_fused.nodes.encode import encode_images

    torch = host.torch
    _, adapter, cv = setup
    strip = torch.rand(1, 16, 16384, 3, generator=torch.Generator().manual_seed(6))
    _reset_peak_rss()
    rss = _rss_mb("VmRSS")
    pos, _ = encode_images(cv, adapter.spec, strip, None)
    grown = _rss_mb("VmHWM") - rss
    assert grown < 96, f"encoding a 16x16384 strip raised the peak memory by {grown:.0f} MB"
    # the host's own encoding of a 16 x 256 centre (16 times the width: what the pack keeps)
    centre = strip[:, :, (16384 - 256) // 2:(16384 + 256) // 2]
    torch.testing.assert_close(pos, cv.encode_image(centre)["image_embeds"], rtol=0, atol=0)
