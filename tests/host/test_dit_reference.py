"""The DiT references (dit_reference.py) against the real host's blocks, on the tiny DiTs of dit_models.py,
and what a dit replacement / an attention override can see in the host (0.3.64)."""
from __future__ import annotations

import pytest

import dit_models
import dit_reference as ref

BLOCK_BOUND = 1e-5  # max|host - reference| / max|reference|, fp32


def _ratio(got, want):
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


def _clone(x):
    if hasattr(x, "clone"):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x  # Chroma's ModulationOut tuples: read only by both sides


class Probe:
    """A dit replacement that calls original_block and logs (key, inputs, outputs), cloned: the host's
    blocks update txt (double) and x (single) in place."""

    def __init__(self, key, log, before=None):
        self.key, self.log, self.before = key, log, before

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        inputs = {k: _clone(v) for k, v in args.items() if k != "transformer_options"}
        if self.before is not None:
            args = self.before(self.key, args)
        out = extra["original_block"](args)
        self.log.append((self.key, inputs, {k: _clone(v) for k, v in out.items()}))
        return out


def _probe(kind, steps=1, before=None, **sample_kw):
    model = dit_models.build_dit(kind)
    log = []
    for key in dit_models.block_keys(model):
        model.set_model_patch_replace(Probe(key, log, before), "dit", key[0], key[1])
    latent = dit_models.sample_dit(model, kind, steps=steps, **sample_kw)
    return model, log, latent


def _reference(kind, block, key, a, **hooks):
    if kind == "sd3":
        txt, img = ref.sd3_joint_block(block, a["txt"], a["img"], a["vec"], **hooks)
        return {"txt": txt, "img": img}
    if key[0] == "double_block":
        img, txt = ref.flux_double_block(block, a["img"], a["txt"], a["vec"], a["pe"], **hooks)
        return {"img": img, "txt": txt}
    return {"img": ref.flux_single_block(block, a["img"], a["vec"], a["pe"], **hooks)}


# --------------------------------------------------------------------------------------------------
# Tiny models: built by the host, sampled by the host
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", dit_models.KINDS)
def test_tiny_dit_samples_and_noop_replacement_changes_nothing(kind):
    import torch
    model = dit_models.build_dit(kind)
    assert type(model.model).__name__ == {"flux": "Flux", "chroma": "Chroma", "sd3": "SD3"}[kind]
    plain = dit_models.sample_dit(model, kind, steps=3)
    assert plain.shape == (1, 16, 8, 8) and torch.isfinite(plain).all()
    calls = []

    def noop(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    patched = dit_models.build_dit(kind)
    keys = dit_models.block_keys(patched)
    for key in keys:
        patched.set_model_patch_replace(noop, "dit", key[0], key[1])
    again = dit_models.sample_dit(patched, kind, steps=3)
    assert len(calls) == 3 * len(keys)
    assert torch.equal(plain, again)
    # and the conditioning matters (the tiny model is not a constant function)
    other = dit_models.sample_dit(model, kind, steps=3, positive=dit_models.make_dit_cond(kind, seed=5))
    assert float((other - plain).abs().max()) > 1e-3 * float(plain.abs().max())


def test_tiny_flux_guidance_and_cfg_reach_the_model():
    model = dit_models.build_dit("flux")
    a = dit_models.sample_dit(model, "flux", positive=dit_models.make_dit_cond("flux", seed=1, guidance=3.5))
    b = dit_models.sample_dit(model, "flux", positive=dit_models.make_dit_cond("flux", seed=1, guidance=1.0))
    c = dit_models.sample_dit(model, "flux", cfg=2.0)
    assert float((a - b).abs().max()) > 0 and float((a - c).abs().max()) > 0


@pytest.mark.parametrize("kind", dit_models.KINDS)
def test_tiny_dit_file_round_trip(kind, tmp_path):
    """The writer's file gives the same model: SD3 through the host's file loader (UNETLoader's call),
    Flux / Chroma through the config in the file's metadata."""
    import torch
    import comfy.sd
    tm = dit_models.tiny_models()
    path = tm.write_tiny_dit(tmp_path / f"tiny_{kind}.safetensors", kind)
    if kind == "sd3":
        loaded = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    else:
        loaded = dit_models.load_tiny_dit_file(path)
    assert torch.equal(dit_models.sample_dit(loaded, kind), dit_models.sample_dit(dit_models.build_dit(kind), kind))


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_rope_pe_matches_the_host(kind):
    import torch
    dm = dit_models.diffusion_model(dit_models.build_dit(kind))
    ids = torch.zeros(2, 30, 3)
    ids[:, 6:, 1] = torch.arange(24).div(6, rounding_mode="floor").float()
    ids[:, 6:, 2] = (torch.arange(24) % 6).float() + 0.5
    mine = ref.rope_pe(ids, dm.params.axes_dim, dm.params.theta)
    host = dm.pe_embedder(ids)
    assert mine.shape == host.shape
    assert float((mine - host).abs().max()) <= 1e-6


def test_unrotate_round_trips():
    import torch
    from comfy.ldm.flux.math import apply_rope1
    g = torch.Generator().manual_seed(3)
    ids = torch.rand(1, 300, 3, generator=g) * 64
    pe = ref.rope_pe(ids, [16, 56, 56], 10000)
    q = torch.randn(1, 24, 300, 128, generator=g)
    rotated = apply_rope1(q, pe)  # the host's rotation
    assert float((ref.rotate(q, pe) - rotated).abs().max()) <= 1e-6 * float(q.abs().max())
    back = ref.unrotate(rotated, pe)
    assert float((back - q).abs().max()) <= 1e-6 * float(q.abs().max())


# --------------------------------------------------------------------------------------------------
# Each reference equals the host's block, on the inputs of a real sampling step
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", dit_models.KINDS)
def test_reference_blocks_equal_host_blocks(kind):
    model, log, _ = _probe(kind, steps=1, cfg=2.0)  # cfg 2: batch of 2 (cond, uncond)
    dm = dit_models.diffusion_model(model)
    seen = set()
    for key, inputs, out in log:
        want = _reference(kind, ref.host_block(dm, key), key, inputs)
        assert inputs["img"].shape[0] == 2
        for name, value in out.items():
            if value is None:  # SD3's last block: context pre_only
                assert want[name] is None
                continue
            r = _ratio(value, want[name])
            assert r <= BLOCK_BOUND, f"{kind} {key} {name}: {r:.3g}"
        seen.add(key)
    assert seen == set(dit_models.block_keys(model))


@pytest.mark.parametrize("kind", dit_models.KINDS)
def test_reference_blocks_sample_like_the_host(kind):
    """All blocks replaced by the references: the 3-step sampled latent matches the host's."""
    model = dit_models.build_dit(kind)
    want = dit_models.sample_dit(model, kind, steps=3, cfg=2.0)
    ref.install_reference_blocks(model, kind)
    got = dit_models.sample_dit(model, kind, steps=3, cfg=2.0)
    assert _ratio(got, want) <= 1e-4


# --------------------------------------------------------------------------------------------------
# The hooks add their term where documented
# --------------------------------------------------------------------------------------------------
def _first(log, key):
    return next(inputs for k, inputs, _ in log if k == key)


def _zero_rows(block, path, chunk, n_chunks):
    """A copy of `block` whose modulation Linear at `path` outputs 0 for chunk `chunk` (e.g. a gate)."""
    import copy
    import torch
    blk = copy.deepcopy(block)
    lin = blk.get_submodule(path)
    rows = lin.weight.shape[0] // n_chunks
    with torch.no_grad():
        lin.weight[chunk * rows:(chunk + 1) * rows] = 0
        lin.bias[chunk * rows:(chunk + 1) * rows] = 0
    return blk


def test_hooks_land_where_documented_flux():
    """ip_attn_out: before img_attn.proj (double, image rows) / linear2 (single, all rows);
    ip_residual: after the MLP, ungated. With the MLP gate zeroed the block is affine in the term."""
    import torch
    model, log, _ = _probe("flux", steps=1)
    dm = dit_models.diffusion_model(model)
    g = torch.Generator().manual_seed(9)
    hidden = dm.hidden_size
    a = _first(log, ("double_block", 1))
    blk = _zero_rows(dm.double_blocks[1], "img_mod.lin", 5, 6)  # img gate2 = 0: no MLP on img
    n_img = a["img"].shape[1]
    term = torch.randn(1, n_img, hidden, generator=g)
    seen = []
    with torch.no_grad():
        base = ref.flux_double_block(blk, a["img"], a["txt"], a["vec"], a["pe"])
        got = ref.flux_double_block(blk, a["img"], a["txt"], a["vec"], a["pe"],
                                    ip_attn_out=lambda qkv: seen.append(qkv) or term)
        gate1 = ref.linear(ref.silu(a["vec"][:, None]), blk.img_mod.lin).chunk(6, -1)[2]
        want = gate1 * (term @ blk.img_attn.proj.weight.t())
    assert torch.equal(got[1], base[1])  # txt untouched
    assert seen[0].q.shape == (1, blk.num_heads, n_img, hidden // blk.num_heads)
    assert _ratio(got[0] - base[0], want) <= 1e-5
    # ip_residual: after the MLP (real block, gate2 not zeroed), ungated
    real = dm.double_blocks[1]
    base = ref.flux_double_block(real, a["img"], a["txt"], a["vec"], a["pe"])
    with_res = ref.flux_double_block(real, a["img"], a["txt"], a["vec"], a["pe"], ip_residual=lambda qkv: term)
    assert _ratio(with_res[0] - base[0], term) <= 1e-6
    # single block: every row, through linear2's attention columns and the gate
    s = _first(log, ("single_block", 0))
    sblk = dm.single_blocks[0]
    term_s = torch.randn(1, s["img"].shape[1], hidden, generator=g)
    with torch.no_grad():
        got = ref.flux_single_block(sblk, s["img"], s["vec"], s["pe"], ip_attn_out=lambda qkv: term_s)
        base_s = ref.flux_single_block(sblk, s["img"], s["vec"], s["pe"])
        gate = ref.linear(ref.silu(s["vec"][:, None]), sblk.modulation.lin).chunk(3, -1)[2]
        want = gate * (term_s @ sblk.linear2.weight[:, :hidden].t())
    assert _ratio(got - base_s, want) <= 1e-5


def test_hooks_land_where_documented_sd3():
    """ip_attn_out: the x rows before x_block.attn.proj; the context stream is untouched."""
    import torch
    model, log, _ = _probe("sd3", steps=1)
    dm = dit_models.diffusion_model(model)
    a = _first(log, ("double_block", 0))
    blk = _zero_rows(dm.joint_blocks[0], "x_block.adaLN_modulation.1", 5, 6)  # gate_mlp = 0
    term = torch.randn(1, a["img"].shape[1], dm.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = ref.sd3_joint_block(blk, a["txt"], a["img"], a["vec"])
        got = ref.sd3_joint_block(blk, a["txt"], a["img"], a["vec"], ip_attn_out=lambda qkv: term)
        gate_msa = ref.linear(ref.silu(a["vec"]), blk.x_block.adaLN_modulation[1]).chunk(6, dim=1)[2]
        want = gate_msa[:, None] * (term @ blk.x_block.attn.proj.weight.t())
    assert torch.equal(got[0], base[0])
    assert _ratio(got[1] - base[1], want) <= 1e-5


def test_sd3_adapter_query_from_the_block_query():
    """InstantX SD3.5 normalises the raw q with its own norm_q; the override sees q normed by ln_q.
    renorm() turns one into the other exactly (up to rounding)."""
    import torch
    model, log, _ = _probe("sd3", steps=1)
    dm = dit_models.diffusion_model(model)
    a = _first(log, ("double_block", 0))
    blk = dm.joint_blocks[0]
    captured = []
    ref.sd3_joint_block(blk, a["txt"], a["img"], a["vec"], ip_attn_out=lambda qkv: captured.append(qkv) or 0)
    qkv = captured[0]
    w_adapter = 1 + 0.3 * torch.randn(qkv.q.shape[-1], generator=torch.Generator().manual_seed(2))
    want = ref.rms_norm(qkv.q_raw, w_adapter, 1e-6)
    got = ref.renorm(qkv.q, blk.x_block.attn.ln_q.weight, w_adapter)
    assert _ratio(got, want) <= 1e-6


# --------------------------------------------------------------------------------------------------
# What an optimized_attention_override in a copy of transformer_options sees
# --------------------------------------------------------------------------------------------------
class OverrideRecorder:
    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((tuple(a.clone() if hasattr(a, "clone") else a for a in args),
                           {k: v for k, v in kwargs.items() if k != "transformer_options"}))
        return func(*args, **kwargs)


def _with_override(recorders):
    def before(key, args):
        rec = OverrideRecorder()
        recorders.append((key, rec))
        to = dict(args["transformer_options"])  # a copy: the host's dict stays as it was
        assert "optimized_attention_override" not in to
        to["optimized_attention_override"] = rec
        return dict(args, transformer_options=to)
    return before


@pytest.mark.parametrize("kind", dit_models.KINDS)
def test_override_sees_every_block_attention(kind):
    import torch
    recorders = []
    model, log, latent = _probe(kind, steps=1, before=_with_override(recorders))
    plain = dit_models.sample_dit(dit_models.build_dit(kind), kind, steps=1)
    assert torch.equal(latent, plain)  # a pass-through override changes nothing
    dm = dit_models.diffusion_model(model)
    assert len(recorders) == len(log) == len(dit_models.block_keys(model))
    for (key, rec), (key2, inputs, _) in zip(recorders, log):
        assert key == key2
        assert len(rec.calls) == 1, f"{kind} {key}: {len(rec.calls)} attention calls"
        args, kwargs = rec.calls[0]
        captured = []
        _reference(kind, ref.host_block(dm, key), key, inputs, ip_attn_out=lambda qkv: captured.append(qkv) or 0)
        mine = captured[0]
        if kind == "sd3":
            # (q, k, v) positional, heads as a keyword, text rows first, after ln_q/ln_k, no RoPE;
            # q and k (B, L, H*D) but v (B, L, H, D) (the host's split_qkv leaves v per head)
            q, k, v = args
            assert len(args) == 3 and kwargs["heads"] == dm.num_heads and not kwargs.get("skip_reshape")
            n_txt = inputs["txt"].shape[1]
            n = n_txt + inputs["img"].shape[1]
            assert q.shape == k.shape == (1, n, dm.hidden_size)
            assert v.shape == (1, n, dm.num_heads, dm.hidden_size // dm.num_heads)
            v = v.reshape(1, n, -1)
            for got, want in ((q, mine.q), (k, mine.k), (v, mine.v)):
                assert _ratio(got[:, n_txt:], ref.merge_heads(want)) <= 1e-5
            continue
        # Flux / Chroma: (q, k, v, heads) positional, (B, H, L, D), skip_reshape=True, RoPE applied,
        # text rows first (double), mask keyword (None here)
        q, k, v, heads = args
        assert heads == dm.num_heads and kwargs["skip_reshape"] is True and kwargs["mask"] is None
        pe = inputs["pe"]
        assert q.shape[:2] == (1, heads) and q.shape[2] == pe.shape[2]
        n_txt = q.shape[2] - mine.q.shape[2]  # double: text rows, then image rows; single: all rows
        if key[0] == "double_block":
            assert n_txt == inputs["txt"].shape[1]
        else:
            assert n_txt == 0
        assert _ratio(ref.unrotate(q, pe)[:, :, n_txt:], mine.q) <= 1e-5
        assert _ratio(ref.unrotate(k, pe)[:, :, n_txt:], mine.k) <= 1e-5
        assert _ratio(v[:, :, n_txt:], mine.v) <= 1e-5


def test_flux_reference_latents_append_image_rows():
    """Kontext-style reference latents (cond "reference_latents") are appended to the image stream after the
    image tokens: double blocks get ceil(h/2)*ceil(w/2) + the reference tokens as img rows, single blocks
    text + both; the references still equal the host's blocks there."""
    import torch
    model = dit_models.build_dit("flux")
    log = []
    for key in dit_models.block_keys(model):
        model.set_model_patch_replace(Probe(key, log), "dit", key[0], key[1])
    cond = dit_models.make_dit_cond("flux", tokens=5)
    cond[0][1]["reference_latents"] = [torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(1))]
    dit_models.sample_dit(model, "flux", positive=cond, steps=1, latent_size=8)
    dm = dit_models.diffusion_model(model)
    for key, inputs, out in log:
        rows = 5 + 16 + 9 if key[0] == "single_block" else 16 + 9
        assert inputs["img"].shape[1] == rows and inputs["pe"].shape[2] == 5 + 16 + 9
        want = _reference("flux", ref.host_block(dm, key), key, inputs)
        for name, value in out.items():
            assert _ratio(value, want[name]) <= BLOCK_BOUND
