"""DiT image-prompt adapters (Flux XLabs, Flux InstantX, SD3.5 InstantX): detection of every circulating
key layout, clear errors for damaged files, and the projections / per-block K/V against the reference
math written out here in plain torch, reading the tensors under the file's own key names."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import (
    DIT_LAYOUTS,
    AdapterFormatError,
    DiTAdapterWeights,
    IPAdapterWeights,
    Projected,
    detect_dit_family,
    detect_family,
    load_adapter_file,
    save_synthetic_adapter,
    save_synthetic_dit_adapter,
    synthetic_dit_adapter_state,
    with_dit_blocks,
)
from models.dit_families import canonical_dit_state, dit_family_of
from models.synthetic import nest_state

CASES = [(family, layout) for family, layouts in DIT_LAYOUTS.items() for layout in layouts]
# odd sizes on purpose: 3 tokens, 2 heads of 24, encoder width 20
DIMS = dict(hidden=48, heads=2, double_blocks=2, single_blocks=2, tokens=3, encoder_width=20)


def _state(family, layout=None, seed=0, **over):
    return synthetic_dit_adapter_state(family, layout, seed=seed, **{**DIMS, **over})


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("family,layout", CASES)
def test_every_layout_detected(family, layout):
    spec = detect_family(_state(family, layout))  # through the UNet entry point: it must dispatch
    assert spec.injection == family
    assert spec.tokens == 3 and spec.encoder_width == 20
    if family == "xlabs":
        assert (spec.architecture, spec.arch_hint, spec.encoder_kind, spec.encoder_input) == \
               ("flux", "flux", "clip", "image_embeds")
        assert spec.layer_blocks == (("double_block", 0), ("double_block", 1))
        assert spec.layer_dims == (48, 48) and not spec.time_conditioned
    elif family == "instantx-flux":
        assert (spec.architecture, spec.encoder_kind, spec.encoder_input) == ("flux", "siglip", "pooled")
        assert spec.layer_blocks == (("double_block", 0), ("double_block", 1), ("single_block", 0),
                                     ("single_block", 1))
    else:
        assert (spec.architecture, spec.arch_hint, spec.encoder_kind, spec.encoder_input) == \
               ("sd3", "sd3", "siglip", "penultimate")
        assert spec.time_conditioned and spec.ip_head_dim == 24 and spec.context_dim == 48
        assert spec.layer_blocks == (("double_block", 0), ("double_block", 1))


@pytest.mark.parametrize("family,layout", CASES)
def test_key_conversion_round_trip(family, layout):
    """Every layout converts to the same canonical state (same seed -> same tensors), and the loaded
    module's state dict is that state, tensor for tensor, without copies."""
    canonical_layout = {"xlabs": "diffusers"}.get(family, "instantx")
    family_seen, canon = canonical_dit_state(_state(family, layout))
    _, ref = canonical_dit_state(_state(family, canonical_layout))
    assert family_seen == family and canon.keys() == ref.keys()
    assert all(torch.equal(canon[k], ref[k]) for k in ref)
    raw = _state(family, layout)
    module = DiTAdapterWeights.from_state(nest_state(raw))
    own = module.state_dict()
    assert own.keys() == ref.keys()
    assert all(torch.equal(own[k], ref[k]) for k in ref)
    # assign=True: the file's tensors became the parameters
    assert {t.data_ptr() for t in raw.values()} == {t.data_ptr() for t in own.values()}


def _xlabs_published(tokens):
    s = {"ip_adapter_proj_model.proj.weight": (tokens * 4096, 768), "ip_adapter_proj_model.proj.bias": (tokens * 4096,),
         "ip_adapter_proj_model.norm.weight": (4096,), "ip_adapter_proj_model.norm.bias": (4096,)}
    for i in range(19):
        for kv in "kv":
            s[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = (3072, 4096)
            s[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = (3072,)
    return s


def _instantx_flux_published():
    s = {"image_proj.proj.0.weight": (2304, 1152), "image_proj.proj.0.bias": (2304,),
         "image_proj.proj.2.weight": (128 * 4096, 2304), "image_proj.proj.2.bias": (128 * 4096,),
         "image_proj.norm.weight": (4096,), "image_proj.norm.bias": (4096,)}
    for j in range(57):
        s[f"ip_adapter.{j}.to_k_ip.weight"] = (3072, 4096)
        s[f"ip_adapter.{j}.to_v_ip.weight"] = (3072, 4096)
    return s


def _instantx_sd3_published():
    p = "image_proj."
    s = {p + "latents": (1, 64, 1280), p + "proj_in.weight": (1280, 1152), p + "proj_in.bias": (1280,),
         p + "proj_out.weight": (2432, 1280), p + "proj_out.bias": (2432,), p + "norm_out.weight": (2432,),
         p + "norm_out.bias": (2432,), p + "time_embedding.linear_1.weight": (1280, 320),
         p + "time_embedding.linear_1.bias": (1280,), p + "time_embedding.linear_2.weight": (1280, 1280),
         p + "time_embedding.linear_2.bias": (1280,)}
    for i in range(4):
        q = f"{p}layers.{i}."
        s.update({q + "0.norm1.weight": (1280,), q + "0.norm1.bias": (1280,), q + "0.norm2.weight": (1280,),
                  q + "0.norm2.bias": (1280,), q + "0.to_q.weight": (1280, 1280), q + "0.to_kv.weight": (2560, 1280),
                  q + "0.to_out.weight": (1280, 1280), q + "1.0.weight": (1280,), q + "1.0.bias": (1280,),
                  q + "1.1.weight": (5120, 1280), q + "1.3.weight": (1280, 5120), q + "2.1.weight": (5120, 1280),
                  q + "2.1.bias": (5120,)})
    for j in range(38):
        q = f"ip_adapter.{j}."
        s.update({q + "norm_ip.linear.weight": (4864, 1280), q + "norm_ip.linear.bias": (4864,),
                  q + "to_k_ip.weight": (2432, 2432), q + "to_v_ip.weight": (2432, 2432),
                  q + "norm_q.weight": (64,), q + "norm_k.weight": (64,), q + "norm_ip_k.weight": (64,)})
    return s


@pytest.mark.parametrize("tokens", [4, 16])
def test_published_xlabs_shapes(tokens):
    spec = detect_family(_meta(_xlabs_published(tokens)))
    assert (spec.injection, spec.tokens, spec.context_dim, spec.encoder_width) == ("xlabs", tokens, 4096, 768)
    assert spec.encoder_name == "CLIP ViT-L/14" and spec.num_layers == 19
    assert spec.layer_blocks == tuple(("double_block", i) for i in range(19))
    assert set(spec.layer_dims) == {3072}
    assert "published" not in spec.describe() and f"{tokens} image tokens" in spec.describe()


def test_published_instantx_shapes():
    spec = detect_family(_meta(_instantx_flux_published()))
    assert (spec.tokens, spec.context_dim, spec.encoder_width, spec.proj_hidden_dim) == (128, 4096, 1152, 2304)
    assert spec.encoder_name == "SigLIP so400m-patch14-384"
    assert spec.layer_blocks == tuple(("double_block", i) for i in range(19)) + tuple(
        ("single_block", i) for i in range(38))
    spec = detect_family(_meta(_instantx_sd3_published()))
    assert (spec.tokens, spec.context_dim, spec.encoder_width, spec.num_layers) == (64, 2432, 1152, 38)
    assert (spec.resampler_dim, spec.resampler_heads, spec.resampler_depth, spec.resampler_ff_dim) == (1280, 20, 4, 5120)
    assert (spec.ip_head_dim, spec.time_embed_in) == (64, 320)
    assert "38 joint blocks" in spec.describe()


def test_unet_files_unaffected():
    from models.synthetic import synthetic_adapter_state

    flat = synthetic_adapter_state("base", [8, 8], context_dim=12, encoder_width=10)
    assert dit_family_of(flat) is None and detect_family(flat).architecture == "unet"
    # FaceID: the same MLP projection as InstantX Flux, but layers 1, 3, ... and LoRA keys: still refused
    faceid = {"image_proj.proj.0.weight": torch.zeros(16, 8), "image_proj.proj.0.bias": torch.zeros(16),
              "image_proj.proj.2.weight": torch.zeros(48, 16), "image_proj.proj.2.bias": torch.zeros(48),
              "image_proj.norm.weight": torch.ones(12), "image_proj.norm.bias": torch.zeros(12),
              "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 12), "ip_adapter.1.to_v_ip.weight": torch.zeros(8, 12),
              "ip_adapter.0.to_q_lora.down.weight": torch.zeros(2, 8)}
    assert dit_family_of(faceid) is None
    with pytest.raises(AdapterFormatError, match="FaceID"):
        detect_family(faceid)


def test_rebinding_blocks():
    spec = detect_dit_family(_state("instantx-flux"))
    assert with_dit_blocks(spec, 1, 3).layer_blocks == (("double_block", 0), ("single_block", 0),
                                                         ("single_block", 1), ("single_block", 2))
    with pytest.raises(AdapterFormatError, match="2 double \\+ 2 single as published.*3 double \\+ 3 single"):
        with_dit_blocks(spec, 3, 3)
    xl = detect_dit_family(_state("xlabs"))
    assert with_dit_blocks(xl, 19).layer_blocks == xl.layer_blocks  # a larger model: the first blocks
    with pytest.raises(AdapterFormatError, match="weights for 2 blocks, but the model has only 1"):
        with_dit_blocks(xl, 1)


# ---------------------------------------------------------------------------------------
# Damaged files


def _drop(key):
    return lambda s: s.pop(key)


def _put(key, t):
    return lambda s: s.update({key: t})


BROKEN = {
    "xlabs block gap": ("xlabs", "xlabs", lambda s: [s.pop(k) for k in list(s) if k.startswith("double_blocks.0.")],
                        ["gaps", "0"]),
    "xlabs missing v": ("xlabs", "xlabs", _drop("double_blocks.1.processor.ip_adapter_double_stream_v_proj.weight"),
                        ["block 1", "to_v_ip.weight is missing"]),
    "xlabs missing bias": ("xlabs", "xlabs", _drop("double_blocks.1.processor.ip_adapter_double_stream_k_proj.bias"),
                           ["XLabs Flux IP-Adapter", "missing", "ip_adapter.1.to_k_ip.bias"]),
    "xlabs token rows": ("xlabs", "xlabs", _put("ip_adapter_proj_model.proj.weight", torch.zeros(100, 20)),
                         ["100 rows", "not a multiple", "32"]),
    "xlabs k/v shapes": ("xlabs", "diffusers", _put("ip_adapter.0.to_v_ip.weight", torch.zeros(40, 32)),
                         ["block 0", "to_v_ip is (40, 32)"]),
    "xlabs context": ("xlabs", "diffusers", lambda s: s.update({"ip_adapter.1.to_k_ip.weight": torch.zeros(48, 30),
                                                                "ip_adapter.1.to_v_ip.weight": torch.zeros(48, 30)}),
                      ["reads width 30", "width 32", "do not belong together"]),
    "xlabs single stream": ("xlabs", "xlabs",
                            _put("single_blocks.0.processor.ip_adapter_single_stream_k_proj.weight", torch.zeros(4, 4)),
                            ["single-block", "v1, v2"]),
    "xlabs twice": ("xlabs", "xlabs", _put("image_proj.norm.weight", torch.ones(32)), ["appears twice"]),
    "xlabs integer": ("xlabs", "diffusers", _put("ip_adapter.0.to_k_ip.bias", torch.zeros(48, dtype=torch.int64)),
                      ["floating-point"]),
    "instantx no proj": ("instantx-flux", "instantx", _drop("image_proj.proj.0.weight"),
                         ["image_proj.proj.0.weight is missing"]),
    "instantx extra": ("instantx-flux", "instantx", _put("image_proj.mystery", torch.zeros(2)),
                       ["InstantX Flux", "unexpected", "image_proj.mystery"]),
    "sd3 no adaln": ("instantx-sd3", "instantx", _drop("ip_adapter.1.norm_ip.linear.weight"),
                     ["InstantX SD3.5", "missing", "ip_adapter.1.norm_ip.linear.weight"]),
    "sd3 no layers": ("instantx-sd3", "instantx", lambda s: [s.pop(k) for k in list(s) if ".layers." in k],
                      ["no 'image_proj.layers.*'"]),
    "sd3 head norm": ("instantx-sd3", "instantx",
                      lambda s: [s.update({f"ip_adapter.{i}.{n}.weight": torch.ones(20)}) for i in range(2)
                                 for n in ("norm_q", "norm_k", "norm_ip_k")],
                      ["K/V width 48", "not a multiple", "20"]),
    "sd3 resampler head": ("instantx-sd3", "instantx", _put("image_proj.layers.0.0.to_q.weight", torch.zeros(50, 64)),
                           ["50 rows", "head width 64"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_damaged_files_explained(name):
    family, layout, mutate, words = BROKEN[name]
    state = _state(family, layout)
    mutate(state)
    with pytest.raises(AdapterFormatError) as err:
        DiTAdapterWeights.from_state(state)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_nan_weights_refused():
    state = _state("instantx-sd3")
    state["ip_adapter.0.to_k_ip.weight"][0, 0] = float("nan")
    with pytest.raises(AdapterFormatError, match="NaN"):
        DiTAdapterWeights.from_state(state)


@pytest.mark.parametrize("family,layout", CASES)
def test_files_load_as_dit_weights(tmp_path, family, layout):
    for name, nested in (("a.safetensors", False), ("a.bin", True)):
        path = tmp_path / name
        save_synthetic_dit_adapter(path, family, layout, nested=nested, **DIMS)
        w = load_adapter_file(path)
        assert isinstance(w, DiTAdapterWeights) and w.spec.injection == family
    unet = tmp_path / "unet.safetensors"
    save_synthetic_adapter(unet, "base", [8, 8], context_dim=12, encoder_width=10)
    assert isinstance(load_adapter_file(unet), IPAdapterWeights)


def test_damaged_header_refused_before_data(tmp_path):
    """A safetensors DiT file missing a tensor is refused from its header, with the file's name first."""
    from safetensors.torch import save_file

    state = _state("xlabs", "xlabs")
    state.pop("double_blocks.1.processor.ip_adapter_double_stream_k_proj.weight")
    path = tmp_path / "flux-ip.safetensors"
    save_file(state, str(path))
    with open(path, "r+b") as f:  # ruin the data region: a preview must not need it
        f.seek(-16, 2)
        f.write(b"\xff" * 16)
    with pytest.raises(AdapterFormatError, match=r"^flux-ip\.safetensors: block 1: to_k_ip\.weight is missing"):
        load_adapter_file(path)


def test_dtypes():
    w = DiTAdapterWeights.from_state(_state("xlabs", dtype=torch.bfloat16))
    assert {p.dtype for p in w.parameters()} == {torch.bfloat16}
    mixed = _state("instantx-flux")
    mixed["image_proj.norm.weight"] = mixed["image_proj.norm.weight"].half()
    assert {p.dtype for p in DiTAdapterWeights.from_state(mixed).parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------
# The math, written out from the reference code (see models/dit_families.py), over the file's own key names


def _heads_rms(x, d, eps, gain=None):
    b, t, w = x.shape
    h = x.reshape(b, t, w // d, d)
    h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if gain is not None:
        h = h * gain
    return h.reshape(b, t, w)


def test_xlabs_math():
    sd = _state("xlabs", "xlabs", seed=3)
    w = DiTAdapterWeights.from_state(sd)
    emb = torch.randn(2, 20)
    p = "ip_adapter_proj_model."
    ref = F.layer_norm((emb @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]).reshape(2, 3, 32), (32,),
                       sd[p + "norm.weight"], sd[p + "norm.bias"])
    out = w.project(emb)
    assert out.time_emb is None
    torch.testing.assert_close(out.tokens, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.project(emb[0]).tokens, ref[:1], rtol=1e-5, atol=1e-5)  # no batch dim
    for i in range(2):
        q = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
        k, v = w.layer_kv(i, out, heads=2)
        torch.testing.assert_close(k, ref @ sd[q + "k_proj.weight"].T + sd[q + "k_proj.bias"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, ref @ sd[q + "v_proj.weight"].T + sd[q + "v_proj.bias"], rtol=1e-5, atol=1e-5)
    # plain tokens work too when nothing is time-conditioned
    torch.testing.assert_close(w.layer_kv(1, ref, heads=2)[0], w.layer_kv(1, out, heads=2)[0])


def test_instantx_flux_math():
    sd = _state("instantx-flux", seed=4)
    w = DiTAdapterWeights.from_state(sd)
    pooled = torch.randn(2, 20)
    h = F.gelu(pooled @ sd["image_proj.proj.0.weight"].T + sd["image_proj.proj.0.bias"])
    ref = F.layer_norm((h @ sd["image_proj.proj.2.weight"].T + sd["image_proj.proj.2.bias"]).reshape(2, 3, 32),
                       (32,), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])
    out = w.project(pooled)
    torch.testing.assert_close(out.tokens, ref, rtol=1e-5, atol=1e-5)
    for i in range(4):
        k, v = w.layer_kv(i, out, heads=2)
        # K: RMS over each 24-wide head, eps 1e-5, no gain; V untouched (the original InstantX file)
        torch.testing.assert_close(k, _heads_rms(ref @ sd[f"ip_adapter.{i}.to_k_ip.weight"].T, 24, 1e-5),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, ref @ sd[f"ip_adapter.{i}.to_v_ip.weight"].T, rtol=1e-5, atol=1e-5)
    # the norm depends on how the width splits into heads
    assert not torch.allclose(w.layer_kv(0, out, heads=4)[0], w.layer_kv(0, out, heads=2)[0], atol=1e-3)


def _ref_time_resampler(sd, x, t, prefix):
    """SD3.5 InstantX TimeResampler from its reference, over keys under `prefix` (image_proj.)."""
    P = lambda k: sd[prefix + k]  # noqa: E731
    tin = P("time_embedding.linear_1.weight").shape[1]
    half = tin // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t[:, None] * freqs[None]
    feats = torch.cat([torch.cos(ang), torch.sin(ang), torch.zeros(len(t), tin % 2)], dim=1)  # cosines first
    temb = F.silu(feats @ P("time_embedding.linear_1.weight").T + P("time_embedding.linear_1.bias"))
    temb = temb @ P("time_embedding.linear_2.weight").T + P("time_embedding.linear_2.bias")
    d = P("latents").shape[2]
    h = x @ P("proj_in.weight").T + P("proj_in.bias") + temb[:, None]
    lat = P("latents").repeat(x.shape[0], 1, 1)
    i = 0
    while f"{prefix}layers.{i}.0.to_q.weight" in sd:
        L = lambda k: P(f"layers.{i}.{k}")  # noqa: E731,B023
        mod = F.silu(temb) @ L("2.1.weight").T + L("2.1.bias")
        shift_a, scale_a, shift_f, scale_f = mod.chunk(4, dim=1)
        xn = F.layer_norm(h, (d,), L("0.norm1.weight"), L("0.norm1.bias"))
        ln = F.layer_norm(lat, (d,), L("0.norm2.weight"), L("0.norm2.bias")) * (1 + scale_a[:, None]) + shift_a[:, None]
        q = ln @ L("0.to_q.weight").T
        kv = torch.cat([xn, ln], dim=1) @ L("0.to_kv.weight").T
        k, v = kv[..., : q.shape[-1]], kv[..., q.shape[-1]:]
        nh = q.shape[-1] // 64
        sp = lambda z: z.reshape(z.shape[0], z.shape[1], nh, 64).transpose(1, 2)  # noqa: E731
        att = torch.softmax(sp(q) @ sp(k).transpose(-1, -2) / 8.0, dim=-1) @ sp(v)
        lat = lat + att.transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1) @ L("0.to_out.weight").T
        f = F.layer_norm(lat, (d,), L("1.0.weight"), L("1.0.bias")) * (1 + scale_f[:, None]) + shift_f[:, None]
        lat = lat + F.gelu(f @ L("1.1.weight").T) @ L("1.3.weight").T
        i += 1
    c = P("proj_out.weight").shape[0]
    return F.layer_norm(lat @ P("proj_out.weight").T + P("proj_out.bias"), (c,), P("norm_out.weight"),
                        P("norm_out.bias")), temb


def test_sd3_math():
    sd = _state("instantx-sd3", seed=5, resampler_depth=2, time_embed_in=33)
    w = DiTAdapterWeights.from_state(sd)
    hidden = torch.randn(3, 7, 20)
    t = torch.tensor([999.0, 500.0, 3.0])
    ref_tokens, temb = _ref_time_resampler(sd, hidden, t, "image_proj.")
    out = w.project(hidden, t)
    torch.testing.assert_close(out.tokens, ref_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.time_emb, temb, rtol=1e-4, atol=1e-5)
    # one timestep for the whole batch, as a float or a 0-d tensor
    same = w.project(hidden, 500.0)
    torch.testing.assert_close(same.tokens[1], out.tokens[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.project(hidden, torch.tensor(500.0)).tokens, same.tokens)
    assert not torch.allclose(out.tokens[0], w.project(hidden[:1], 400.0).tokens[0], atol=1e-3)

    for i in range(2):
        q = f"ip_adapter.{i}."
        shift, scale = (F.silu(temb) @ sd[q + "norm_ip.linear.weight"].T + sd[q + "norm_ip.linear.bias"]).chunk(2, 1)
        n = F.layer_norm(ref_tokens, (48,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        k, v = w.layer_kv(i, out, heads=2)
        torch.testing.assert_close(k, _heads_rms(n @ sd[q + "to_k_ip.weight"].T, 24, 1e-6, sd[q + "norm_ip_k.weight"]),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, n @ sd[q + "to_v_ip.weight"].T, rtol=1e-4, atol=1e-5)
        raw_q, raw_k = torch.randn(3, 10, 48), torch.randn(3, 10, 48)
        nq, nk = w.image_qk_norm(i, raw_q, raw_k, heads=2)
        torch.testing.assert_close(nq, _heads_rms(raw_q, 24, 1e-6, sd[q + "norm_q.weight"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nk, _heads_rms(raw_k, 24, 1e-6, sd[q + "norm_k.weight"]), rtol=1e-5, atol=1e-6)
        # (B, H, L, D) layout gives the same numbers
        bhld = raw_q.reshape(3, 10, 2, 24).transpose(1, 2)
        torch.testing.assert_close(w.image_qk_norm(i, bhld, bhld, heads=2)[0].transpose(1, 2).reshape(3, 10, 48), nq)


def test_sd3_diffusers_layout_same_math():
    a = DiTAdapterWeights.from_state(_state("instantx-sd3", "instantx", seed=6))
    b = DiTAdapterWeights.from_state(_state("instantx-sd3", "diffusers", seed=6))
    x = torch.randn(1, 5, 20)
    torch.testing.assert_close(a.project(x, 250.0).tokens, b.project(x, 250.0).tokens)


# ---------------------------------------------------------------------------------------
# Misuse gets a clear message


def test_misuse_messages():
    flux = DiTAdapterWeights.from_state(_state("instantx-flux"))
    with pytest.raises(ValueError, match="SigLIP.*pooled output.*E = 20.*\\(2, 768\\)"):
        flux.project(torch.randn(2, 768))  # a CLIP-L image_embeds into a SigLIP adapter
    with pytest.raises(ValueError, match="does not split into 5 heads"):
        flux.layer_kv(0, flux.project(torch.randn(1, 20)), heads=5)
    with pytest.raises(IndexError, match="4 layers"):
        flux.layer_kv(4, flux.project(torch.randn(1, 20)), heads=2)
    with pytest.raises(ValueError, match="for SD3.5 InstantX adapters"):
        flux.image_qk_norm(0, torch.randn(1, 2, 48), torch.randn(1, 2, 48), heads=2)
    sd3 = DiTAdapterWeights.from_state(_state("instantx-sd3"))
    with pytest.raises(ValueError, match="timestep.*1000 x sigma"):
        sd3.project(torch.randn(1, 5, 20))
    with pytest.raises(ValueError, match="penultimate.*\\(N, tokens, E\\) with E = 20.*\\(1, 5, 1024\\)"):
        sd3.project(torch.randn(1, 5, 1024), 10.0)  # a CLIP-H penultimate into a SigLIP adapter
    with pytest.raises(ValueError, match="3 values for 2"):
        sd3.project(torch.randn(2, 5, 20), torch.tensor([1.0, 2.0, 3.0]))
    out = sd3.project(torch.randn(1, 5, 20), 10.0)
    with pytest.raises(ValueError, match="time embedding"):
        sd3.layer_kv(0, out.tokens, heads=2)
    with pytest.raises(ValueError, match="per-head norms of width 24"):
        sd3.layer_kv(0, out, heads=4)
    assert isinstance(out, Projected) and out.time_emb.shape == (1, 64)


def test_unet_entry_points_on_dit_files():
    state = _state("xlabs", "xlabs")
    spec = detect_family(state)
    assert spec.family_name == "XLabs Flux IP-Adapter"
    from models import expected_shapes

    assert set(expected_shapes(spec)) == set(canonical_dit_state(state)[1])
    with pytest.raises(AdapterFormatError, match="XLabs Flux IP-Adapter; load it with DiTAdapterWeights"):
        IPAdapterWeights.from_state(state)


@pytest.mark.parametrize("shapes", [lambda: _xlabs_published(16), _instantx_flux_published, _instantx_sd3_published],
                         ids=["xlabs", "instantx-flux", "instantx-sd3"])
def test_published_shapes_build(shapes):
    """The full-size modules build from the published shapes (meta tensors: no memory) with the file's keys."""
    w = DiTAdapterWeights.from_state(_meta(shapes()))
    assert len(w.state_dict()) == len(shapes()) and w.spec.num_layers in (19, 38, 57)
    assert all(p.is_meta for p in w.parameters())
