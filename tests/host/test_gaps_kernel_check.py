"""The fused kernel's self-check covers the variants a real run compiles (issue 6, review gap).

Before the fix "auto" checked the kernel once per device on head dims 40 and 64 in fp16/bf16,
"blc" layout, with text and masks, and then trusted every other variant: other head dims (the
tiny SD1.5 here has 4, 8 and 16; real SD1.5 40, 80 and 160), fp32, no text (a foreign patch
computes it), other image tile sizes. Here the kernel is a stand-in that computes right except
at head dim 16, and the compiled-kernel route is faked on CPU: every layer must still give the
formula's output, the head-dim-16 layers through the torch path."""
from test_gaps_harness import CLIP, LayerProbe, apply, check_layers, host_attention, image, image_term, make_adapter


def test_a_kernel_wrong_in_one_variant_never_reaches_the_output(host, tiny_sd15, tiny_clip_vision, sampler, cond,
                                                              tmp_path, monkeypatch):
    from ipadapter_fused.attention import decoupled_attention_torch, dispatch, fused_triton
    from ipadapter_fused.nodes.encode import encode_images, image_tokens
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    if not fused_triton.HAS_TRITON:
        import pytest
        pytest.skip("triton is not installed")
    torch = host.torch
    ran = []

    def kernel(q, kt, vt, ctxs, heads, layout="blc", **kw):
        head_dim = q.shape[-1] // heads if layout == "blc" else q.shape[-1]
        ran.append(head_dim)
        out = decoupled_attention_torch(q, kt, vt, ctxs, heads, layout)
        return out * 1.05 if head_dim == 16 else out

    monkeypatch.setattr(fused_triton, "fused_decoupled_attention", kernel)
    monkeypatch.setattr(dispatch, "_runs_natively", lambda q: True)
    monkeypatch.setattr(dispatch, "_verified", {})
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)

    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, state, _ = make_adapter(host, model, "base", tmp_path)
    img = image(torch)
    weight = 0.8
    probe = LayerProbe()
    sampler(probe.attach(apply(model, adapter, cv, img, weight=weight)), cond("sd15", seed=1),
            cond("sd15", seed=2), steps=1, latent_size=8)
    assert {4, 8, 16} <= set(ran), "every head dim was checked"

    pos, neg = encode_images(cv, adapter.spec, img, None)
    tokens = image_tokens(adapter.weights, pos, neg, "concat")
    layer_of = {s.key: i for i, s in enumerate(unet_attn2_sites(model.get_model_object("diffusion_model")))}

    def reference(key, q, k, v, extra):
        n = 2 * layer_of[key] + 1
        term = image_term(state, n, tokens, q, extra)
        return host_attention(q, k, v, extra["n_heads"]) + weight * term

    # the stand-in's softmax is torch's SDPA, the formula's the host's attention
    check_layers(torch, model, probe.calls, reference, atol=1e-5, rtol=1e-5, min_calls=16)
    assert sum(not ok for ok in dispatch._verified.values()) == 1, "only the head-dim-16 variant falls back"
