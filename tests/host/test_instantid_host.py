"""InstantID in the real host: a tiny SDXL UNet (the host's SDXL config, 32 channels), a tiny SDXL ControlNet in
the host's key layout loaded by the host's own ControlNet loader, and a tiny InstantID adapter (face-embedding
resampler) in the published key layout.

What is checked: the conditioning is what the host's 'Apply ControlNet' node gives (same ControlNet, hint,
strength and window) plus the image tokens as the ControlNet's cross-attention context; during sampling
every cross-attention of the ControlNet receives exactly those tokens (positive rows: the face tokens,
negative rows: the zero embedding's), never the text; the node wires adapter, keypoints and conditioning
and refuses wrong inputs before sampling."""
from __future__ import annotations

import types

import numpy as np
import pytest

import util

STRENGTH, START, END = 0.7, 0.1, 0.9
SIZE = 128  # pixels; latent 16 x 16


@pytest.fixture(scope="module")
def controlnet(host):
    """The host's ControlNet, loaded from the tiny state dict by comfy.controlnet.load_controlnet_state_dict."""
    import comfy.controlnet

    util.load_runner()
    from ipaf_runner.tiny_controlnet import sdxl_controlnet_state

    sd = sdxl_controlnet_state(model_channels=util.DEFAULT_CHANNELS["sdxl"], channel_mult=(1, 2, 4))
    keys = set(sd)
    cn = comfy.controlnet.load_controlnet_state_dict(sd)
    assert isinstance(cn, comfy.controlnet.ControlNet)
    # the host loads non-strictly: the layout is right only if its ControlNet has exactly these weights
    assert set(cn.control_model.state_dict()) == keys
    return cn


@pytest.fixture(scope="module")
def adapter(host, tmp_path_factory):
    from ipadapter_fused.models import load_adapter_file
    from ipadapter_fused.models.synthetic import save_synthetic_face_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter

    path = tmp_path_factory.mktemp("instantid") / "ip-adapter.safetensors"
    save_synthetic_face_adapter(path, "face-resampler", "sdxl", "tiny")
    weights = load_adapter_file(path).eval().requires_grad_(False)
    assert weights.spec.face.kind == "face-resampler"
    cpu = host.torch.device("cpu")
    return LoadedAdapter(path.name, weights, host.model_patcher.ModelPatcher(weights, load_device=cpu,
                                                                             offload_device=cpu))


class StubFaces:
    """Stands in for 'InsightFace Loader (Fused)' (detection itself is tested with the tiny ONNX models):
    one face per image except in all-black ones, keypoints at fixed fractions of the image, a raw 512-wide
    embedding that depends on the image, counting detections."""
    KPS = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.72], [0.62, 0.72]])

    def __init__(self, host):
        self.torch = host.torch
        self.calls = 0

    def embedding(self, img):
        torch = self.torch
        g = torch.Generator().manual_seed(99)
        pooled = torch.nn.functional.adaptive_avg_pool2d(img.permute(2, 0, 1)[None].float(), 4).flatten()
        return (torch.randn(512, pooled.numel(), generator=g) @ pooled) * 10  # raw embeddings are ~20 long

    def find_faces(self, images):
        self.calls += 1
        out = []
        for i, img in enumerate(images):
            if float(img.max()) == 0.0:
                raise ValueError(f"no face found in image {i + 1} of {images.shape[0]}")
            h, w = img.shape[:2]
            out.append(types.SimpleNamespace(image_index=i, kps=self.KPS * [w, h], det_score=0.9,
                                             bbox=np.array([0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h]),
                                             embedding=self.embedding(img), det_size=640))
        return out

    def aligned_crops(self, images, faces, size):
        return self.torch.zeros(len(faces), size, size, 3)


def _picture(host, seed):
    g = host.torch.Generator().manual_seed(seed)
    return host.torch.rand(1, SIZE, SIZE, 3, generator=g)


def _tokens(adapter, embeds):
    """Independent of the node: the adapter's projection of the averaged raw embeddings and of zeros."""
    import torch

    mean = embeds.float().mean(0, keepdim=True)
    with torch.no_grad():
        return adapter.weights.image_tokens(mean), adapter.weights.image_tokens(torch.zeros_like(mean))


def _context_hooks(host, cn):
    """Record the context every cross-attention of the ControlNet receives."""
    seen, handles = [], []
    for name, mod in cn.control_model.named_modules():
        if name.endswith("attn2"):
            def hook(module, args, kwargs):
                seen.append(kwargs.get("context", args[1] if len(args) > 1 else None).detach().clone())
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_conditioning_is_the_host_controlnet_apply_plus_the_token_context(host, controlnet, adapter):
    import nodes as host_nodes

    from ipadapter_fused.nodes.instantid import CONTROLNET_CONTEXT_KEY, draw_keypoints, instantid_conditioning

    torch = host.torch
    pos, neg = util.make_cond("sdxl", seed=1), util.make_cond("sdxl", seed=2)
    kps = draw_keypoints(StubFaces.KPS * SIZE, SIZE, SIZE)
    tp, tn = _tokens(adapter, torch.randn(1, 512) * 20)
    out_pos, out_neg = instantid_conditioning(pos, neg, controlnet, kps, tp, tn, STRENGTH, START, END)
    ref_pos, ref_neg = host_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, kps, STRENGTH,
                                                                             START, END)
    for ours, ref, tokens, orig in ((out_pos, ref_pos, tp, pos), (out_neg, ref_neg, tn, neg)):
        assert len(ours) == len(ref) == 1
        d, r = ours[0][1], ref[0][1]
        assert ours[0][0] is orig[0][0]  # the text is untouched
        assert set(d) == set(r) | {CONTROLNET_CONTEXT_KEY}
        assert CONTROLNET_CONTEXT_KEY not in orig[0][1] and "control" not in orig[0][1]
        assert torch.equal(d[CONTROLNET_CONTEXT_KEY], tokens)
        c = d["control"]
        assert isinstance(c, type(controlnet)) and c is not controlnet
        assert c.strength == r["control"].strength == STRENGTH
        assert c.timestep_percent_range == r["control"].timestep_percent_range == (START, END)
        assert torch.equal(c.cond_hint_original, kps.movedim(-1, 1))
        assert d["control_apply_to_uncond"] is False
    # one ControlNet copy shared by the positive and negative rows, as the host's node does
    assert out_pos[0][1]["control"] is out_neg[0][1]["control"]
    assert instantid_conditioning(pos, neg, controlnet, kps, tp, tn, 0.0, START, END) == (pos, neg)


def test_the_controlnet_cross_attention_reads_the_image_tokens(host, controlnet, adapter, tiny_sdxl):
    from ipadapter_fused.nodes.instantid import draw_keypoints, instantid_conditioning

    torch = host.torch
    model = tiny_sdxl()
    pos, neg = util.make_cond("sdxl", seed=1), util.make_cond("sdxl", seed=2)
    kps = draw_keypoints(StubFaces.KPS * SIZE, SIZE, SIZE)
    tp, tn = _tokens(adapter, torch.randn(1, 512) * 20)
    c_pos, c_neg = instantid_conditioning(pos, neg, controlnet, kps, tp, tn, 1.0, 0.0, 1.0)
    seen, handles = _context_hooks(host, controlnet)
    try:
        with_tokens = util.sample(model, c_pos, c_neg, steps=2, cfg=5.0)
    finally:
        for h in handles:
            h.remove()
    n_attn2 = sum(1 for n, _ in controlnet.control_model.named_modules() if n.endswith("attn2"))
    assert len(seen) == 2 * n_attn2  # two steps, cond and uncond rows in one batch
    rows = [ctx[i] for ctx in seen for i in range(ctx.shape[0])]
    assert all(r.shape == tp[0].shape for r in rows)
    is_pos = [torch.allclose(r, tp[0], atol=1e-6) for r in rows]
    is_neg = [torch.allclose(r, tn[0], atol=1e-6) for r in rows]
    assert all(a != b for a, b in zip(is_pos, is_neg))  # every row is one of the two token sets, never the text
    assert sum(is_pos) == sum(is_neg) == len(rows) // 2

    # the context matters: the same ControlNet reading the text gives another picture, no ControlNet a third
    import nodes as host_nodes

    t_pos, t_neg = host_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, kps, 1.0, 0.0, 1.0)
    with_text = util.sample(model, t_pos, t_neg, steps=2, cfg=5.0)
    plain = util.sample(model, pos, neg, steps=2, cfg=5.0)
    assert torch.isfinite(with_tokens).all()
    assert (with_tokens - with_text).abs().max() > 1e-4
    assert (with_tokens - plain).abs().max() > 1e-4


def _prompt_entries(model):
    attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    return list({id(e): e for patch in attn2.values() for e in patch.entries}.values())


def test_the_node_gives_adapter_and_controlnet_the_same_face_tokens(host, controlnet, adapter, tiny_sdxl):
    from ipadapter_fused.nodes.instantid import (CONTROLNET_CONTEXT_KEY, IPAdapterFusedInstantID, NODE_CLASS_MAPPINGS,
                                                 draw_keypoints)

    torch = host.torch
    model = tiny_sdxl()
    pos, neg = util.make_cond("sdxl", seed=1), util.make_cond("sdxl", seed=2)
    image = torch.cat([_picture(host, 3), _picture(host, 4)])  # two references: one averaged identity
    g = torch.Generator().manual_seed(5)
    pose = torch.rand(1, 96, SIZE, 3, generator=g)  # the keypoints picture has its own size
    faces = StubFaces(host)
    assert NODE_CLASS_MAPPINGS["IPAdapterFusedInstantID"] is IPAdapterFusedInstantID
    patched, p, n, kps = IPAdapterFusedInstantID().apply(model, adapter, faces, controlnet, image, pos, neg, 0.8, 0.6,
                                                         0.0, 1.0, image_kps=pose)
    assert faces.calls == 2  # the reference batch once (shared with the adapter path), the pose picture once

    # keypoints: the pose picture's face, drawn at its size
    assert torch.equal(kps, draw_keypoints(StubFaces.KPS * [SIZE, 96], 96, SIZE))

    # ControlNet context: the projection of the averaged raw embeddings / of the zero embedding
    tp, tn = _tokens(adapter, torch.stack([faces.embedding(img) for img in image]))
    assert torch.allclose(p[0][1][CONTROLNET_CONTEXT_KEY], tp, atol=1e-5)
    assert torch.allclose(n[0][1][CONTROLNET_CONTEXT_KEY], tn, atol=1e-5)
    assert p[0][1]["control"].strength == 0.6 and p[0][1]["control"].timestep_percent_range == (0.0, 1.0)

    # the adapter on the model reads the same tokens, at the given weight on every layer
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    (entry,) = _prompt_entries(patched)
    assert torch.allclose(entry.tokens[0], tp, atol=1e-5) and torch.allclose(entry.tokens[1], tn, atol=1e-5)
    assert {(s.weight, s.swap) for s in entry.site_weights} == {(0.8, False)}

    out = util.sample(patched, p, n, steps=2, cfg=5.0)
    assert torch.isfinite(out).all()
    assert (out - util.sample(patched, pos, neg, steps=2, cfg=5.0)).abs().max() > 1e-4  # the ControlNet acts


def test_without_image_kps_the_first_reference_sets_the_pose(host, controlnet, adapter, tiny_sdxl):
    from ipadapter_fused.nodes.instantid import apply_instantid, draw_keypoints

    torch = host.torch
    image = torch.cat([_picture(host, 3), host.torch.rand(1, SIZE, SIZE, 3)])
    faces = StubFaces(host)
    _, _, _, kps = apply_instantid(tiny_sdxl(), adapter, faces, controlnet, image, util.make_cond("sdxl"),
                                   util.make_cond("sdxl", seed=1))
    assert torch.equal(kps, draw_keypoints(StubFaces.KPS * SIZE, SIZE, SIZE))
    assert faces.calls == 1  # one detection serves the keypoints and the adapter


# ---------------------------------------------------------------------------------------------------
# Errors, all before any patch
# ---------------------------------------------------------------------------------------------------
def _call(host, model, adapter, controlnet, faces=None, image=None, **kw):
    from ipadapter_fused.nodes.instantid import apply_instantid

    faces = faces if faces is not None else StubFaces(host)
    image = image if image is not None else _picture(host, 3)
    return apply_instantid(model, adapter, faces, controlnet, image, util.make_cond("sdxl"),
                           util.make_cond("sdxl", seed=1), **kw)


def test_other_adapters_are_refused(host, controlnet, tiny_sdxl, tmp_path):
    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.models.synthetic import sdxl_layer_dims
    from ipadapter_fused.nodes.loaders import LoadedAdapter

    path = tmp_path / "plus.safetensors"
    save_synthetic_adapter(path, "plus", sdxl_layer_dims(32), 2048, 64, resampler_dim=64, depth=1)
    plus = LoadedAdapter(path.name, load_adapter_file(path), None)
    with pytest.raises(ValueError, match="not InstantID's face adapter.*Apply IPAdapter"):
        _call(host, tiny_sdxl(), plus, controlnet)
    with pytest.raises(ValueError, match="IPAdapter Loader"):
        _call(host, tiny_sdxl(), object(), controlnet)


def test_wrong_controlnets_are_refused(host, controlnet, adapter, tiny_sdxl):
    import comfy.controlnet

    from ipaf_runner.tiny_controlnet import sdxl_controlnet_state

    with pytest.raises(ValueError, match="IdentityNet ControlNet"):
        _call(host, tiny_sdxl(), adapter, object())
    # an SDXL-like ControlNet whose widths are not the model's (other channels and multipliers)
    other = comfy.controlnet.load_controlnet_state_dict(
        sdxl_controlnet_state(model_channels=64, channel_mult=(1, 1, 1), depths=(0, 1, 1)))
    with pytest.raises(ValueError, match="ControlNet does not fit the model"):
        _call(host, tiny_sdxl(), adapter, other)
    # an SD1.5-like ControlNet: its cross-attention reads 768-wide text
    sd15 = comfy.controlnet.load_controlnet_state_dict(
        sdxl_controlnet_state(model_channels=32, channel_mult=(1, 2, 4), depths=(0, 1, 1), context_dim=768))
    with pytest.raises(ValueError, match="context width 768"):
        _call(host, tiny_sdxl(), adapter, sd15)


def test_missing_faces_and_bad_inputs_are_named(host, controlnet, adapter, tiny_sdxl, tiny_sd15):
    torch = host.torch
    black = torch.zeros(1, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r"image \(the face reference\).*no face found in image 2 of 2"):
        _call(host, tiny_sdxl(), adapter, controlnet, image=torch.cat([_picture(host, 3), black]))
    with pytest.raises(ValueError, match=r"image_kps.*no face found"):
        _call(host, tiny_sdxl(), adapter, controlnet, image_kps=black)
    with pytest.raises(ValueError, match="InsightFace Loader"):
        _call(host, tiny_sdxl(), adapter, controlnet, faces=object())
    with pytest.raises(ValueError, match="start_at"):
        _call(host, tiny_sdxl(), adapter, controlnet, start_at=0.8, end_at=0.2)
    with pytest.raises(ValueError, match="cn_strength"):
        _call(host, tiny_sdxl(), adapter, controlnet, cn_strength=float("nan"))
    with pytest.raises(ValueError, match="does not fit the model"):
        _call(host, tiny_sd15(), adapter, controlnet)


# ---------------------------------------------------------------------------------------------------
# With the real insightface code path (tiny ONNX models with the real signatures)
# ---------------------------------------------------------------------------------------------------
def test_with_real_face_analysis_keypoints_and_tokens_follow_insightface(host, controlnet, adapter, tiny_sdxl,
                                                                         tmp_path_factory):
    import importlib

    pytest.importorskip("onnxruntime")
    FaceAnalysis = pytest.importorskip("insightface.app").FaceAnalysis

    from ipadapter_fused.face.analysis import DetectOptions, load_face_analysis
    from ipadapter_fused.nodes.instantid import CONTROLNET_CONTEXT_KEY, apply_instantid, draw_keypoints

    torch = host.torch
    util.load_runner()
    tiny_faces = importlib.import_module("ipaf_runner.tiny_faces")
    pack = tiny_faces.write_pack(tmp_path_factory.mktemp("insightface"))
    size = 224
    ref_rgb = tiny_faces.draw_faces(size, size, [(70, 60, 72)])
    pose_rgb = tiny_faces.draw_faces(size, size, [(100, 90, 64)])

    def as_image(rgb):
        return torch.from_numpy(rgb).float().div(255.0)[None]

    # insightface's own FaceAnalysis, called directly: the raw embedding and the keypoints it gives
    app = FaceAnalysis(name=str(pack), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    (ref_face,) = app.get(np.ascontiguousarray(ref_rgb[..., ::-1]))
    (pose_face,) = app.get(np.ascontiguousarray(pose_rgb[..., ::-1]))

    analysis = load_face_analysis(str(pack), "CPU", DetectOptions())
    with torch.inference_mode():  # as the host's executor runs nodes
        patched, p, n, kps = apply_instantid(tiny_sdxl(), adapter, analysis, controlnet, as_image(ref_rgb),
                                             util.make_cond("sdxl", seed=1), util.make_cond("sdxl", seed=2),
                                             image_kps=as_image(pose_rgb))
    assert torch.equal(kps, draw_keypoints(pose_face.kps, size, size))
    tp, tn = _tokens(adapter, torch.from_numpy(np.asarray(ref_face.embedding, np.float32))[None])
    assert torch.allclose(p[0][1][CONTROLNET_CONTEXT_KEY], tp, atol=1e-4)
    assert torch.allclose(n[0][1][CONTROLNET_CONTEXT_KEY], tn, atol=1e-4)
    out = util.sample(patched, p, n, steps=1, cfg=5.0, latent_size=size // 8)
    assert torch.isfinite(out).all()
