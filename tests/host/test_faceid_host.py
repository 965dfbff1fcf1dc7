"""Face families in the real host: tiny SD1.5 / SDXL UNets, the tiny InsightFace pack run by the real
insightface package on onnxruntime, synthetic face adapters in the published key layouts, applied with
'Apply IPAdapter (Fused)' (its LoRA included). Compared with a reference built independently:

- the face found by insightface's own FaceAnalysis (not the pack's wrapper), its embedding recomputed from
  the aligned crop (tiny_faces.recognizer_reference) and normed or not as the family reads it;
- FaceID / Portrait tokens by the MLP formula written out here; FaceID Plus, the face-embedding resampler
  and Kolors FaceID-Plus through the pack's projection (tested against written-out formulas in
  tests/test_face_projections.py) fed with CLIP states of crops made here;
- the LoRA as the user would load the separately published file: written in its key layout and loaded
  with the host's own LoRA loader;
- the decoupled attention written out on every layer (test_ipadapter_host.FormulaAttn2)."""
from __future__ import annotations

import pytest
import util

pytest.importorskip("insightface", reason="the face tests need insightface and onnxruntime "
                                          "(pip install -r requirements-face.txt)")

CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


def _tiny_faces():
    import importlib

    util.load_runner()
    return importlib.import_module("ipaf_runner.tiny_faces")


@pytest.fixture(autouse=True)
def _unloaded(host):
    """The host keeps the last sampled clone loaded with its LoRA merged into the weights the tiny UNets'
    clones share: unload before and after."""
    host.mm.unload_all_models()
    yield
    host.mm.unload_all_models()


def _face_image(torch, squares=((70, 60, 72),), size=224):
    rgb = _tiny_faces().draw_faces(size, size, squares)
    return rgb, torch.from_numpy(rgb).float().div(255.0)[None]


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory):
    return _tiny_faces().write_pack(tmp_path_factory.mktemp("insightface"))


def _analysis(pack, **options):
    from ipadapter_fused.face.analysis import DetectOptions, load_face_analysis

    return load_face_analysis(str(pack), "CPU", DetectOptions(**options))


def _reference_faces(pack, rgb):
    """insightface's own FaceAnalysis on the picture: (kps, embedding recomputed from the aligned crop)."""
    import numpy as np
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align

    app = FaceAnalysis(name=str(pack), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    faces = app.get(bgr)
    assert faces, "the tiny detector finds the drawn face"
    face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    aligned = face_align.norm_crop(bgr, landmark=face.kps, image_size=112)
    emb = _tiny_faces().recognizer_reference(aligned)
    np.testing.assert_allclose(face.embedding, emb, rtol=1e-4, atol=1e-4)
    return face.kps, emb


def _crop(torch, rgb, kps, size):
    import numpy as np
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    crop = face_align.norm_crop(bgr, landmark=kps, image_size=size)[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop)).float().div(255.0)[None]


def _adapter(host, model, kind, tmp_path, **dims):
    import comfy.model_patcher

    from ipadapter_fused.models import load_adapter_file
    from ipadapter_fused.models.synthetic import save_synthetic_face_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    arch = "sd15" if sites[0].context_dim == 768 else ("kolors" if kind == "kolors-faceid-plus" else "sdxl")
    path = tmp_path / f"{kind}_{arch}.safetensors"
    state = save_synthetic_face_adapter(path, kind, arch, "tiny", model_channels=util.DEFAULT_CHANNELS[
        "sd15" if arch == "sd15" else "sdxl"], **dims)
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(weights, load_device=host.torch.device("cpu"),
                                               offload_device=host.torch.device("cpu"))
    return LoadedAdapter(name=path.name, weights=weights, patcher=patcher), state


def _lora_from_state(state):
    lora = {}
    for key, t in state.items():
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "ip_adapter" and parts[2].endswith("_lora"):
            n, proj, which = int(parts[1]), parts[2][3:-5], parts[3]
            pair = lora.setdefault(n, {}).setdefault(proj, [None, None])
            pair[0 if which == "down" else 1] = t
    return {n: {p: tuple(v) for p, v in d.items()} for n, d in lora.items()}


def _with_published_lora(model, state, kind, tmp_path):
    """The reference model with the adapter's LoRA loaded as users load the separately published file."""
    import comfy.sd
    import faceid_lora_files
    import safetensors.torch

    lora = _lora_from_state(state)
    unet = model.get_model_object("diffusion_model")
    nrb = model.model.model_config.unet_config["num_res_blocks"]
    file_state = faceid_lora_files.published_lora_state_dict(lora, unet, nrb)
    path = tmp_path / "published_lora.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in file_state.items()}, str(path))
    patched, _ = comfy.sd.load_lora_for_models(model, None, safetensors.torch.load_file(str(path)), 1.0, 0)
    return patched


def _mlp_tokens(torch, state, e, tokens, c):
    F = torch.nn.functional
    h = F.gelu(F.linear(e, state["image_proj.proj.0.weight"], state["image_proj.proj.0.bias"]))
    x = F.linear(h, state["image_proj.proj.2.weight"], state["image_proj.proj.2.bias"]).reshape(-1, tokens, c)
    return F.layer_norm(x, (c,), state["image_proj.norm.weight"], state["image_proj.norm.bias"])


CASES = [
    ("sd15", "faceid", {}, dict(weight=0.9)),
    ("sd15", "portrait", {}, dict(weight=1.1, n_faces=2)),
    ("sdxl", "faceid-plus", dict(clip_width=64), dict(weight=0.8, structure="V2 (shortcut on)", structure_weight=1.5)),
    ("sd15", "faceid-plus", dict(clip_width=64), dict(weight=1.0, structure="V1 (shortcut off)")),
    ("sdxl", "face-resampler", {}, dict(weight=0.7)),
    ("sdxl", "kolors-faceid-plus", dict(clip_width=64), dict(weight=0.9)),
]


@pytest.mark.parametrize("kind,family,dims,opts", CASES, ids=[f"{a}-{b}" for a, b, _, _ in CASES])
def test_face_family_matches_formula_on_every_layer(host, kind, family, dims, opts, tiny_sd15, tiny_sdxl,
                                                    tiny_clip_vision, sampler, cond, face_pack, tmp_path):
    from test_ipadapter_host import FormulaAttn2

    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.encoders import FaceOptions
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    unet = model.get_model_object("diffusion_model")
    if family == "kolors-faceid-plus":
        # what a Kolors UNet carries (its text path's 4096 -> 2048 projection); here at the tiny token width
        g = torch.Generator().manual_seed(5)
        proj = torch.nn.Linear(256, 2048)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(2048, 256, generator=g) / 16)
            proj.bias.copy_(0.05 * torch.randn(2048, generator=g))
        unet.encoder_hid_proj = proj  # on the shared tiny UNet for this test only (removed below)
    adapter, state = _adapter(host, model, family, tmp_path, **dims)
    spec = adapter.spec
    cv = tiny_clip_vision(**CLIP)
    squares = [((20, 40, 70),), ((120, 70, 64),)][:opts.get("n_faces", 1)]
    pictures = [_face_image(torch, sq) for sq in squares]
    image = torch.cat([t for _, t in pictures])
    options = FaceOptions(structure=opts.get("structure", "auto"), structure_weight=opts.get("structure_weight", 1.0))
    weight = opts["weight"]

    patched = apply_adapter(model, adapter, cv, image, weight=weight, middle_block="patch",
                            insightface=_analysis(face_pack), face=options)
    try:
        got = sampler(patched, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)

        # -- the reference, built without the pack's apply path --------------------------------------
        found = [_reference_faces(face_pack, rgb) for rgb, _ in pictures]
        e = torch.stack([torch.from_numpy(emb).float() for _, emb in found])
        if spec.face.embedding == "normed":
            e = e / e.norm(dim=-1, keepdim=True)
        zeros = torch.zeros_like(e)
        if spec.layout == "faceid":
            pos, neg = (_mlp_tokens(torch, state, x, spec.tokens, spec.context_dim) for x in (e, zeros))
        else:
            w = adapter.weights
            with torch.no_grad():
                if spec.face.uses_clip:
                    crops = torch.cat([_crop(torch, rgb, kps, spec.face.crop_size)
                                       for (rgb, _), (kps, _) in zip(pictures, found)])
                    clip_pos = cv.encode_image(crops)["penultimate_hidden_states"]
                    clip_neg = cv.encode_image(torch.zeros(1, 224, 224, 3))["penultimate_hidden_states"]
                    s = options.structure_weight if family == "kolors-faceid-plus" or options.structure.startswith(
                        "V2") else None
                    pos = w.image_tokens(e, clip_hidden=clip_pos, shortcut_scale=s)
                    neg = w.image_tokens(zeros, clip_hidden=clip_neg.expand_as(clip_pos), shortcut_scale=s)
                else:
                    pos, neg = w.image_tokens(e), w.image_tokens(zeros)
            if family == "kolors-faceid-plus":
                pos, neg = (torch.nn.functional.linear(t, proj.weight, proj.bias) for t in (pos, neg))
        tokens = torch.stack([pos, neg])

        reference = _with_published_lora(model, state, kind, tmp_path) if spec.lora is not None else model.clone()
        sites = unet_attn2_sites(unet)
        for i, site in enumerate(sites):
            reference.set_model_attn2_replace(FormulaAttn2(state, 2 * i + 1, tokens, weight), *site.key)
        want = sampler(reference, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)
        plain = sampler(model, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)
        assert (want - plain).abs().max() > 0.1 * want.abs().max(), "the adapter must change the result"
        keys = [s.key for s in sites]
        log = util.compare_layers(patched, reference, kind, keys)
        assert sorted({k for k, _, _ in log}) == sorted(keys), "every site is patched and called"
        util.assert_layers_match(log)
        util.assert_latents_match(got, want)
    finally:
        if family == "kolors-faceid-plus":
            del unet.encoder_hid_proj


def test_lora_off_warns_and_leaves_weights(host, tiny_sd15, tiny_clip_vision, face_pack, tmp_path, caplog):
    from ipadapter_fused.nodes.apply import apply_adapter

    torch = host.torch
    model = tiny_sd15()
    adapter, _ = _adapter(host, model, "faceid", tmp_path)
    _, image = _face_image(torch)
    cv = tiny_clip_vision(**CLIP)
    on = apply_adapter(model, adapter, cv, image, insightface=_analysis(face_pack))
    with caplog.at_level("WARNING"):
        off = apply_adapter(model, adapter, cv, image, insightface=_analysis(face_pack), faceid_lora_strength=0.0)
    assert len(on.patches) == 4 * 2 * adapter.spec.num_layers  # q, k, v, out of attn1 and attn2 per block
    assert not off.patches and not model.patches
    assert any("LoRA" in r.getMessage() for r in caplog.records)


def test_face_family_needs_insightface(host, tiny_sd15, tiny_clip_vision, tmp_path):
    from ipadapter_fused.nodes.apply import apply_adapter

    torch = host.torch
    model = tiny_sd15()
    adapter, _ = _adapter(host, model, "faceid", tmp_path)
    _, image = _face_image(torch)
    with pytest.raises(ValueError, match="InsightFace Loader"):
        apply_adapter(model, adapter, tiny_clip_vision(**CLIP), image)
    assert not model.patches


def test_no_face_is_a_clear_error_before_any_patch(host, tiny_sd15, tiny_clip_vision, face_pack, tmp_path):
    from ipadapter_fused.nodes.apply import apply_adapter

    torch = host.torch
    model = tiny_sd15()
    adapter, _ = _adapter(host, model, "faceid", tmp_path)
    _, face = _face_image(torch)
    blank = torch.full_like(face, 0.05)
    with pytest.raises(ValueError, match="image 2"):
        apply_adapter(model, adapter, tiny_clip_vision(**CLIP), torch.cat([face, blank]),
                      insightface=_analysis(face_pack))
    assert not model.patches
    # with skipping on, the face-less picture drops out and the other one is used
    patched = apply_adapter(model, adapter, tiny_clip_vision(**CLIP), torch.cat([face, blank]),
                            insightface=_analysis(face_pack, on_missing="skip"))
    assert patched.patches


PLUS_CASES = [
    ("sd15", "faceid", dict(hidden=1024), dict(weight=0.9)),
    ("sd15", "faceid-plus", dict(hidden=1024, clip_width=64, heads=12, depth=4, ff_dim=3072),
     dict(weight=1.0, structure_weight=1.5)),
    ("sdxl", "portrait", dict(hidden=1024), dict(weight=0.8, weight_type="ease in")),
]


@pytest.mark.parametrize("kind,family,dims,opts", PLUS_CASES, ids=[f"{a}-{b}" for a, b, _, _ in PLUS_CASES])
def test_face_families_reproduce_ipadapter_plus(host, ipadapter_plus, kind, family, dims, opts, tiny_sd15, tiny_sdxl,
                                                tiny_clip_vision, sampler, cond, face_pack, tmp_path):
    """The compatibility mode (middle block skipped) against ComfyUI_IPAdapter_plus's own FaceID path, both
    reading the same tiny InsightFace pack through the real insightface package (its LoRA left out on both
    sides: that pack loads it with a separate LoRA node, compared in test_faceid_lora_host)."""
    from insightface.app import FaceAnalysis

    from ipadapter_fused.models import load_adapter_state
    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.encoders import FaceOptions

    torch = host.torch
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    cv = tiny_clip_vision(**CLIP)
    adapter, _ = _adapter(host, model, family, tmp_path, **dims)
    path = tmp_path / f"{family}_{'sd15' if kind == 'sd15' else 'sdxl'}.safetensors"
    _, image = _face_image(torch)
    weight = opts["weight"]
    v2 = "structure_weight" in opts
    ours = apply_adapter(model, adapter, cv, image, weight=weight, weight_type=opts.get("weight_type", "linear"),
                         middle_block="skip (IPAdapter_plus compatible)", insightface=_analysis(face_pack),
                         face=FaceOptions(structure="V2 (shortcut on)" if v2 else "auto",
                                          structure_weight=opts.get("structure_weight", 1.0)),
                         faceid_lora_strength=0.0)
    app = FaceAnalysis(name=str(face_pack), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    state = load_adapter_state(path)
    if v2:
        state["faceidplusv2"] = True  # what that pack's loader sets from a file name with 'plusv2'
    theirs, _ = ipadapter_plus.IPAdapterPlus.ipadapter_execute(
        model.clone(), state, cv, insightface=app, image=image, weight=weight,
        weight_faceidv2=opts.get("structure_weight"), weight_type=opts.get("weight_type", "linear"))
    a = sampler(ours, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)
    b = sampler(theirs, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)
    plain = sampler(model, cond(kind, seed=1), cond(kind, seed=2), steps=2, latent_size=16)
    assert (a - plain).abs().max() > 1e-3 * a.abs().max()
    util.assert_layers_match(util.compare_layers(ours, theirs, kind, util.attn2_sites(model)))
    util.assert_latents_match(a, b)


def test_faceid_file_without_its_lora_warns(host, tiny_sd15, tiny_clip_vision, face_pack, tmp_path, caplog):
    from ipadapter_fused.nodes.apply import apply_adapter

    torch = host.torch
    model = tiny_sd15()
    adapter, _ = _adapter(host, model, "faceid", tmp_path, lora=False)  # as when the LoRA was stripped
    assert adapter.spec.lora is None and adapter.spec.face.kind == "faceid"
    _, image = _face_image(torch)
    with caplog.at_level("WARNING"):
        patched = apply_adapter(model, adapter, tiny_clip_vision(**CLIP), image, insightface=_analysis(face_pack))
    assert not patched.patches
    assert any("holds no LoRA" in r.getMessage() for r in caplog.records)
