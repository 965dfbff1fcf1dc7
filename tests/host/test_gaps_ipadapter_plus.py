"""This pack and ComfyUI_IPAdapter_plus on one model, in either order (issue 6, review gap).

Users migrate one node at a time, so both orders must work with both adapters acting. Before
the fix, with IPAdapter_plus applied *after* this pack:
  - SDXL: it found this pack's patch on its (3-element) key and called `add` on it, which the
    patch did not have: AttributeError when the node ran;
  - SD1.5: it registered on 2-element keys ("input", 1), which the host never reaches while this
    pack's 3-element keys ("input", 1, 0) are set: its image prompt silently did nothing.

Each layer's output is checked against the formula written out here with both adapters'
checkpoint tensors: text + w_a * Attn(q, K_a, V_a) + w_b * Attn(q, K_b, V_b), where this pack
patches every cross-attention layer and IPAdapter_plus every one but the middle block (its
middle keys, ("middle", 1...), are never looked up by the host)."""
import pytest

from test_gaps_harness import CLIP, LayerProbe, apply, check_layers, host_attention, image, image_term, make_adapter


_term = image_term


def _tokens(adapter, cv, img):
    from ipadapter_fused.nodes.encode import encode_images, image_tokens

    pos, neg = encode_images(cv, adapter.spec, img, None)
    return image_tokens(adapter.weights, pos, neg, "concat")


def _setup(host, kind, tiny_sd15, tiny_sdxl, tiny_clip_vision, tmp_path):
    torch = host.torch
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    cv = tiny_clip_vision(**CLIP)
    ours, state_a, _ = make_adapter(host, model, "base", tmp_path, seed=1)
    theirs_adapter, state_b, path_b = make_adapter(host, model, "base", tmp_path, seed=2)
    img_a, img_b = image(torch, 1), image(torch, 2)
    return model, cv, (ours, state_a, img_a), (theirs_adapter, state_b, path_b, img_b)


def _reference(model, cv, a, b, w_a, w_b):
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    ours, state_a, img_a = a
    theirs_adapter, state_b, _, img_b = b
    tok_a, tok_b = _tokens(ours, cv, img_a), _tokens(theirs_adapter, cv, img_b)
    layer_of = {s.key: i for i, s in enumerate(unet_attn2_sites(model.get_model_object("diffusion_model")))}

    def reference(key, q, k, v, extra):
        n = 2 * layer_of[key] + 1
        out = host_attention(q, k, v, extra["n_heads"])
        if w_a:
            out = out + w_a * _term(state_a, n, tok_a, q, extra)
        if w_b and key[0] != "middle":
            out = out + w_b * _term(state_b, n, tok_b, q, extra)
        return out

    return reference


def _run_and_check(host, model, patched, reference, sampler, cond, kind):
    probe = LayerProbe()
    sampler(probe.attach(patched), cond(kind, seed=1), cond(kind, seed=2), steps=1, latent_size=8)
    n_sites = 16 if kind == "sd15" else 70
    check_layers(host.torch, model, probe.calls, reference, min_calls=n_sites)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("order", ["ours then theirs", "theirs then ours"])
def test_both_orders_both_adapters_act(host, ipadapter_plus, kind, order, tiny_sd15, tiny_sdxl, tiny_clip_vision,
                                       sampler, cond, tmp_path):
    from ipadapter_fused.models import load_adapter_state

    execute = ipadapter_plus.IPAdapterPlus.ipadapter_execute
    model, cv, a, b = _setup(host, kind, tiny_sd15, tiny_sdxl, tiny_clip_vision, tmp_path)
    ours, _, img_a = a
    _, _, path_b, img_b = b
    w_a, w_b = 0.7, 0.6
    if order == "ours then theirs":
        mine = apply(model, ours, cv, img_a, weight=w_a)
        both, _ = execute(mine.clone(), load_adapter_state(path_b), cv, image=img_b, weight=w_b)
    else:
        theirs, _ = execute(model.clone(), load_adapter_state(path_b), cv, image=img_b, weight=w_b)
        both = apply(theirs, ours, cv, img_a, weight=w_a)
    _run_and_check(host, model, both, _reference(model, cv, a, b, w_a, w_b), sampler, cond, kind)
    if order == "ours then theirs":
        # IPAdapter_plus's in-place `add` stays on its clone: the model it was given is unchanged
        _run_and_check(host, model, mine, _reference(model, cv, a, b, w_a, 0.0), sampler, cond, kind)


def test_theirs_ours_theirs_on_sd15(host, ipadapter_plus, tiny_sd15, tiny_sdxl, tiny_clip_vision, sampler, cond,
                                    tmp_path):
    """IPAdapter_plus again after this pack, on a model it had patched before: its second
    image prompt extends its own (cloned) patch on the 2-element key, which this pack's patch
    must read at run time, not the copy it saw when it was applied."""
    from ipadapter_fused.models import load_adapter_state

    execute = ipadapter_plus.IPAdapterPlus.ipadapter_execute
    model, cv, a, b = _setup(host, "sd15", tiny_sd15, tiny_sdxl, tiny_clip_vision, tmp_path)
    ours, _, img_a = a
    _, state_b, path_b, img_b = b
    first, _ = execute(model.clone(), load_adapter_state(path_b), cv, image=img_b, weight=0.4)
    mine = apply(first, ours, cv, img_a, weight=0.7)
    third, _ = execute(mine.clone(), load_adapter_state(path_b), cv, image=img_b, weight=0.5)
    # the same adapter and image twice (0.4, then 0.5) act like one at 0.9
    _run_and_check(host, model, third, _reference(model, cv, a, b, 0.7, 0.9), sampler, cond, "sd15")
    _run_and_check(host, model, mine, _reference(model, cv, a, b, 0.7, 0.4), sampler, cond, "sd15")
