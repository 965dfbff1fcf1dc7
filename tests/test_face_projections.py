"""Face-family projections against their formulas, written out here with plain torch ops on the
checkpoint's tensors (float64), never through the pack's modules: FaceID MLP, FaceID Plus (V1 and V2),
the face-embedding resampler, Kolors FaceID-Plus (with the UNet's encoder_hid_proj before K/V).
Tiny sizes; fp32 and bf16."""
import math

import pytest
import torch

from models import IPAdapterWeights
from models.synthetic import synthetic_face_state

D = torch.float64
EPS = 1e-5  # nn.LayerNorm's default, as in the publishers' modules


def ln(x, s, prefix):
    w, b = s[prefix + ".weight"].to(D), s[prefix + ".bias"].to(D)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def lin(x, s, prefix, bias=True):
    y = x @ s[prefix + ".weight"].to(D).T
    return y + s[prefix + ".bias"].to(D) if bias else y


def gelu(x):  # exact (erf) GELU, nn.GELU's default
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def heads_of(s, prefix):
    return s[prefix + ".to_q.weight"].shape[0] // 64


def perceiver_attention(x, lat, s, p):
    """latents attend to [norm1(x); norm2(latents)] with 64-wide heads, softmax(q k^T / sqrt(64))."""
    h = heads_of(s, p)
    xn, ln_ = ln(x, s, p + ".norm1"), ln(lat, s, p + ".norm2")
    q = lin(ln_, s, p + ".to_q", bias=False)
    kv = lin(torch.cat([xn, ln_], dim=1), s, p + ".to_kv", bias=False)
    k, v = kv[..., : kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:]
    n, t, _ = q.shape

    def split(a):
        return a.reshape(n, a.shape[1], h, 64).permute(0, 2, 1, 3)

    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(64), dim=-1)
    out = (att @ split(v)).permute(0, 2, 1, 3).reshape(n, t, h * 64)
    return lin(out, s, p + ".to_out", bias=False)


def feed_forward(lat, s, p):
    y = ln(lat, s, p + ".0")
    return lin(gelu(lin(y, s, p + ".1", bias=False)), s, p + ".3", bias=False)


def perceiver_stack(lat, x, s, p):
    """proj_in(x); every layer: latents += attention, latents += feed-forward; norm_out(proj_out(latents))."""
    x = lin(x, s, p + "proj_in")
    depth = len({k[len(p + "layers."):].split(".")[0] for k in s if k.startswith(p + "layers.")})
    for i in range(depth):
        lat = lat + perceiver_attention(x, lat, s, f"{p}layers.{i}.0")
        lat = lat + feed_forward(lat, s, f"{p}layers.{i}.1")
    return ln(lin(lat, s, p + "proj_out"), s, p + "norm_out")


def faceid_mlp(e, s, tokens):
    y = lin(gelu(lin(e, s, "image_proj.proj.0")), s, "image_proj.proj.2")
    c = s["image_proj.norm.weight"].shape[0]
    return ln(y.reshape(e.shape[0], tokens, c), s, "image_proj.norm")


def faceid_plus(e, clip, s, tokens, shortcut):
    x = faceid_mlp(e, s, tokens)
    out = perceiver_stack(x, clip, s, "image_proj.perceiver_resampler.")
    return out if shortcut is None else x + shortcut * out


def face_resampler(e, s):
    lat = s["image_proj.latents"].to(D).expand(e.shape[0], -1, -1)
    return perceiver_stack(lat, e[:, None, :], s, "image_proj.")


TINY = dict(context_dim=64, model_channels=8)
CASES = {
    "faceid": dict(kind="faceid", hidden=48),
    "portrait": dict(kind="portrait", hidden=40),
    "faceid-plus": dict(kind="faceid-plus", hidden=48, heads=2, depth=2, ff_dim=96, clip_width=24),
    "face-resampler": dict(kind="face-resampler", resampler_dim=96, heads=2, depth=2),
    "kolors-faceid-plus": dict(kind="kolors-faceid-plus", hidden=32, heads=2, depth=2, ff_dim=80, clip_width=24,
                               token_width=128),
}


def _weights(case, dtype=torch.float32, seed=0):
    kw = dict(CASES[case])
    state = synthetic_face_state(kw.pop("kind"), seed=seed, **TINY, **kw)
    w = IPAdapterWeights.from_state(state).to(dtype)
    return w, state


def _inputs(w, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, 512, generator=g, dtype=D)
    e = e / e.norm(dim=-1, keepdim=True)  # a normed embedding's scale
    clip = torch.randn(n, 7, w.spec.encoder_width, generator=g, dtype=D) if w.spec.face.uses_clip else None
    return e, clip


def _reference(case, w, state, e, clip, shortcut):
    s = {k: v.to(D) for k, v in state.items()}
    t = w.spec.tokens
    if case in ("faceid", "portrait"):
        return faceid_mlp(e, s, t)
    if case == "face-resampler":
        return face_resampler(e, s)
    if case == "kolors-faceid-plus":
        return faceid_plus(e, clip, s, t, 1.0 if shortcut is None else shortcut)
    return faceid_plus(e, clip, s, t, shortcut)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 6e-2, 4e-2)])
@pytest.mark.parametrize("case", list(CASES))
def test_projection_matches_formula(case, dtype, atol, rtol):
    w, state = _weights(case, dtype)
    e, clip = _inputs(w)
    shortcuts = [None, 0.0, 1.7] if case in ("faceid-plus", "kolors-faceid-plus") else [None]
    for s in shortcuts:
        kw = {} if clip is None else dict(clip_hidden=clip, shortcut_scale=s)
        got = w.image_tokens(e, **kw)
        assert got.dtype == dtype and got.shape == (3, w.spec.tokens, w.spec.face.token_width)
        want = _reference(case, w, state, e, clip, s)
        torch.testing.assert_close(got.to(D), want, atol=atol, rtol=rtol)


def test_v1_and_v2_differ_by_the_shortcut_exactly():
    """V2 = MLP tokens + s * V1 output: (V2(s) - V1) / s is the MLP tokens, which V1 never adds."""
    w, state = _weights("faceid-plus")
    e, clip = _inputs(w)
    v1 = w.image_tokens(e, clip_hidden=clip).to(D)
    v2 = w.image_tokens(e, clip_hidden=clip, shortcut_scale=2.0).to(D)
    x = faceid_mlp(e, {k: t.to(D) for k, t in state.items()}, w.spec.tokens)
    torch.testing.assert_close(v2, x + 2.0 * v1, atol=3e-5, rtol=3e-5)
    assert (v2 - v1).abs().max() > 0.1


def test_batches_of_one_are_shared():
    """One CLIP encoding for several face embeddings (or the reverse) is broadcast, as a negative often is."""
    w, _ = _weights("faceid-plus")
    e, clip = _inputs(w)
    got = w.image_tokens(e, clip_hidden=clip[:1], shortcut_scale=1.0)
    each = torch.cat([w.image_tokens(e[i:i + 1], clip_hidden=clip[:1], shortcut_scale=1.0) for i in range(3)])
    torch.testing.assert_close(got, each, atol=1e-5, rtol=1e-5)
    assert w.image_tokens(e[0], clip_hidden=clip[0]).shape == (1, 4, 64)


def test_kolors_tokens_reach_the_layers_through_encoder_hid_proj():
    """K of layer i = to_k_ip(encoder_hid_proj(tokens)): 128-wide tokens -> 64-wide context -> layer width."""
    w, state = _weights("kolors-faceid-plus")
    e, clip = _inputs(w)
    tokens = w.image_tokens(e, clip_hidden=clip)
    g = torch.Generator().manual_seed(5)
    hid_w, hid_b = torch.randn(64, 128, generator=g) / 128 ** 0.5, torch.randn(64, generator=g)
    with pytest.raises(ValueError, match="encoder_hid_proj"):
        w.layer_kv(0, tokens)
    with pytest.raises(ValueError, match="encoder_hid_proj"):
        w.context_tokens(tokens)
    ctx = w.context_tokens(tokens, (hid_w, hid_b))
    layer = torch.nn.Linear(128, 64)
    layer.weight.data.copy_(hid_w)
    layer.bias.data.copy_(hid_b)
    torch.testing.assert_close(w.context_tokens(tokens, layer), ctx)
    k, v = w.layer_kv(2, ctx)
    want_ctx = tokens.to(D) @ hid_w.to(D).T + hid_b.to(D)
    torch.testing.assert_close(k.to(D), want_ctx @ state["ip_adapter.5.to_k_ip.weight"].to(D).T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v.to(D), want_ctx @ state["ip_adapter.5.to_v_ip.weight"].to(D).T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="maps 64 -> 64"):
        w.context_tokens(tokens, (torch.zeros(64, 64), torch.zeros(64)))


def test_other_families_ignore_encoder_hid_proj():
    w, _ = _weights("faceid")
    t = w.image_tokens(_inputs(w)[0])
    assert w.context_tokens(t) is t


def test_wrong_inputs_are_explained():
    plus, _ = _weights("faceid-plus")
    e, clip = _inputs(plus)
    with pytest.raises(ValueError, match="penultimate hidden states of the face crops"):
        plus.image_tokens(e)
    with pytest.raises(ValueError, match=r"hidden states of shape \(3, L, 24\)"):
        plus.image_tokens(e, clip_hidden=torch.randn(3, 7, 25))
    with pytest.raises(ValueError, match=r"\(N, 512\)"):
        plus.image_tokens(torch.randn(3, 511), clip_hidden=clip)
    mlp, _ = _weights("faceid")
    with pytest.raises(ValueError, match="face embedding alone"):
        mlp.image_tokens(e, clip_hidden=clip)
    with pytest.raises(ValueError, match="face embedding alone"):
        mlp.image_tokens(e, shortcut_scale=1.0)
    resampler, _ = _weights("face-resampler")
    # InstantID hands the resampler (N, 1, 512) sequences; both forms give the same tokens
    torch.testing.assert_close(resampler.image_tokens(e[:, None, :]), resampler.image_tokens(e))


def test_lora_weights_are_the_checkpoint_tensors():
    w, state = _weights("faceid")
    lora = w.lora_weights()
    assert sorted(lora) == list(range(2 * w.spec.num_layers))
    for n, parts in lora.items():
        assert sorted(parts) == ["k", "out", "q", "v"]
        for p, (down, up) in parts.items():
            assert torch.equal(down, state[f"ip_adapter.{n}.to_{p}_lora.down.weight"])
            assert torch.equal(up, state[f"ip_adapter.{n}.to_{p}_lora.up.weight"])
    # attn1 (even) K/V LoRA read the layer width, attn2 (odd) the context width
    assert lora[0]["k"][0].shape == (4, w.spec.layer_dims[0]) and lora[1]["k"][0].shape == (4, 64)
    assert lora[1]["q"][1].shape == (w.spec.layer_dims[0], 4)
    assert sorted(w.state_dict()) == sorted(state)
    portrait, _ = _weights("portrait")
    assert portrait.lora_weights() == {}
