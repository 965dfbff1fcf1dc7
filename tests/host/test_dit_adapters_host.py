"""DiT adapters in the real host: the pack's nodes against references written from the public math.

For every family and model (XLabs and InstantX on tiny Flux and Chroma, InstantX SD3.5 on a tiny SD3.5-style
MMDiT) the adapter is applied with the pack's apply function, and the same sampling is run on a clone whose
blocks are all replaced by dit_reference's plain-torch blocks, with the image-prompt term of the family added
where its reference code adds it. The terms' K/V are computed here from the checkpoint tensors with the
formulas of each family written out (bias, per-head RMS norms, AdaLN), not with the pack's code.
Bound: max|Δ| / max|ref| <= 1e-4 on the 3-step latent, fp32 (the issue's bound)."""
from __future__ import annotations

import pytest

import dit_models
import dit_reference as ref
import util

BOUND = 1e-4
CASES = [("xlabs", "flux"), ("xlabs", "chroma"), ("instantx-flux", "flux"), ("instantx-flux", "chroma"),
         ("instantx-sd3", "sd3")]
ENCODER_WIDTH = 32
HEADS = 2


# --------------------------------------------------------------------------------------------------
# Encoders and adapters
# --------------------------------------------------------------------------------------------------
def tiny_encoder(tmp_path, kind: str, seed: int = 0):
    """A host ClipVisionModel: CLIP (image_embeds width 32) or SigLIP (hidden width 32, with a pooling
    head attached the way the pack's loader attaches it)."""
    import json

    torch = util.prepare_host().torch
    host = util.prepare_host()
    cfg = util.tiny_clip_vision_config(hidden_size=64, projection_dim=ENCODER_WIDTH)
    if kind == "siglip":
        cfg = dict(cfg, model_type="siglip_vision_model", hidden_size=ENCODER_WIDTH, hidden_act="gelu_pytorch_tanh")
        cfg.pop("projection_dim")
    path = tmp_path / f"{kind}_config.json"
    path.write_text(json.dumps(cfg))
    cv = host.clip_vision.ClipVisionModel(str(path))
    util.init_weights_(cv.model, seed=seed)
    if kind == "siglip":
        from ipadapter_fused.models.siglip_head import SigLIPPoolingHead
        from ipadapter_fused.nodes.encode import POOLING_HEAD_ATTR

        g = torch.Generator().manual_seed(seed + 100)
        head = SigLIPPoolingHead(ENCODER_WIDTH, 4, 2 * ENCODER_WIDTH)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
        setattr(cv, POOLING_HEAD_ATTR, head.eval())
    return cv


def tiny_adapter(tmp_path, family: str, kind: str, seed: int = 0, layout=None):
    """(LoadedAdapter, flat checkpoint state) of a random adapter shaped for the tiny `kind` model,
    written to a file in the family's published layout and read back by the pack's loader."""
    import comfy.model_patcher
    import torch

    from ipadapter_fused.models import load_adapter_file
    from ipadapter_fused.models.synthetic import save_synthetic_dit_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter

    from ipadapter_fused.nodes.dit_sites import dit_model

    model = dit_model(dit_models.diffusion_model(dit_models.build_dit(kind)))
    kinds = [s.block for s in model.blocks]
    dims = dict(hidden=model.hidden_size, heads=model.heads, tokens=4, encoder_width=ENCODER_WIDTH,
                double_blocks=len(kinds) - kinds.count("single"))
    if kind != "sd3":
        dims.update(single_blocks=kinds.count("single"))
    path = tmp_path / f"{family}_{kind}_{seed}.safetensors"
    state = save_synthetic_dit_adapter(path, family, layout, seed=seed, **dims)
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(weights, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return LoadedAdapter(name=path.name, weights=weights, patcher=patcher), state


def image(seed=0, n=1, size=64):
    torch = util.prepare_host().torch
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def encoder_outputs(cv, family, img):
    """(positive, negative) encoder outputs, taken straight from the host model, with each family's
    negative convention (XLabs: a black image; InstantX Flux: the positive; SD3.5: zero hidden states)."""
    torch = util.prepare_host().torch
    if family == "xlabs":
        pos = cv.encode_image(img)["image_embeds"]
        neg = cv.encode_image(torch.zeros(1, cv.image_size, cv.image_size, 3))["image_embeds"]
    elif family == "instantx-flux":
        from ipadapter_fused.nodes.encode import POOLING_HEAD_ATTR
        head = getattr(cv, POOLING_HEAD_ATTR)
        pos = head(cv.encode_image(img)["last_hidden_state"])
        neg = pos
    else:
        pos = cv.encode_image(img)["penultimate_hidden_states"]
        neg = torch.zeros_like(pos)
    return pos.float(), neg.float()


# --------------------------------------------------------------------------------------------------
# The families' K/V, written out from the checkpoint tensors
# --------------------------------------------------------------------------------------------------
def _lin(x, state, name, bias=True):
    out = x @ state[name + ".weight"].float().t()
    if bias and name + ".bias" in state:
        out = out + state[name + ".bias"].float()
    return out


def _heads(x, heads):
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def _rms(x, eps, weight=None):
    import torch
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


def family_kv(family, state, layer, tokens, temb=None, heads=HEADS):
    """K, V (B, H, T, D) of one adapter layer for image tokens (B, T, C)."""
    import torch.nn.functional as F

    if family == "xlabs":
        p = f"double_blocks.{layer}.processor.ip_adapter_double_stream_"
        return _heads(_lin(tokens, state, p + "k_proj"), heads), _heads(_lin(tokens, state, p + "v_proj"), heads)
    p = f"ip_adapter.{layer}."
    if family == "instantx-flux":
        k = _heads(_lin(tokens, state, p + "to_k_ip", bias=False), heads)
        return _rms(k, 1e-5), _heads(_lin(tokens, state, p + "to_v_ip", bias=False), heads)
    shift, scale = _lin(F.silu(temb), state, p + "norm_ip.linear").chunk(2, dim=-1)
    n = F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    k = _rms(_heads(_lin(n, state, p + "to_k_ip", bias=False), heads), 1e-6, state[p + "norm_ip_k.weight"])
    return k, _heads(_lin(n, state, p + "to_v_ip", bias=False), heads)


class _Now:
    """cond_or_uncond and sigma of the block call the reference is computing (hooks see only q/k/v)."""
    options: dict = {}


class RowAwareReference(ref.ReferenceBlock):
    def __call__(self, args, extra):
        _Now.options = args.get("transformer_options") or {}
        return super().__call__(args, extra)


def reference_model(base, kind, family, state, weights, pos, neg, weight, mask_rows=None, layers=None,
                    timestep=None):
    """A clone of `base` whose blocks are the plain-torch references plus the family's term.
    mask_rows: optional (image tokens,) weights applied to the term's image rows."""
    torch = util.prepare_host().torch
    model = base.clone()
    dm = model.get_model_object("diffusion_model")
    sampling = model.get_model_object("model_sampling")
    spec = weights.spec
    with torch.no_grad():
        fixed = None if spec.time_conditioned else (weights.project(pos).tokens, weights.project(neg).tokens)

    def tokens_for(rows_sigma):
        if fixed is not None:
            return [(t, None) for t in fixed]
        t = float(sampling.timestep(rows_sigma.reshape(-1)[:1]).reshape(-1)[0])
        out = []
        for e in (pos, neg):
            pr = weights.project(e, torch.full((e.shape[0],), t))
            out.append((pr.tokens, pr.time_emb))
        return out

    def kv_for_batch(layer, batch):
        cou = list(_Now.options.get("cond_or_uncond") or [0])
        rows = tokens_for(_Now.options["sigmas"])
        kv = [family_kv(family, state, layer, t, temb) for t, temb in rows]
        per = batch // len(cou)
        idx = [1 if c == 1 else 0 for c in cou for _ in range(per)]
        k = torch.cat([kv[i][0] for i in idx])
        v = torch.cat([kv[i][1] for i in idx])
        return k, v

    def term(layer, kind_of_block):
        def hook(qkv):
            k, v = kv_for_batch(layer, qkv.q.shape[0])
            if family == "instantx-sd3":
                q = ref.rms_norm(qkv.q_raw, state[f"ip_adapter.{layer}.norm_q.weight"], 1e-6)
                kk = torch.cat([ref.rms_norm(qkv.k_raw, state[f"ip_adapter.{layer}.norm_k.weight"], 1e-6), k], dim=2)
                out = ref.attention(q, kk, torch.cat([qkv.v, v], dim=2))
            else:
                out = ref.attention(qkv.q, k, v)
            out = weight * out
            if mask_rows is not None:
                rows = mask_rows
                if kind_of_block == "single":  # text rows first: not covered by the mask
                    rows = torch.cat([torch.ones(out.shape[1] - rows.shape[0]), rows])
                out = out * rows[None, :, None]
            return out
        return hook

    hooks = {}
    for layer, key in enumerate(spec.layer_blocks):
        if layers is not None and layer not in layers:
            continue
        key = tuple(key)
        slot = "ip_residual" if family == "xlabs" else "ip_attn_out"
        hooks[key] = {slot: term(layer, "single" if key[0] == "single_block" else "double")}
    for key in dit_models.block_keys(model):
        block = ref.host_block(dm, key)
        model.set_model_patch_replace(RowAwareReference(block, key, kind, **hooks.get(key, {})), "dit", key[0], key[1])
    return model


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _setup(tmp_path, family, kind):
    base = dit_models.build_dit(kind)
    adapter, state = tiny_adapter(tmp_path, family, kind)
    cv = tiny_encoder(tmp_path, "clip" if family == "xlabs" else "siglip")
    return base, adapter, state, cv


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_matches_the_reference_blocks_on_a_sampled_latent(host, tmp_path, family, kind):
    from ipadapter_fused.nodes.apply import apply_adapter

    base, adapter, state, cv = _setup(tmp_path, family, kind)
    img = image(1)
    cfg = 2.0 if kind == "sd3" else 1.0  # SD3 samples with CFG: the negative rows matter there
    patched = apply_adapter(base, adapter, cv, img, weight=0.8)
    got = dit_models.sample_dit(patched, kind, cfg=cfg, latent_size=8)

    pos, neg = encoder_outputs(cv, family, img)
    want = dit_models.sample_dit(reference_model(base, kind, family, state, adapter.weights, pos, neg, 0.8), kind,
                                 cfg=cfg, latent_size=8)
    plain = dit_models.sample_dit(base, kind, cfg=cfg, latent_size=8)
    assert rel(got, want) <= BOUND, f"{family} on {kind}: {rel(got, want):.2e}"
    # the term must matter, or the comparison above proves nothing
    assert rel(want, plain) > 100 * BOUND, f"the adapter barely changes the latent ({rel(want, plain):.1e})"


def test_masked_term_on_an_odd_latent(host, tmp_path):
    """A mask over the left part of a 9x7 latent: tokens of the padded 5x4 grid take the mean of the
    latent cells they cover (padding excluded); text rows of single blocks keep the whole term."""
    import torch
    import torch.nn.functional as F

    from ipadapter_fused.nodes.apply import apply_adapter

    family, kind = "instantx-flux", "flux"
    base, adapter, state, cv = _setup(tmp_path, family, kind)
    img = image(2)
    mask = torch.zeros(1, 72, 56)
    mask[:, :, :20] = 1.0
    patched = apply_adapter(base, adapter, cv, img, weight=1.0, attn_mask=mask)
    latent = dit_models.dit_latent(kind, 9, 1, 7)

    def run(model):
        host_mod = util.prepare_host()
        noise = host_mod.sample.prepare_noise(latent, 0)
        pos_c = dit_models.make_dit_cond(kind, model, seed=1)
        neg_c = dit_models.make_dit_cond(kind, model, seed=2)
        with torch.inference_mode():
            return host_mod.sample.sample(model, noise, 3, 1.0, "euler", "simple", pos_c, neg_c, latent,
                                          disable_pbar=True, seed=0)

    cells = F.interpolate(mask[:, None], size=(9, 7), mode="bilinear")[0, 0]
    padded = torch.zeros(10, 8)
    count = torch.zeros(10, 8)
    padded[:9, :7], count[:9, :7] = cells, 1.0
    rows = (padded.reshape(5, 2, 4, 2).sum((1, 3)) / count.reshape(5, 2, 4, 2).sum((1, 3))).reshape(-1)
    pos, neg = encoder_outputs(cv, family, img)
    want = run(reference_model(base, kind, family, state, adapter.weights, pos, neg, 1.0, mask_rows=rows))
    got = run(patched)
    assert rel(got, want) <= BOUND
    unmasked = run(reference_model(base, kind, family, state, adapter.weights, pos, neg, 1.0))
    assert rel(unmasked, want) > 100 * BOUND


def test_two_adapters_stack_and_a_foreign_replacement_keeps_working(host, tmp_path):
    """Two XLabs apply nodes on one model sum their terms; a dit replacement another pack had put on a
    block is still called, with this pack's block as its original_block."""
    from ipadapter_fused.nodes.apply import apply_adapter

    family, kind = "xlabs", "flux"
    base, adapter, state, cv = _setup(tmp_path, family, kind)
    calls = []

    def foreign(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    model = base.clone()
    model.set_model_patch_replace(foreign, "dit", "double_block", 1)
    a, b = image(3), image(4)
    patched = apply_adapter(apply_adapter(model, adapter, cv, a, weight=0.6), adapter, cv, b, weight=0.5)
    got = dit_models.sample_dit(patched, kind)
    assert calls, "the foreign dit replacement was never called"

    ref_model = base.clone()
    pos_a, neg_a = encoder_outputs(cv, family, a)
    pos_b, neg_b = encoder_outputs(cv, family, b)
    one = reference_model(base, kind, family, state, adapter.weights, pos_a, neg_a, 0.6)
    two = reference_model(base, kind, family, state, adapter.weights, pos_b, neg_b, 0.5)
    # both terms on one reference block: chain the hooks of the two reference models
    dit = ref_model.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("dit", {})
    for key in dit_models.block_keys(base):
        r1 = one.model_options["transformer_options"]["patches_replace"]["dit"][key]
        r2 = two.model_options["transformer_options"]["patches_replace"]["dit"][key]
        hooks = {}
        if r1.ip_residual is not None:
            hooks["ip_residual"] = (lambda f, g: (lambda qkv: f(qkv) + g(qkv)))(r1.ip_residual, r2.ip_residual)
        dit[key] = RowAwareReference(r1.block, key, kind, **hooks)
    want = dit_models.sample_dit(ref_model, kind)
    assert rel(got, want) <= BOUND


def test_the_model_and_the_run_are_left_clean(host, tmp_path):
    """The unpatched model samples exactly as before, and run caches are empty after sampling."""
    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.dit_patch import dit_prompts

    family, kind = "instantx-sd3", "sd3"
    base, adapter, state, cv = _setup(tmp_path, family, kind)
    before = dit_models.sample_dit(base, kind, cfg=2.0)
    patched = apply_adapter(base, adapter, cv, image(5), weight=1.0)
    dit_models.sample_dit(patched, kind, cfg=2.0)
    after = dit_models.sample_dit(base, kind, cfg=2.0)
    assert bool((before == after).all())
    assert "dit" not in base.model_options.get("transformer_options", {}).get("patches_replace", {})
    prompts = dit_prompts(patched.model_options)
    assert prompts and all(not p._cache for p in prompts)


# --------------------------------------------------------------------------------------------------
# Errors before sampling
# --------------------------------------------------------------------------------------------------
def test_architecture_mismatches_are_named(host, tmp_path, tiny_sd15):
    from ipadapter_fused.nodes.apply import apply_adapter

    flux_adapter, _ = tiny_adapter(tmp_path, "xlabs", "flux")
    sd3_adapter, _ = tiny_adapter(tmp_path, "instantx-sd3", "sd3")
    clip = tiny_encoder(tmp_path, "clip")
    siglip = tiny_encoder(tmp_path, "siglip")
    with pytest.raises(ValueError, match="XLabs Flux IP-Adapter.*SD3 model"):
        apply_adapter(dit_models.build_dit("sd3"), flux_adapter, clip, image())
    with pytest.raises(ValueError, match="SD3.5 IP-Adapter.*Flux model"):
        apply_adapter(dit_models.build_dit("flux"), sd3_adapter, siglip, image())
    with pytest.raises(ValueError, match="model is a UNet"):
        apply_adapter(tiny_sd15(), flux_adapter, clip, image())
    with pytest.raises(ValueError, match="needs a SigLIP vision model.*CLIP vision model"):
        apply_adapter(dit_models.build_dit("sd3"), sd3_adapter, clip, image())
    with pytest.raises(ValueError, match="needs a CLIP vision model.*SigLIP vision model"):
        apply_adapter(dit_models.build_dit("flux"), flux_adapter, siglip, image())
    with pytest.raises(ValueError, match="style transfer.*no meaning on a DiT"):
        apply_adapter(dit_models.build_dit("flux"), flux_adapter, clip, image(), weight_type="style transfer")


def test_a_unet_adapter_on_a_dit_is_refused(host, tmp_path):
    import comfy.model_patcher
    import torch

    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter

    path = tmp_path / "unet.safetensors"
    save_synthetic_adapter(path, "base", [320] * 16, 768, ENCODER_WIDTH)
    weights = load_adapter_file(path)
    adapter = LoadedAdapter(path.name, weights, comfy.model_patcher.ModelPatcher(
        weights, load_device=torch.device("cpu"), offload_device=torch.device("cpu")))
    with pytest.raises(ValueError, match="made for SD1.5/SDXL UNets, but the model is a Flux model"):
        apply_adapter(dit_models.build_dit("flux"), adapter, tiny_encoder(tmp_path, "clip"), image())


@pytest.mark.parametrize("family", ["xlabs", "instantx-flux"])
def test_reference_latent_rows_are_left_untouched(host, tmp_path, family):
    """Kontext-style reference latents append rows to the image stream; the term covers the image
    rows of the sampled latent only (and, in single blocks, the text rows)."""
    import torch

    from ipadapter_fused.nodes.apply import apply_adapter

    kind = "flux"
    base, adapter, state, cv = _setup(tmp_path, family, kind)
    img = image(6)
    g = torch.Generator().manual_seed(7)
    reference = torch.randn(1, 16, 6, 4, generator=g)
    latent = dit_models.dit_latent(kind, 8)

    def run(model):
        host_mod = util.prepare_host()
        pos_c = dit_models.make_dit_cond(kind, model, seed=1)
        pos_c[0][1]["reference_latents"] = [reference]
        neg_c = dit_models.make_dit_cond(kind, model, seed=2)
        noise = host_mod.sample.prepare_noise(latent, 0)
        with torch.inference_mode():
            return host_mod.sample.sample(model, noise, 3, 1.0, "euler", "simple", pos_c, neg_c, latent,
                                          disable_pbar=True, seed=0)

    n_img, n_ref = 4 * 4, 3 * 2
    rows = torch.cat([torch.ones(n_img), torch.zeros(n_ref)])
    pos, neg = encoder_outputs(cv, family, img)
    got = run(apply_adapter(base, adapter, cv, img, weight=1.0))
    want = run(reference_model(base, kind, family, state, adapter.weights, pos, neg, 1.0, mask_rows=rows))
    assert rel(got, want) <= BOUND
    everywhere = run(reference_model(base, kind, family, state, adapter.weights, pos, neg, 1.0,
                                     mask_rows=torch.ones(n_img + n_ref)))
    assert rel(everywhere, want) > 100 * BOUND, "the reference rows should have changed the result"
