"""An attention override (SageAttention and other attention nodes) still computes the text
term (issue 6, review gap).

Such nodes put `optimized_attention_override` into transformer_options; the host's attention
functions hand every call to it. The fused kernel computes the text term itself, so before
the fix a patched layer on the fused path never reached the override. The kernel here is a
stand-in (the torch reference, the override-free computation the kernel does), so the test
runs fast on CPU; what is tested is which calls the override receives and what the layer
returns."""
import pytest

from test_gaps_harness import CLIP, LayerProbe, apply, check_layers, host_attention, image, image_term, make_adapter

TEXT_TOKENS = 77


class Override:
    """Records what reaches it and scales the result, so that a text term that bypassed it
    would show in the layer's output."""

    def __init__(self, scale=0.5):
        self.scale, self.seen = scale, []

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        self.seen.append((tuple(q.shape), k.shape[1]))
        return func(*args, **kwargs) * self.scale

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_text_term_goes_through_the_override(host, backend, tiny_sd15, tiny_clip_vision, sampler, cond, tmp_path,
                                             monkeypatch):
    from ipadapter_fused.attention import decoupled_attention_torch, dispatch, fused_triton
    from ipadapter_fused.nodes.encode import encode_images, image_tokens
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    kernel_calls = []

    def kernel(q, kt, vt, ctxs, heads, layout="blc", **kw):
        kernel_calls.append(kt is not None)
        return decoupled_attention_torch(q, kt, vt, ctxs, heads, layout)

    monkeypatch.setattr(fused_triton, "fused_decoupled_attention", kernel)
    monkeypatch.setattr(fused_triton, "interpreting", lambda: True)  # "triton" may run on CPU tensors
    monkeypatch.setenv(dispatch.ENV_BACKEND, backend)

    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, state, _ = make_adapter(host, model, "base", tmp_path)
    img = image(torch)
    weight = 0.8
    patched = apply(model, adapter, cv, img, weight=weight)
    override = Override()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    probe = LayerProbe()
    sampler(probe.attach(patched), cond("sd15", seed=1), cond("sd15", seed=2), steps=1, latent_size=8)

    n_layers = len(probe.calls)
    n_text = sum(1 for _, keys in override.seen if keys == TEXT_TOKENS)
    assert n_layers == 16 and n_text == n_layers, f"{n_text} text terms reached the override in {n_layers} layer calls"
    if backend == "triton":
        assert kernel_calls and not any(kernel_calls), "the kernel gets the image terms only"

    pos, neg = encode_images(cv, adapter.spec, img, None)
    tokens = image_tokens(adapter.weights, pos, neg, "concat")
    layer_of = {s.key: i for i, s in enumerate(unet_attn2_sites(model.get_model_object("diffusion_model")))}
    # the torch path sends the image terms through the override as well; the kernel does not
    image_scale = override.scale if backend == "torch" else 1.0

    def reference(key, q, k, v, extra):
        n = 2 * layer_of[key] + 1
        term = image_term(state, n, tokens, q, extra)
        text = host_attention(q, k, v, extra["n_heads"]) * override.scale
        return text + weight * image_scale * term

    check_layers(torch, model, probe.calls, reference, min_calls=16)
