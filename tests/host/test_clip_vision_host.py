"""'IPAdapter CLIP Vision Loader (Fused)' in the real host: tiny SigLIP (with its attention-pooling head) and
CLIP files the host has no config for, and a ViT-L/14-size file the host's own loader takes.

References: the host's ClipVisionModel built here from the config the files were written with (heads and
activation given, not inferred) and loaded with the files' tensors; the pooling head written out in plain
torch from the file's head tensors (multi-head attention of one probe token, LayerNorm, tanh-GELU MLP)."""
from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import pytest

import util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared bad-file helpers
from untrusted_files import _Payload  # noqa: E402

SIGLIP = dict(width=64, layers=2, intermediate=128, patch=14, image_size=56)
CLIP = dict(width=64, layers=2, intermediate=96, patch=14, image_size=56, projection=24)


@pytest.fixture
def folder(host, tmp_path, monkeypatch):
    """The host's clip_vision folder pointed at an empty temporary folder (the loaders' cache is keyed by path)."""
    path = tmp_path / "clip_vision"
    path.mkdir()
    monkeypatch.setitem(host.folder_paths.folder_names_and_paths, "clip_vision", ([str(path)], {".safetensors", ".bin"}))
    return path


def _tm():
    util.load_runner()
    import importlib
    return importlib.import_module("ipaf_runner.tiny_models")


def _node_load(name):
    from ipadapter_fused.nodes.ipadapter_nodes import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["IPAdapterFusedClipVisionLoader"]()
    (cv,) = node.load(name)
    return cv


def _by_hand(tmp_path, path, cfg: dict):
    """The host's ClipVisionModel from an explicit config, with the file's tensors."""
    from safetensors.torch import load_file

    host = util.prepare_host()
    cfg_path = tmp_path / "by_hand.json"
    cfg_path.write_text(json.dumps(cfg))
    cv = host.clip_vision.ClipVisionModel(str(cfg_path))
    missing, _ = cv.load_sd(load_file(str(path)))
    assert not missing
    return cv


def _images(n=2, size=40, seed=0):
    torch = util.prepare_host().torch
    return torch.rand(n, size, size + 8, 3, generator=torch.Generator().manual_seed(seed))


def _pool_by_hand(state, hidden, heads):
    """SigLIP's multihead-attention pooling written out from the file's tensors."""
    torch = util.prepare_host().torch
    F = torch.nn.functional
    h = {k[len("vision_model.head."):]: v.double() for k, v in state.items() if k.startswith("vision_model.head.")}
    x = hidden.double()
    b, n, d = x.shape
    wq, wk, wv = h["attention.in_proj_weight"].chunk(3)
    bq, bk, bv = h["attention.in_proj_bias"].chunk(3)
    q = (h["probe"].expand(b, 1, d) @ wq.t() + bq).reshape(b, 1, heads, d // heads).transpose(1, 2)
    k = (x @ wk.t() + bk).reshape(b, n, heads, d // heads).transpose(1, 2)
    v = (x @ wv.t() + bv).reshape(b, n, heads, d // heads).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    o = att.transpose(1, 2).reshape(b, 1, d) @ h["attention.out_proj.weight"].t() + h["attention.out_proj.bias"]
    y = F.layer_norm(o, (d,), h["layernorm.weight"], h["layernorm.bias"], eps=1e-6)
    y = F.gelu(y @ h["mlp.fc1.weight"].t() + h["mlp.fc1.bias"], approximate="tanh")
    return (o + y @ h["mlp.fc2.weight"].t() + h["mlp.fc2.bias"])[:, 0]


def test_tiny_siglip_with_head(host, folder, tmp_path):
    from safetensors.torch import load_file

    from ipadapter_fused.nodes import loaders
    from ipadapter_fused.nodes.encode import POOLING_HEAD_ATTR, _pooled, encode_images, encoder_kind

    torch = host.torch
    path = _tm().write_tiny_siglip(folder / "tiny_siglip.safetensors", **SIGLIP)
    cv = _node_load(path.name)
    assert encoder_kind(cv) == "siglip" and cv.image_size == 56
    head = getattr(cv, POOLING_HEAD_ATTR)
    assert head.heads == 1  # width 64 -> 64 // 64 heads, the tower's count

    ref_cv = _by_hand(tmp_path, path, {
        "model_type": "siglip_vision_model", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
        "intermediate_size": 128, "patch_size": 14, "image_size": 56, "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    img = _images()
    out, ref = cv.encode_image(img), ref_cv.encode_image(img)
    for key in ("last_hidden_state", "penultimate_hidden_states"):
        assert out[key].shape == ref[key].shape and torch.equal(out[key], ref[key]), key
    assert out["last_hidden_state"].shape == (2, 16, 64)

    want = _pool_by_hand(load_file(str(path)), out["last_hidden_state"], heads=1)
    got = _pooled(cv, out["last_hidden_state"])
    assert got.shape == (2, 64)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()

    # what the InstantX Flux adapter gets through the pack's encoder path (pooled, negative = positive)
    class Spec:
        encoder_kind, encoder_input, encoder_width, injection = "siglip", "pooled", 64, "instantx-flux"
        encoder_name = "SigLIP (tiny)"
    pos, neg = encode_images(cv, Spec, img, None)
    assert (pos.double() - want).abs().max() <= 1e-5 * want.abs().max() and torch.equal(neg, pos)

    # one instance per file: the all-in-one node's loader gets the same object, head included
    assert loaders.load_clip_vision(path.name) is cv and _node_load(path.name) is cv


def test_tiny_siglip_without_head(host, folder):
    """A SigLIP file without `vision_model.head.*` loads (hidden states for SD3.5); the pooled output then
    asks for a file with the head."""
    from ipadapter_fused.nodes.encode import POOLING_HEAD_ATTR, _pooled

    path = _tm().write_tiny_siglip(folder / "bare_siglip.safetensors", head=False, **SIGLIP)
    cv = _node_load(path.name)
    assert not hasattr(cv, POOLING_HEAD_ATTR)
    hidden = cv.encode_image(_images(1))["last_hidden_state"]
    with pytest.raises(ValueError, match="pooled output"):
        _pooled(cv, hidden)


def test_tiny_clip(host, folder, tmp_path):
    from ipadapter_fused.nodes.encode import encoder_kind

    torch = host.torch
    path = _tm().write_tiny_clip_vision(folder / "tiny_clip.safetensors", **CLIP)
    cv = _node_load(path.name)
    assert encoder_kind(cv) == "clip"
    ref_cv = _by_hand(tmp_path, path, util.tiny_clip_vision_config(
        hidden_size=64, layers=2, heads=1, intermediate=96, image_size=56, patch_size=14, projection_dim=24))
    img = _images()
    out, ref = cv.encode_image(img), ref_cv.encode_image(img)
    for key in ("image_embeds", "penultimate_hidden_states", "last_hidden_state"):
        assert torch.equal(out[key], ref[key]), key
    assert out["image_embeds"].shape == (2, 24) and out["penultimate_hidden_states"].shape == (2, 17, 64)


def _to_openclip(sd: dict) -> dict:
    """The HF-layout CLIP vision state in OpenCLIP's layout (visual.*: conv1, resblocks with a fused in_proj)."""
    torch = util.prepare_host().torch
    p, out = "vision_model.", {}
    names = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
             "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
             "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
             "post_layernorm.bias": "ln_post.bias"}
    for k, v in names.items():
        out["visual." + v] = sd[p + k]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    layers = {int(k.split(".")[3]) for k in sd if ".encoder.layers." in k}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        hf, oc = f"{p}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for y in ("weight", "bias"):
            for a, b in parts.items():
                out[f"{oc}{b}.{y}"] = sd[f"{hf}{a}.{y}"]
            out[f"{oc}attn.in_proj_{y}"] = torch.cat([sd[f"{hf}self_attn.{n}.{y}"] for n in ("q_proj", "k_proj", "v_proj")])
    return out


def test_tiny_openclip_layout(host, folder):
    """The same tiny tower in OpenCLIP's key layout loads to the same model (the host's key conversion)."""
    from safetensors.torch import load_file, save_file

    torch = host.torch
    hf = _tm().write_tiny_clip_vision(folder / "tiny_clip_hf.safetensors", **CLIP)
    save_file(_to_openclip(load_file(str(hf))), str(folder / "tiny_clip_openclip.safetensors"))
    img = _images()
    a = _node_load("tiny_clip_hf.safetensors").encode_image(img)
    b = _node_load("tiny_clip_openclip.safetensors").encode_image(img)
    for key in ("image_embeds", "penultimate_hidden_states"):
        assert torch.equal(a[key], b[key]), key


def test_not_a_vision_encoder_names_the_file(host, folder):
    from ipadapter_fused.models import save_synthetic_adapter
    from ipadapter_fused.models.vision_encoder import VisionEncoderError

    save_synthetic_adapter(str(folder / "ip-adapter_sd15.safetensors"), "base", [32] * 16, 32, 24)
    with pytest.raises(VisionEncoderError, match=r"ip-adapter_sd15\.safetensors is not a CLIP / SigLIP.*models/ipadapter"):
        _node_load("ip-adapter_sd15.safetensors")
    (folder / "notes.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ")
    with pytest.raises(ValueError, match=r"notes\.safetensors"):
        _node_load("notes.safetensors")
    with pytest.raises(FileNotFoundError, match=r"'missing\.safetensors' was not found in the 'clip_vision'"):
        _node_load("missing.safetensors")


def test_pickles_are_read_weights_only(host, folder, tmp_path):
    """A .bin goes to the host's loader, which unpickles with weights_only: a payload never runs, and the
    error names the file without torch's advice to turn weights_only off."""
    from ipadapter_fused.models.vision_encoder import VisionEncoderError

    marker = tmp_path / "code_ran"
    with open(folder / "evil.bin", "wb") as f:
        pickle.dump({"vision_model.embeddings.class_embedding": _Payload(marker)}, f, protocol=2)
    with pytest.raises(VisionEncoderError, match=r"evil\.bin: the host could not read it as a weights-only") as info:
        _node_load("evil.bin")
    assert not marker.exists() and "weights_only=False" not in str(info.value)
    (folder / "empty.bin").write_bytes(b"")
    with pytest.raises(VisionEncoderError, match=r"empty\.bin"):
        _node_load("empty.bin")


def test_a_size_the_host_knows_goes_through_the_host_loader(host, folder, tmp_path):
    """A ViT-L/14-size file (the selfcheck's, cached): the host's own config (16 heads of 64, quick_gelu),
    not one read off the shapes (which would say gelu)."""
    src = _tm().host_models(tmp_path / "work")["clip_vision"][0]
    (folder / src.name).symlink_to(src)
    cv = _node_load(src.name)
    layer = cv.model.vision_model.encoder.layers[0]
    assert layer.self_attn.heads == 16 and cv.image_size == 224
    x = host.torch.linspace(-3, 3, 7)
    assert host.torch.allclose(layer.mlp.activation(x), x * host.torch.sigmoid(1.702 * x))  # quick_gelu
