"""The FaceID checkpoint's LoRA on the real host's tiny SD1.5 / SDXL UNets.

References: W + strength * up @ down written out here per layer (processor N -> attn1/attn2 of the
N // 2-th transformer block in diffusers order, enumerated in faceid_lora_files independently of the
pack), and the published LoRA file layout loaded by the host's own LoRA loader
(comfy.sd.load_lora_for_models, what LoraLoaderModelOnly runs)."""
from __future__ import annotations

import pytest
import util
from faceid_lora_files import (expected_weights, processor_layers, published_lora_state_dict,
                               random_faceid_lora)

RANK = 4


@pytest.fixture(autouse=True)
def _unloaded(host):
    """The host keeps the last sampled clone loaded, its LoRA merged into the weights the tiny UNets'
    clones share: unload before (to read true base weights) and after (to leave no LoRA to others)."""
    host.mm.unload_all_models()
    yield
    host.mm.unload_all_models()


def _nrb(model):
    return model.model.model_config.unet_config["num_res_blocks"]


def _lora(model, seed=0, rank=RANK):
    return random_faceid_lora(model.model.diffusion_model, _nrb(model), rank=rank, seed=seed)


def _patched_state(model) -> dict:
    """The weights as the host merges them when it loads the model (then restored)."""
    model.patch_model()
    try:
        return {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    finally:
        model.unpatch_model()


def _published(host, model, lora, tmp_path, strength):
    """The same LoRA written as the published file and loaded through the host's LoRA loader."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    path = tmp_path / "ip-adapter-faceid_test_lora.safetensors"
    sd = published_lora_state_dict(lora, model.model.diffusion_model, _nrb(model))
    save_file(sd, str(path))
    loaded = comfy.utils.load_torch_file(str(path), safe_load=True)
    out, _ = comfy.sd.load_lora_for_models(model, None, loaded, strength, 0.0)
    return out, len(sd)


def _apply(model, lora, strength=1.0):
    from ipadapter_fused.nodes.faceid_lora import apply_faceid_lora
    return apply_faceid_lora(model, lora, strength)


def _lora_keys(model):
    keys = []
    for _, hpath in processor_layers(model.model.diffusion_model, _nrb(model)):
        keys += [f"diffusion_model.{hpath}.{t}.weight" for t in ("to_q", "to_k", "to_v", "to_out.0")]
    return keys


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_every_attention_weight_gets_w_plus_up_down(host, kind, tiny_sd15, tiny_sdxl):
    torch = host.torch
    base = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    lora = _lora(base)
    assert len(lora) == 2 * util.ATTN2_SITES[kind]
    patched = base.clone()
    assert _apply(patched, lora) is True
    got = _patched_state(patched)
    want = expected_weights(lora, base.model.diffusion_model, _nrb(base), base_state)
    assert len(want) == 4 * len(lora) == len(patched.patches)
    for key, w in want.items():
        scale = float(w.abs().max())
        err = float((got[key] - w).abs().max())
        # the host merges in fp32 exactly this sum; allow one rounding of the largest entry
        assert err <= 1e-6 * scale, f"{key}: off by {err:.3g}"
        assert float((w - base_state[key]).abs().max()) > 1e-4, f"{key}: the LoRA must change it"
    for key, v in base_state.items():
        if key not in want:
            assert torch.equal(got[key], v), f"{key} is not a LoRA layer and must not change"
    # unpatching restores the exact base weights (the model the caller shares)
    for key, v in base.model.state_dict().items():
        assert torch.equal(v, base_state[key]), f"{key} not restored after unpatching"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_equals_the_published_lora_through_the_host_loader(host, kind, tiny_sd15, tiny_sdxl, sampler, cond, tmp_path):
    torch = host.torch
    base = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    lora = _lora(base, seed=3)
    ours = base.clone()
    _apply(ours, lora, 0.8)
    theirs, n_keys = _published(host, base, lora, tmp_path, 0.8)
    # every key of the file found its layer in the host's own diffusers-name table
    assert set(theirs.patches) == set(_lora_keys(base)) == set(ours.patches)
    assert n_keys == 2 * len(theirs.patches)
    a, b = _patched_state(ours), _patched_state(theirs)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: the checkpoint's LoRA and the published file differ"
    if kind == "sd15":  # one sampled latent (SDXL's weights above are the same comparison, slower to sample)
        run = lambda m: sampler(m, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)  # noqa: E731
        la, lb = run(ours), run(theirs)
        assert torch.equal(la, lb), "same weights, same sampler: the latents must be bit-identical"
        plain = run(base.clone())
        assert float((la - plain).abs().max()) > 1e-3 * float(plain.abs().max()), "the LoRA must change the result"

    # the published file already loaded: the checkpoint's copy is not stacked on top of it
    both = theirs.clone()
    assert _apply(both, lora, 1.0) is False
    assert len(both.patches[_lora_keys(base)[0]]) == 1
    # a different LoRA on the same layers is not mistaken for it
    other = theirs.clone()
    assert _apply(other, _lora(base, seed=4), 1.0) is True


def test_strength_scales_and_zero_leaves_weights(host, tiny_sd15):
    torch = host.torch
    base = tiny_sd15()
    base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    lora = _lora(base, seed=5)
    keys = _lora_keys(base)

    half = base.clone()
    # another patch on the same layer (a user's LoRA) keeps working alongside
    foreign = torch.randn(base_state[keys[0]].shape, generator=torch.Generator().manual_seed(9)) * 0.01
    half.add_patches({keys[0]: ("diff", (foreign,))}, 1.0)
    assert _apply(half, lora, 0.5) is True
    got = _patched_state(half)
    want = expected_weights(lora, base.model.diffusion_model, _nrb(base), base_state, strength=0.5)
    want[keys[0]] = want[keys[0]] + foreign
    for key, w in want.items():
        assert float((got[key] - w).abs().max()) <= 1e-6 * float(w.abs().max()), key

    off = base.clone()
    assert _apply(off, lora, 0.0) is False
    assert off.patches == {}
    got = _patched_state(off)
    for key, v in base_state.items():
        assert torch.equal(got[key], v), key


def test_shared_model_untouched(host, tiny_sd15, sampler, cond):
    torch = host.torch
    base = tiny_sd15()
    lora = _lora(base, seed=6)
    run = lambda m: sampler(m, cond("sd15", seed=1), cond("sd15", seed=2), steps=2, latent_size=16)  # noqa: E731
    before = run(base.clone())
    patched = base.clone()
    _apply(patched, lora)
    after_patched = run(patched)
    assert base.patches == {}, "the caller's model must carry no patch"
    assert torch.equal(run(base.clone()), before), "a clone of the original must give the base latent"
    assert not torch.equal(after_patched, before)


def test_misfit_lora_refused_before_patching(host, tiny_sd15, tiny_sdxl):
    torch = host.torch
    from ipadapter_fused.nodes.faceid_lora import faceid_lora_patches

    sd15, sdxl = tiny_sd15(), tiny_sdxl()
    lora = _lora(sd15, seed=7)

    short = dict(lora)
    del short[len(lora) - 1]
    with pytest.raises(ValueError, match=r"covers 31 attention layers but this model has 32"):
        _apply(sd15, short)
    with pytest.raises(ValueError, match=r"covers 32 attention layers but this model has 140.*different model"):
        _apply(sdxl, lora)

    wide = {n: dict(layers) for n, layers in lora.items()}
    down, up = wide[5]["k"]
    wide[5]["k"] = (torch.randn(RANK, down.shape[1] + 8), up)
    with pytest.raises(ValueError, match=r"processor 5, to_k of .*attn2: the LoRA maps \d+ -> \d+ features"):
        _apply(sd15, wide)

    ranks = {n: dict(layers) for n, layers in lora.items()}
    down, up = ranks[0]["out"]
    ranks[0]["out"] = (down, torch.randn(up.shape[0], RANK + 1))
    with pytest.raises(ValueError, match=r"processor 0, to_out.0 of .*attn1: .*different ranks"):
        _apply(sd15, ranks)

    nan = {n: dict(layers) for n, layers in lora.items()}
    down, up = nan[31]["q"]
    nan[31]["q"] = (down, torch.full_like(up, float("nan")))
    with pytest.raises(ValueError, match=r"processor 31.*NaN"):
        _apply(sd15, nan)

    missing = {n: dict(layers) for n, layers in lora.items()}
    del missing[2]["v"]
    with pytest.raises(ValueError, match=r"processor 2 .*needs q, k, v and out"):
        faceid_lora_patches(sd15, missing)
    with pytest.raises(ValueError, match="finite"):
        _apply(sd15, lora, float("nan"))
    assert sd15.patches == {} and sdxl.patches == {}, "nothing may be patched when the LoRA does not fit"


def test_missing_lora_warning():
    from ipadapter_fused.nodes.faceid_lora import missing_lora_warning

    for kind in ("faceid", "faceid-plus"):
        text = missing_lora_warning(kind, False)
        assert text and "\n" not in text and "LoRA" in text and "faceid_lora_strength" in text
        assert missing_lora_warning(kind, True) is None
    for kind in ("portrait", "face-resampler", "kolors-faceid-plus"):
        assert missing_lora_warning(kind, False) is None
