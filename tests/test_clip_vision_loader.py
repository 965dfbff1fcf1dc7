"""CLIP / SigLIP vision files described from their safetensors header (models/vision_encoder.py): the config
the pack builds the host's ClipVisionModel from when the host has none for the size, and the refusal of
files in clip_vision that are not vision encoders. Headers are real files written from the tiny state dicts
of tools/ipaf_runner/tiny_models.py; the expected values are the sizes those were made with."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import save_synthetic_adapter
from models.loading import read_safetensors_header
from models.siglip_head import SigLIPPoolingHead
from models.vision_encoder import (
    VisionEncoderError,
    heads_for_width,
    host_config_facts,
    infer_vision_config,
    read_pooling_head_state,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from ipaf_runner import tiny_models  # noqa: E402

HOST_CONFIGS = ROOT.parent / "shared" / "host" / "ComfyUI" / "comfy"


def _header(tmp_path, sd, name="enc.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return read_safetensors_header(path), path


def test_clip_config_from_header(tmp_path):
    sd = tiny_models.clip_vision_state(width=96, layers=3, intermediate=160, patch=8, image_size=40, projection=24)
    header, _ = _header(tmp_path, sd)
    cfg = infer_vision_config(header, "enc.safetensors")
    assert (cfg.kind, cfg.layout, cfg.width, cfg.layers, cfg.mlp_width, cfg.patch, cfg.image_size, cfg.projection) \
        == ("clip", "hf", 96, 3, 160, 8, 40, 24)
    assert cfg.heads == 1 and not cfg.pooling_head  # 96 // 64
    host = cfg.host_config()
    assert host["model_type"] == "clip_vision_model" and host["projection_dim"] == 24
    assert host["num_hidden_layers"] == 3 and host["intermediate_size"] == 160 and host["image_size"] == 40


def test_siglip_config_and_head_from_header(tmp_path):
    sd = tiny_models.siglip_vision_state(width=128, layers=2, intermediate=96, patch=7, image_size=35)
    header, path = _header(tmp_path, sd)
    cfg = infer_vision_config(header, "siglip.safetensors")
    assert (cfg.kind, cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.patch, cfg.image_size, cfg.projection) \
        == ("siglip", 128, 2, 2, 96, 7, 35, None)
    assert cfg.pooling_head
    host = cfg.host_config()
    assert host["model_type"] == "siglip_vision_model" and "projection_dim" not in host
    assert host["image_mean"] == [0.5, 0.5, 0.5] and host["hidden_act"] == "gelu_pytorch_tanh"
    # only the head's tensors are read, and they build the head
    head_state = read_pooling_head_state(path)
    assert set(head_state) == {k for k in sd if k.startswith("vision_model.head.")}
    head = SigLIPPoolingHead.from_state(head_state, cfg.heads)
    assert torch.equal(head.probe, sd["vision_model.head.probe"])
    no_head, _ = _header(tmp_path, tiny_models.siglip_vision_state(head=False), "bare.safetensors")
    assert not infer_vision_config(no_head).pooling_head


def test_openclip_layout_from_shapes():
    width, layers, patch, grid, proj, mlp = 80, 2, 16, 3, 40, 200
    shapes = {"visual.conv1.weight": (width, 3, patch, patch), "visual.class_embedding": (width,),
              "visual.positional_embedding": (grid * grid + 1, width), "visual.proj": (width, proj)}
    for i in range(layers):
        shapes[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = (3 * width, width)
        shapes[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = (mlp, width)
    cfg = infer_vision_config(shapes, "openclip.bin")
    assert (cfg.kind, cfg.layout, cfg.width, cfg.layers, cfg.mlp_width, cfg.patch, cfg.image_size, cfg.projection) \
        == ("clip", "openclip", width, layers, mlp, patch, grid * patch, proj)


def test_head_counts_the_weights_do_not_hold():
    # published towers whose head dim is not 64, then the width / 64 rule and its floor
    assert [heads_for_width(w) for w in (1152, 1280, 1664, 1024, 768, 64, 32)] == [16, 16, 16, 16, 12, 1, 1]


def _hf_shapes(kind, width, layers, mlp, patch, image, projection=None):
    """Key -> shape of an HF-layout tower, without tensors (full-size towers are too big to allocate here)."""
    p = "vision_model."
    grid = (image // patch) ** 2 + (1 if kind == "clip" else 0)
    s = {p + "embeddings.patch_embedding.weight": (width, 3, patch, patch),
         p + "embeddings.position_embedding.weight": (grid, width),
         p + "post_layernorm.weight": (width,), p + "post_layernorm.bias": (width,)}
    if kind == "clip":
        s.update({p + "embeddings.class_embedding": (width,), p + "pre_layrnorm.weight": (width,)})
    else:
        s[p + "embeddings.patch_embedding.bias"] = (width,)
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[q + f"self_attn.{n}.weight"], s[q + f"self_attn.{n}.bias"] = (width, width), (width,)
        s[q + "mlp.fc1.weight"], s[q + "mlp.fc2.weight"] = (mlp, width), (width, mlp)
    if projection:
        s["visual_projection.weight"] = (projection, width)
    return s


def test_shape_table_matches_the_tiny_writers():
    for kind, sd in (("clip", tiny_models.clip_vision_state(width=64, layers=2, intermediate=128, image_size=56,
                                                            projection=32)),
                     ("siglip", tiny_models.siglip_vision_state(head=False))):
        table = _hf_shapes(kind, 64, 2, 128, 14, 56, 32 if kind == "clip" else None)
        have = _shapes(sd)
        assert all(have[k] == v for k, v in table.items())
        assert infer_vision_config(table).facts() == infer_vision_config(have).facts()


@pytest.mark.skipif(not HOST_CONFIGS.is_dir(), reason="host snapshot absent")
def test_full_size_layouts_match_the_host_configs():
    """Full-size headers give the facts of the host's own configs (so the host's loader is used for them, with
    its head count); a tiny tower matches none of them."""
    facts = {p.name: host_config_facts(json.loads(p.read_text())) for p in HOST_CONFIGS.glob("clip_vision_*.json")}
    assert infer_vision_config(_hf_shapes("clip", 1024, 24, 4096, 14, 224, 768)).facts() \
        == facts["clip_vision_config_vitl.json"]
    assert infer_vision_config(_hf_shapes("clip", 1280, 32, 5120, 14, 224, 1024)).facts() \
        == facts["clip_vision_config_h.json"]
    so400m = infer_vision_config(_hf_shapes("siglip", 1152, 27, 4304, 14, 384))
    assert so400m.facts() == facts["clip_vision_siglip_384.json"] and so400m.heads == 16
    assert so400m.image_size == 378  # 27 patches of 14: the 6 px the host's conv drops are not in the shapes
    tiny = infer_vision_config(_hf_shapes("clip", 64, 2, 128, 14, 56, 32))
    assert tiny.facts() not in facts.values()


# --------------------------------------------------------------------------------------------------
# Files that are not vision encoders, or damaged ones: refused with the file's name and what it is
# --------------------------------------------------------------------------------------------------
def test_refuses_an_ip_adapter(tmp_path):
    path = tmp_path / "ip-adapter_sd15.safetensors"
    save_synthetic_adapter(str(path), "base", [32] * 16, 32, 24)
    with pytest.raises(VisionEncoderError, match=r"ip-adapter_sd15\.safetensors is not a CLIP / SigLIP.*models/ipadapter"):
        infer_vision_config(read_safetensors_header(path), path.name)


@pytest.mark.parametrize("keys, what", [
    ({"double_blocks.0.img_attn.qkv.weight": (6, 2)}, "diffusion model"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (8, 4)}, "text encoder"),
    ({"something.else": (2,)}, "no CLIP / SigLIP vision tower keys"),
])
def test_refuses_other_models(keys, what):
    with pytest.raises(VisionEncoderError, match=rf"flux1-dev\.safetensors is not a CLIP / SigLIP vision model: .*{what}"):
        infer_vision_config(keys, "flux1-dev.safetensors")


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_refuses_damaged_towers():
    sd = _shapes(tiny_models.clip_vision_state(width=64, layers=3, intermediate=128, image_size=56, projection=32))
    gap = {k: v for k, v in sd.items() if ".layers.1." not in k}
    with pytest.raises(VisionEncoderError, match=r"cv\.safetensors: .*layers are not numbered 0\.\.2 \(missing \[1\]\)"):
        infer_vision_config(gap, "cv.safetensors")
    odd = dict(sd, **{"vision_model.embeddings.position_embedding.weight": (18, 64)})
    with pytest.raises(VisionEncoderError, match=r"cv\.safetensors: 17 position embeddings do not make a square"):
        infer_vision_config(odd, "cv.safetensors")
    no_mlp = {k: v for k, v in sd.items() if "layers.0.mlp.fc1" not in k}
    with pytest.raises(VisionEncoderError, match=r"cv\.safetensors: the vision tower has no .*layers\.0\.mlp\.fc1"):
        infer_vision_config(no_mlp, "cv.safetensors")
    grey = dict(sd, **{"vision_model.embeddings.patch_embedding.weight": (64, 1, 14, 14)})
    with pytest.raises(VisionEncoderError, match=r"cv\.safetensors: the patch embedding is \(64, 1, 14, 14\)"):
        infer_vision_config(grey, "cv.safetensors")
