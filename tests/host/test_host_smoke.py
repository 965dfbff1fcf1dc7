"""The host fixtures work, and what the host really does with attn2 replacements.

These pin the facts the patcher relies on: which keys the UNet looks up for each cross-attention,
what extra_options holds, how clone() treats a patch object."""
from __future__ import annotations

import copy

import pytest

import util


def _patch_all(model, sites, tag_fn=lambda key: key):
    recorders = {}
    for key in sites:
        rec = util.RecordingAttn2(tag_fn(key))
        recorders[key] = rec
        model.set_model_attn2_replace(rec, *key)
    return recorders


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_unet_samples_deterministically(kind, tiny_sd15, tiny_sdxl, sampler, cond, host):
    make = tiny_sd15 if kind == "sd15" else tiny_sdxl
    model = make()
    assert type(model.model.model_config).__name__ == util.CONFIG_CLASS[kind]
    pos, neg = cond(kind, seed=1), cond(kind, seed=2)
    a = sampler(model, pos, neg, seed=3, steps=2, latent_size=16)
    b = sampler(make(), pos, neg, seed=3, steps=2, latent_size=16)
    assert a.shape == (1, 4, 16, 16)
    assert host.torch.isfinite(a).all()
    assert host.torch.equal(a, b)
    c = sampler(make(), pos, neg, seed=4, steps=2, latent_size=16)
    assert not host.torch.equal(a, c)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_every_attn2_site_is_called_with_its_3_tuple_key(kind, tiny_sd15, tiny_sdxl, sampler, cond, host):
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    sites = util.attn2_sites(model)
    assert len(sites) == util.ATTN2_SITES[kind]
    recorders = _patch_all(model, sites)
    base = sampler((tiny_sd15 if kind == "sd15" else tiny_sdxl)(), cond(kind, seed=1), cond(kind, seed=2), steps=2)
    out = sampler(model, cond(kind, seed=1), cond(kind, seed=2), steps=2)
    # plain attention through the replacement gives the host's own result
    assert host.torch.allclose(out, base, atol=1e-4, rtol=1e-4)
    steps, cfg_batches = 2, 1  # cond and uncond run as one batch of 2 chunks
    for key, rec in recorders.items():
        assert len(rec.calls) == steps * cfg_batches, key
    call = recorders[sites[0]].calls[0]
    extra = call["extra"]
    for name in ("n_heads", "dim_head", "block", "block_index", "transformer_index", "cond_or_uncond",
                 "sigmas", "original_shape", "activations_shape", "attn_precision"):
        assert name in extra, name
    assert extra["cond_or_uncond"] == [1, 0] or sorted(extra["cond_or_uncond"]) == [0, 1]
    assert call["q"][0] == 2 * 1  # batch = chunks x latent batch
    assert extra["sigmas"][0] == "tensor"


def test_sd15_head_dims_and_middle_key(tiny_sd15, sampler, cond):
    model = tiny_sd15(model_channels=32)
    sites = util.attn2_sites(model)
    assert ("middle", 0, 0) in sites
    recorders = _patch_all(model, sites)
    sampler(model, cond("sd15", 1), cond("sd15", 2), steps=1)
    extra = {k: r.calls[0]["extra"] for k, r in recorders.items()}
    assert {e["n_heads"] for e in extra.values()} == {8}
    assert sorted({e["dim_head"] for e in extra.values()}) == [4, 8, 16]  # 32/64/128 wide, 8 heads
    assert extra[("middle", 0, 0)]["block"] == ("middle", 0)
    # transformer_index counts the SpatialTransformers met in the forward pass, from 0
    order = sorted(extra, key=lambda k: extra[k]["transformer_index"])
    assert [extra[k]["transformer_index"] for k in order] == list(range(16))
    assert order == sites


def test_sdxl_middle_block_keys_and_transformer_index(tiny_sdxl, sampler, cond):
    model = tiny_sdxl()
    sites = util.attn2_sites(model)
    assert [s for s in sites if s[0] == "middle"] == [("middle", 0, i) for i in range(10)]
    recorders = _patch_all(model, sites)
    sampler(model, cond("sdxl", 1), cond("sdxl", 2), steps=1)
    extra = {k: r.calls[0]["extra"] for k, r in recorders.items()}
    assert {e["dim_head"] for e in extra.values()} == {64}
    assert {e["n_heads"] for e in extra.values()} == {1, 2}
    # one transformer_index per SpatialTransformer (shared by its depth-2/10 blocks): 11 of them
    assert sorted({e["transformer_index"] for e in extra.values()}) == list(range(11))
    for key, e in extra.items():
        assert e["block"] == key[:2] and e["block_index"] == key[2]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_keys_the_host_looks_up(kind, tiny_sd15, tiny_sdxl, sampler, cond):
    """Record the lookups themselves: for each site the host tests (block, id, index), then (block, id)."""
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    sites = util.attn2_sites(model)
    log = []
    util.record_lookups(model, log)
    sampler(model, cond(kind, 1), cond(kind, 2), steps=1)
    assert log, "no lookup recorded"
    three = [k for k in log if len(k) == 3]
    two = [k for k in log if len(k) == 2]
    assert set(three) == set(sites)
    assert set(two) == {s[:2] for s in sites}
    middle = {k for k in log if k[0] == "middle"}
    if kind == "sd15":
        assert middle == {("middle", 0, 0), ("middle", 0)}
    else:
        assert middle == {("middle", 0, i) for i in range(10)} | {("middle", 0)}
    # ComfyUI_IPAdapter_plus registers ("middle", 1[, i]): never looked up
    assert not any(k[:2] == ("middle", 1) for k in log)


def test_two_tuple_key_is_the_fallback(tiny_sd15, sampler, cond):
    model = tiny_sd15()
    only_two = util.RecordingAttn2("two")
    model.set_model_attn2_replace(only_two, "middle", 0)
    sampler(model, cond("sd15", 1), cond("sd15", 2), steps=1)
    assert len(only_two.calls) == 1
    both = tiny_sd15()
    two, three = util.RecordingAttn2("two"), util.RecordingAttn2("three")
    both.set_model_attn2_replace(two, "middle", 0)
    both.set_model_attn2_replace(three, "middle", 0, 0)
    sampler(both, cond("sd15", 1), cond("sd15", 2), steps=1)
    assert len(three.calls) == 1 and not two.calls
    ignored = tiny_sd15()
    plus_style = util.RecordingAttn2("middle-1")
    ignored.set_model_attn2_replace(plus_style, "middle", 1)
    ignored.set_model_attn2_replace(plus_style, "middle", 1, 0)
    sampler(ignored, cond("sd15", 1), cond("sd15", 2), steps=1)
    assert not plus_style.calls


def test_clone_deep_copies_model_options(tiny_sd15):
    model = tiny_sd15()

    class Plain:
        def __call__(self, q, k, v, extra):
            return q

    class Shared(Plain):
        def __deepcopy__(self, memo):
            return self

    plain, shared = Plain(), Shared()
    model.set_model_attn2_replace(plain, "input", 1, 0)
    model.set_model_attn2_replace(shared, "input", 2, 0)
    clone = model.clone()
    attn2 = clone.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert attn2[("input", 1, 0)] is not plain      # duplicated by clone()
    assert attn2[("input", 2, 0)] is shared         # kept when __deepcopy__ returns self
    # setting a key again replaces it, on the clone only
    clone.set_model_attn2_replace(plain, "input", 2, 0)
    assert model.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 2, 0)] is shared
    assert copy.deepcopy(shared) is shared


def test_tiny_clip_vision_encodes(tiny_clip_vision, host):
    cv = tiny_clip_vision(hidden_size=64, layers=3, projection_dim=32, image_size=56)
    image = host.torch.rand(2, 40, 48, 3)
    out = cv.encode_image(image)
    assert tuple(out["image_embeds"].shape) == (2, 32)
    assert tuple(out["penultimate_hidden_states"].shape) == (2, 17, 64)
    assert tuple(out["last_hidden_state"].shape) == (2, 17, 64)
    assert host.torch.isfinite(out["image_embeds"]).all()
    again = cv.encode_image(image)
    assert host.torch.equal(out["image_embeds"], again["image_embeds"])


def test_ipadapter_plus_loads(ipadapter_plus):
    import sys
    mod = sys.modules[ipadapter_plus.__name__ + ".IPAdapterPlus"]
    assert hasattr(mod, "ipadapter_execute")
    assert "IPAdapterAdvanced" in ipadapter_plus.NODE_CLASS_MAPPINGS
