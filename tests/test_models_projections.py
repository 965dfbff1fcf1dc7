"""Projection networks against the same formulas written out again with plain functions.

The references below read the state dict directly (never the modules) and use a different
but mathematically equal arrangement where one exists (e.g. 1/sqrt(dh) applied once instead
of dh^-1/4 on both sides, GELU through erf), so a shared mistake is unlikely.

Tolerances: float64 module vs float64 reference: atol 1e-10 (only rounding differs);
float32 module vs float64 reference: atol 2e-4, rtol 1e-4 (outputs are LayerNorm'ed, O(1))."""
import math

import pytest
import torch
import torch.nn.functional as F

from ipadapter_fused.models import IPAdapterWeights, build_projection, detect_family
from ipadapter_fused.models.projections import LinearTokens, Resampler, TokenMLP
from ipadapter_fused.models.synthetic import synthetic_adapter_state

EPS = 1e-5  # torch.nn.LayerNorm's default, which the checkpoints were trained with


def _proj(state):
    return {k[len("image_proj."):]: v.double() for k, v in state.items() if k.startswith("image_proj.")}


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ln(x, s, name):
    return F.layer_norm(x, (x.shape[-1],), s[name + ".weight"], s[name + ".bias"], EPS)


def ref_linear_tokens(s, x, tokens):
    y = F.linear(x, s["proj.weight"], s["proj.bias"])
    c = s["norm.weight"].shape[0]
    return _ln(y.reshape(x.shape[0], tokens, c), s, "norm")


def ref_token_mlp(s, x):
    h = _gelu(F.linear(x, s["proj.0.weight"], s["proj.0.bias"]))
    h = F.linear(h, s["proj.2.weight"], s["proj.2.bias"])
    return _ln(h, s, "proj.3")


def ref_resampler(s, x, depth, heads, dh=64):
    x = F.linear(x, s["proj_in.weight"], s["proj_in.bias"])
    n = x.shape[0]
    lat = s["latents"].expand(n, -1, -1)
    for i in range(depth):
        a = f"layers.{i}.0."
        xn = _ln(x, s, a + "norm1")
        ln = _ln(lat, s, a + "norm2")
        q = F.linear(ln, s[a + "to_q.weight"])
        kv = F.linear(torch.cat([xn, ln], dim=1), s[a + "to_kv.weight"])
        inner = heads * dh
        k, v = kv[..., :inner], kv[..., inner:]
        q = q.reshape(n, -1, heads, dh)
        k = k.reshape(n, -1, heads, dh)
        v = v.reshape(n, -1, heads, dh)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        att = torch.softmax(logits, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(n, -1, inner)
        lat = lat + F.linear(o, s[a + "to_out.weight"])
        f = f"layers.{i}.1."
        h = F.layer_norm(lat, (lat.shape[-1],), s[f + "0.weight"], s[f + "0.bias"], EPS)
        h = F.linear(_gelu(F.linear(h, s[f + "1.weight"])), s[f + "3.weight"])
        lat = lat + h
    out = F.linear(lat, s["proj_out.weight"], s["proj_out.bias"])
    return _ln(out, s, "norm_out")


CASES = {
    "base": dict(layout="base", layer_dims=[8], context_dim=12, encoder_width=20, tokens=4),
    "plus": dict(layout="plus", layer_dims=[8], context_dim=12, encoder_width=20, resampler_dim=24,
                 resampler_heads=3, depth=3),
    "plus-kolors-like": dict(layout="plus", layer_dims=[8], context_dim=16, encoder_width=20, resampler_dim=32,
                             resampler_heads=1, depth=2, tokens=6),
    "full-face": dict(layout="full-face", layer_dims=[8], context_dim=12, encoder_width=20),
}


def _input(layout, n=3, length=9, gen=None):
    shape = (n, 20) if layout == "base" else (n, length, 20)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0


def _reference(case, state, x):
    s = _proj(state)
    spec = detect_family(state)
    if case["layout"] == "base":
        return ref_linear_tokens(s, x, spec.tokens)
    if case["layout"] == "full-face":
        return ref_token_mlp(s, x)
    return ref_resampler(s, x, spec.resampler_depth, spec.resampler_heads)


@pytest.mark.parametrize("name", list(CASES))
def test_projection_matches_functional_formula(name):
    case = dict(CASES[name])
    layout = case.pop("layout")
    state = synthetic_adapter_state(layout, seed=3, **case)
    gen = torch.Generator().manual_seed(1)
    x = _input(layout, gen=gen)
    want = _reference(dict(layout=layout), state, x)

    weights = IPAdapterWeights.from_state(state)
    got32 = weights.image_tokens(x)  # cast to the module's float32
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, atol=2e-4, rtol=1e-4)

    got64 = weights.double().image_tokens(x)
    torch.testing.assert_close(got64, want, atol=1e-10, rtol=0)

    spec = weights.spec
    tokens = 9 if layout == "full-face" else spec.tokens
    assert got64.shape == (3, tokens, spec.context_dim)
    # outputs end in a LayerNorm with gains near 1: O(1), finite
    assert torch.isfinite(got32).all() and 0.3 < got32.std().item() < 3.0


@pytest.mark.parametrize("name", list(CASES))
def test_rows_are_independent(name):
    case = dict(CASES[name])
    layout = case.pop("layout")
    weights = IPAdapterWeights.from_state(synthetic_adapter_state(layout, **case)).double()
    x = _input(layout)
    whole = weights.image_tokens(x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(weights.image_tokens(x[i:i + 1]), whole[i:i + 1], atol=1e-12, rtol=0)


def test_build_projection_key_names_are_the_checkpoints():
    for name, case in CASES.items():
        case = dict(case)
        layout = case.pop("layout")
        state = synthetic_adapter_state(layout, **case)
        spec = detect_family(state)
        module = build_projection(spec)
        proj_keys = {k[len("image_proj."):] for k in state if k.startswith("image_proj.")}
        assert set(module.state_dict()) == proj_keys, name
        module.load_state_dict({k: state["image_proj." + k] for k in proj_keys}, strict=True)
    assert isinstance(build_projection(detect_family(synthetic_adapter_state("base", [8], 12, 20))), LinearTokens)
    assert isinstance(build_projection(detect_family(synthetic_adapter_state("full-face", [8], 12, 20))), TokenMLP)


def test_resampler_feed_forward_indices():
    r = Resampler(encoder_width=20, dim=16, heads=2, depth=1, tokens=4, context_dim=12)
    keys = set(r.state_dict())
    assert {"layers.0.1.0.weight", "layers.0.1.0.bias", "layers.0.1.1.weight", "layers.0.1.3.weight"} <= keys
    assert not any(k.startswith("layers.0.1.2") for k in keys)
    assert r.state_dict()["layers.0.0.to_q.weight"].shape == (128, 16)  # 2 heads x 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resampler_low_precision_stays_finite(dtype):
    state = synthetic_adapter_state("plus", [8], 64, 40, resampler_dim=64, resampler_heads=2, depth=4)
    w = IPAdapterWeights.from_state(state)
    x = torch.randn(2, 17, 40) * 4
    ref = w.image_tokens(x)
    low = w.to(dtype).image_tokens(x)
    assert low.dtype == dtype and torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)
