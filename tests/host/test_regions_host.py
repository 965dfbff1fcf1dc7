"""Region masks and the region node in the real host.

Outside a hard mask the adapter has no effect: in every cross-attention layer of a real forward the
rows outside the mask are bit-identical to the unpatched layer's. (The sampled latent outside the
region still moves, because the UNet's own convolutions and self-attention carry the inside to the
outside; that is the model, not the adapter, and the test measures it rather than pretending it away.)"""
from __future__ import annotations

import pytest

import util

CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


def _adapter(host, model, tmp_path):
    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    path = tmp_path / "base.safetensors"
    save_synthetic_adapter(path, "base", [s.width for s in sites], sites[0].context_dim, CLIP["projection_dim"])
    weights = load_adapter_file(path).eval().requires_grad_(False)
    cpu = host.torch.device("cpu")
    return LoadedAdapter(path.name, weights, host.model_patcher.ModelPatcher(weights, load_device=cpu,
                                                                             offload_device=cpu))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_rows_outside_a_hard_mask_equal_the_unpatched_layer(host, kind, tiny_sd15, tiny_sdxl, tiny_clip_vision,
                                                            tmp_path):
    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    adapter = _adapter(host, model, tmp_path)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half; on every token grid of a 16x16 latent the right half is exactly 0
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    patched = apply_adapter(model, adapter, tiny_clip_vision(**CLIP), image, weight=1.0, attn_mask=mask)
    sites = [s.key for s in unet_attn2_sites(model.get_model_object("diffusion_model"))]

    unpatched = util.plain_attn2
    probe = patched.clone()
    log = []

    class Both:
        def __init__(self, key):
            self.key = key

        def __deepcopy__(self, memo):
            return self

        def __call__(self, q, k, v, extra):
            ours = util.host_attn2_patch(patched, self.key)(q, k, v, extra)
            log.append((self.key, extra["original_shape"], ours, unpatched(q, k, v, extra)))
            return ours

    for key in sites:
        probe.set_model_attn2_replace(Both(key), *key)
    util.sample(probe, util.make_cond(kind, seed=1), util.make_cond(kind, seed=2), steps=1, latent_size=16)
    assert {k for k, *_ in log} == set(sites)
    for key, shape, ours, plain in log:
        side = int(round(ours.shape[1] ** 0.5))
        grid = torch.arange(ours.shape[1]).reshape(side, side)
        outside, inside = grid[:, side // 2:].reshape(-1), grid[:, :side // 2].reshape(-1)
        assert torch.equal(ours[:, outside], plain[:, outside]), f"{key}: rows outside the mask changed"
        assert not torch.equal(ours[:, inside], plain[:, inside]), f"{key}: the term is missing inside the mask"


def test_region_node_adds_the_masked_text_and_the_masked_image_prompt(host, tiny_sd15, tiny_clip_vision, tmp_path):
    from ipadapter_fused.nodes.patch import Attn2Patch
    from ipadapter_fused.nodes.region_nodes import IPAdapterFusedRegion

    torch = host.torch
    model = tiny_sd15()
    adapter = _adapter(host, model, tmp_path)
    cv = tiny_clip_vision(**CLIP)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    base, neg = util.make_cond("sd15", seed=1), util.make_cond("sd15", seed=2)
    left, right = torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)
    left[:, :, :16], right[:, :, 16:] = 1.0, 1.0
    node = IPAdapterFusedRegion()
    m1, pos1, neg1 = node.apply(model, adapter, cv, image, left, base, neg, 0.8, "linear", 0.0, 1.0,
                                region_prompt=util.make_cond("sd15", seed=3), region_prompt_strength=0.7)
    m2, pos2, neg2 = node.apply(m1, adapter, cv, image, right, pos1, neg1, 0.5, "linear", 0.0, 1.0)
    assert neg2 is neg
    assert len(pos2) == 2 and pos2[0] is base[0]  # base prompt kept unmasked; no text for region 2
    region = pos2[1][1]
    assert torch.equal(region["mask"], left) and region["mask_strength"] == 0.7 and not region["set_area_to_bounds"]
    patches = m2.model_options["transformer_options"]["patches_replace"]["attn2"]
    entries = {len(p.entries) for p in patches.values() if isinstance(p, Attn2Patch)}
    assert entries == {2}, "both regions' image prompts share each layer's patch"
    masks = [e.mask for e in next(iter(patches.values())).entries]
    assert sorted(float(m[..., :16].sum()) for m in masks) == [0.0, 16 * 32], "one entry per region, each masked"
    # the chained model samples (region texts go through the host's own masked conditioning)
    out = util.sample(m2, pos2, neg2, steps=2, latent_size=16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["concat", "average", "norm average", "subtract"])
def test_per_image_weights_reach_the_tokens(host, tiny_sd15, tiny_clip_vision, tmp_path, method):
    """image_weights: the tokens equal the adapter's projection of the weighted combination written out."""
    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.encode import encode_images
    from ipadapter_fused.nodes.patch import Attn2Patch

    torch = host.torch
    model = tiny_sd15()
    adapter = _adapter(host, model, tmp_path)
    cv = tiny_clip_vision(**CLIP)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    w = [1.0, 0.5, 2.0]
    patched = apply_adapter(model, adapter, cv, images, combine_embeds=method, image_weights="1.0, 0.5, 2.0")
    patch = next(p for p in patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()
                 if isinstance(p, Attn2Patch))
    tokens = patch.entries[0].tokens
    pos, _ = encode_images(cv, adapter.spec, images, None)
    x = pos.float()
    wt = torch.tensor(w)[:, None]
    if method == "concat":
        want = wt * x
    elif method == "average":
        want = ((wt * x).sum(0) / wt.sum())[None]
    elif method == "norm average":
        want = ((wt * x / x.norm(dim=0, keepdim=True)).sum(0) / wt.sum())[None]
    else:
        want = (w[0] * x[0] - (wt[1:] * x[1:]).sum(0) / wt[1:].sum())[None]
    torch.testing.assert_close(tokens[0], adapter.weights.image_tokens(want), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image_weights lists 2 factor.*3 reference image"):
        apply_adapter(model, adapter, cv, images, image_weights="1, 2")
