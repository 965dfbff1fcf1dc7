"""Masks on the token grid at extreme aspect ratios (issue 6, review gap).

The grid of each UNet level is computed independently here by running the host's own
Downsample layer (stride-2 convolution, padding 1) on a latent-sized tensor, and the pack's
mapping must land on exactly that grid. Before the fix the grid was estimated from the
aspect ratio: a 3 x 4096 latent's second level (2 x 2048) was taken for 1 x 4096, and at the
fourth level the estimate rounded the height to 0 and divided by zero."""
import pytest

from test_gaps_harness import CLIP, LayerProbe, apply, check_layers, host_attention, image, make_adapter

SHAPES = [(64, 4096), (4096, 64), (3, 4096), (5, 4097), (1, 1000), (4, 96), (17, 9), (7, 3), (128, 128), (96, 160)]


def host_grids(host, h, w, levels=4):
    """The (h, w) of every UNet level, from the host's Downsample applied level after level."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    torch = host.torch
    down = Downsample(1, use_conv=True, dims=2)
    x = torch.zeros(1, 1, h, w)
    grids = []
    with torch.inference_mode():
        for _ in range(levels):
            grids.append(tuple(x.shape[2:]))
            x = down(x)
    return grids


@pytest.mark.parametrize("h,w", SHAPES)
def test_token_grid_is_the_hosts_downsampled_grid(host, h, w):
    import torch.nn.functional as F

    from ipadapter_fused.attention.masks import mask_to_tokens, token_grid

    torch = host.torch
    g = torch.Generator().manual_seed(h * 10007 + w)
    mask = torch.rand(2, 8 * h, 8 * w, generator=g) if h * w < 2 ** 16 else torch.rand(2, h, w, generator=g)
    for gh, gw in host_grids(host, h, w):
        assert token_grid(h, w, gh * gw) == (gh, gw), f"latent {h}x{w}: grid {gh}x{gw}"
        want = F.interpolate(mask[:, None], size=(gh, gw), mode="bilinear").reshape(2, -1)
        torch.testing.assert_close(mask_to_tokens(mask, h, w, gh * gw), want, atol=0, rtol=0)


def test_masked_adapter_on_a_strip_latent_matches_the_formula(host, tiny_sd15, tiny_clip_vision, sampler, cond,
                                                            tmp_path):
    """A 4 x 96 latent in the real UNet (levels 4x96, 2x48, 1x24 and the middle block's 1x12), a mask that keeps the
    left third: every layer's output equals the formula with the mask resized to the grid the
    host's Downsample gives."""
    import torch.nn.functional as F

    from ipadapter_fused.nodes.encode import encode_images, image_tokens
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, state, _ = make_adapter(host, model, "base", tmp_path)
    img = image(torch)
    mask = torch.zeros(1, 32, 768)
    mask[:, :, :256] = 1.0
    patched = apply(model, adapter, cv, img, weight=0.9, attn_mask=mask)
    probe = LayerProbe()
    sampler(probe.attach(patched), cond("sd15", seed=1), cond("sd15", seed=2), steps=1,
            latent=torch.zeros(1, 4, 4, 96))

    pos, neg = encode_images(cv, adapter.spec, img, None)
    tokens = image_tokens(adapter.weights, pos, neg, "concat")
    layer = {s.key: i for i, s in enumerate(unet_attn2_sites(model.get_model_object("diffusion_model")))}
    grids = {gh * gw: (gh, gw) for gh, gw in host_grids(host, 4, 96)}
    seen = set()

    def reference(key, q, k, v, extra):
        n, heads = 2 * layer[key] + 1, extra["n_heads"]
        wk, wv = state[f"ip_adapter.{n}.to_k_ip.weight"], state[f"ip_adapter.{n}.to_v_ip.weight"]
        gh, gw = grids[q.shape[1]]
        seen.add((gh, gw))
        m = F.interpolate(mask[:, None], size=(gh, gw), mode="bilinear").reshape(1, -1, 1)
        per = q.shape[0] // len(extra["cond_or_uncond"])
        rows = []
        for b in range(q.shape[0]):
            t = tokens[1 if extra["cond_or_uncond"][b // per] == 1 else 0].reshape(1, -1, wk.shape[1])
            rows.append(host_attention(q[b:b + 1], t @ wk.T, t @ wv.T, heads))
        return host_attention(q, k, v, heads) + 0.9 * m * torch.cat(rows)

    check_layers(torch, model, probe.calls, reference, min_calls=16)
    assert seen == {(4, 96), (2, 48), (1, 24), (1, 12)}  # SD1.5's cross-attention levels, middle block last
