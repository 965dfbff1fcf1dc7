"""Encoders and adapters chosen by content (models/vision_files.py, models/adapter_files.py, nodes/auto_select.py).

Full-size towers and adapters are written as header-only safetensors files: the header declares the real shapes
(CLIP ViT-L/H/bigG, SigLIP so400m, SD1.5/SDXL adapters), no tensor data follows. The description reads the header
only, so these few-kilobyte files stand for the multi-gigabyte originals. Expected values are the published towers'
sizes (the host's own configs: comfy/clip_vision_config_*.json) and the adapters' documented structure."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch

from models.adapter_files import describe_adapter_file
from models.families import AdapterSpec, expected_shapes
from models.synthetic import dit_adapter_spec, save_synthetic_adapter, sd15_layer_dims, sdxl_layer_dims
from models.vision_files import describe_vision_file, encoder_fits, encoder_needed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_clip_vision_loader import _hf_shapes  # noqa: E402  (key -> shape of an HF-layout tower)

from ipadapter_fused.nodes.auto_select import (  # noqa: E402
    AUTO_CLIP_VISION, PRESETS, pick_clip_vision, preset_mismatch)


def write_header_only(path: Path, shapes: dict, dtype: str = "F16") -> Path:
    """A safetensors header declaring `shapes` (offsets as a real file would have), without the data."""
    header, offset = {}, 0
    size = {"F16": 2, "F32": 4}[dtype]
    for key, shape in shapes.items():
        n = size
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


TOWERS = {
    "vit-l": _hf_shapes("clip", 1024, 24, 4096, 14, 224, 768),
    "vit-h": _hf_shapes("clip", 1280, 32, 5120, 14, 224, 1024),
    "vit-bigg": _hf_shapes("clip", 1664, 48, 8192, 14, 224, 1280),
    "siglip": dict(_hf_shapes("siglip", 1152, 27, 4304, 14, 384), **{
        "vision_model.head.probe": (1, 1, 1152), "vision_model.head.attention.in_proj_weight": (3456, 1152)}),
    "siglip-bare": _hf_shapes("siglip", 1152, 27, 4304, 14, 384),
}


def _spec(layout, layer_dims, context, encoder_width, **kw) -> AdapterSpec:
    inp = "image_embeds" if layout == "base" else "penultimate"
    fields = dict(layout=layout, tokens=kw.pop("tokens", 4), context_dim=context, encoder_width=encoder_width,
                  encoder_input=inp, encoder_name="", num_layers=len(layer_dims), layer_dims=tuple(layer_dims))
    fields.update(kw)
    return AdapterSpec(**fields)


# Published UNet adapters' structures (h94/IP-Adapter): what a preset means.
ADAPTERS = {
    "ip-adapter_sd15": _spec("base", sd15_layer_dims(), 768, 1024),
    "ip-adapter_sd15_vit-G": _spec("base", sd15_layer_dims(), 768, 1280),
    "ip-adapter_sdxl": _spec("base", sdxl_layer_dims(), 2048, 1280),
    "ip-adapter-plus_sd15": _spec("plus", sd15_layer_dims(), 768, 1280, tokens=16, resampler_dim=768,
                                  resampler_heads=12, resampler_depth=4, resampler_ff_dim=3072),
    "ip-adapter-plus_sdxl_vit-h": _spec("plus", sdxl_layer_dims(), 2048, 1280, tokens=16, resampler_dim=1280,
                                        resampler_heads=20, resampler_depth=4, resampler_ff_dim=5120),
    "ip-adapter-full-face_sd15": _spec("full-face", sd15_layer_dims(), 768, 1280, tokens=257),
}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vision")
    for name, shapes in TOWERS.items():
        write_header_only(folder / f"{name}.safetensors", shapes)
    return folder


def _adapter_file(folder: Path, name: str) -> Path:
    return write_header_only(folder / f"{name}.safetensors", expected_shapes(ADAPTERS[name]))


# --------------------------------------------------------------------------------------------------
# What a clip_vision file is
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower, name, width, projection, image, layers, head", [
    ("vit-l", "CLIP ViT-L/14", 1024, 768, 224, 24, False),
    ("vit-h", "CLIP ViT-H/14", 1280, 1024, 224, 32, False),
    ("vit-bigg", "CLIP ViT-bigG/14", 1664, 1280, 224, 48, False),
    ("siglip", "SigLIP so400m-patch14-384", 1152, None, 378, 27, True),
    ("siglip-bare", "SigLIP so400m-patch14-384", 1152, None, 378, 27, False),
])
def test_published_towers_described_from_their_header(clip_folder, tower, name, width, projection, image, layers, head):
    d = describe_vision_file(clip_folder / f"{tower}.safetensors")
    assert (d.name, d.width, d.penultimate_width, d.projection, d.image_size, d.layers, d.pooling_head) \
        == (name, width, width, projection, image, layers, head)
    assert d.kind == ("siglip" if "siglip" in tower else "clip") and d.is_encoder


def test_other_files_say_what_they_are(tmp_path):
    save_synthetic_adapter(str(tmp_path / "adapter.safetensors"), "base", [32] * 16, 32, 24)
    write_header_only(tmp_path / "text.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": (8, 4)})
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(4)}, tmp_path / "pickled.bin")
    dino = {"embeddings.patch_embeddings.projection.weight": (64, 3, 14, 14),
            "encoder.layer.0.layer_scale1.lambda1": (64,)}
    write_header_only(tmp_path / "dino.safetensors", dino)
    said = {p.name: describe_vision_file(p) for p in tmp_path.iterdir()}
    assert not any(d.is_encoder for d in said.values())
    assert "models/ipadapter" in said["adapter.safetensors"].problem
    assert "text encoder" in said["text.safetensors"].problem
    assert "damaged" in said["broken.safetensors"].problem
    assert "pickled" in said["pickled.bin"].problem and "explicitly" in said["pickled.bin"].problem
    assert "DINOv2" in said["dino.safetensors"].problem


def test_description_is_cached_by_size_and_mtime(tmp_path):
    path = write_header_only(tmp_path / "enc.safetensors", TOWERS["vit-h"])
    first = describe_vision_file(path)
    assert describe_vision_file(path) is first  # cached: same object
    write_header_only(path, TOWERS["vit-l"])      # replaced in place (another size, another mtime)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert describe_vision_file(path).name == "CLIP ViT-L/14"


# --------------------------------------------------------------------------------------------------
# Which encoder an adapter needs, from both files' contents
# --------------------------------------------------------------------------------------------------
# adapter -> the one tower of TOWERS whose output it reads
NEEDS = {
    "ip-adapter_sd15": "vit-h",            # image_embeds 1024
    "ip-adapter_sd15_vit-G": "vit-bigg",   # image_embeds 1280
    "ip-adapter_sdxl": "vit-bigg",
    "ip-adapter-plus_sd15": "vit-h",       # penultimate 1280
    "ip-adapter-plus_sdxl_vit-h": "vit-h",
    "ip-adapter-full-face_sd15": "vit-h",
}


@pytest.mark.parametrize("adapter", sorted(NEEDS))
def test_unet_adapters_fit_exactly_their_encoder(tmp_path, clip_folder, adapter):
    spec = describe_adapter_file(_adapter_file(tmp_path, adapter)).spec
    assert spec is not None and spec.layout == ADAPTERS[adapter].layout
    fits = {t for t in TOWERS if encoder_fits(spec, describe_vision_file(clip_folder / f"{t}.safetensors")) is None}
    assert fits == {NEEDS[adapter]}
    assert pick_clip_vision(spec, sorted(p.name for p in clip_folder.iterdir()), lambda n: str(clip_folder / n)) \
        == f"{NEEDS[adapter]}.safetensors"


def test_dit_adapters_fit_their_encoder(clip_folder):
    towers = {t: describe_vision_file(clip_folder / f"{t}.safetensors") for t in TOWERS}
    xlabs = dit_adapter_spec("xlabs", encoder_width=768)
    instantx = dit_adapter_spec("instantx-flux", encoder_width=1152)
    sd3 = dit_adapter_spec("instantx-sd3", encoder_width=1152)
    assert {t for t, d in towers.items() if encoder_fits(xlabs, d) is None} == {"vit-l"}
    # InstantX Flux reads SigLIP's pooled output: the file without the pooling head does not fit
    assert {t for t, d in towers.items() if encoder_fits(instantx, d) is None} == {"siglip"}
    assert "pooling head" in encoder_fits(instantx, towers["siglip-bare"])
    assert {t for t, d in towers.items() if encoder_fits(sd3, d) is None} == {"siglip", "siglip-bare"}
    assert "is CLIP, the adapter needs SigLIP" in encoder_fits(sd3, towers["vit-bigg"])


def test_no_fit_names_what_is_needed_and_each_file(tmp_path, clip_folder):
    folder = tmp_path / "cv"
    folder.mkdir()
    for t in ("vit-l", "siglip"):
        write_header_only(folder / f"{t}.safetensors", TOWERS[t])
    save_synthetic_adapter(str(folder / "misplaced.safetensors"), "base", [32] * 16, 32, 24)
    spec = describe_adapter_file(_adapter_file(tmp_path, "ip-adapter_sd15")).spec
    with pytest.raises(ValueError) as err:
        pick_clip_vision(spec, sorted(p.name for p in folder.iterdir()), lambda n: str(folder / n))
    text = str(err.value)
    assert "this adapter needs CLIP ViT-H/14 image_embeds (1024 wide)" in text
    assert "vit-l.safetensors -> CLIP ViT-L/14 (hidden width 1024, image_embeds 768" in text
    assert "its image_embeds are 768 wide, the adapter needs 1024" in text
    assert "siglip.safetensors -> SigLIP so400m-patch14-384" in text and "is SigLIP, the adapter needs CLIP" in text
    assert "misplaced.safetensors -> not a CLIP / SigLIP vision encoder" in text
    with pytest.raises(ValueError, match="The folder is empty"):
        pick_clip_vision(spec, [], lambda n: None)


def test_several_fits_the_published_tower_first_then_names(tmp_path):
    """A tiny tower whose image_embeds are 1024 wide fits a ViT-H adapter too; the published ViT-H comes first,
    then file names in case-insensitive order."""
    folder = tmp_path / "cv"
    folder.mkdir()
    odd = _hf_shapes("clip", 64, 2, 128, 14, 56, 1024)
    write_header_only(folder / "a_small.safetensors", odd)
    write_header_only(folder / "Z_vit-h.safetensors", TOWERS["vit-h"])
    write_header_only(folder / "b_vit-h_fp32.safetensors", TOWERS["vit-h"], dtype="F32")
    spec = describe_adapter_file(_adapter_file(tmp_path, "ip-adapter_sd15")).spec
    names = sorted(p.name for p in folder.iterdir())
    assert pick_clip_vision(spec, names, lambda n: str(folder / n)) == "b_vit-h_fp32.safetensors"
    os.remove(folder / "b_vit-h_fp32.safetensors")
    os.remove(folder / "Z_vit-h.safetensors")
    assert pick_clip_vision(spec, ["a_small.safetensors"], lambda n: str(folder / n)) == "a_small.safetensors"


# --------------------------------------------------------------------------------------------------
# Presets by structure
# --------------------------------------------------------------------------------------------------
def test_presets_match_the_published_structures(tmp_path):
    member = {p: {a for a, s in ADAPTERS.items() if preset_mismatch(p, describe_adapter_file(
        _adapter_file(tmp_path, a)).spec) is None} for p in PRESETS}
    assert member == {
        "light": {"ip-adapter_sd15"},      # the model check (SD1.5 only) is the loader's, not the structure's
        "standard": {"ip-adapter_sd15"},
        "vit-G": {"ip-adapter_sd15_vit-G", "ip-adapter_sdxl"},
        "plus": {"ip-adapter-plus_sd15", "ip-adapter-plus_sdxl_vit-h"},
        "plus-face": {"ip-adapter-plus_sd15", "ip-adapter-plus_sdxl_vit-h"},
        "full-face": {"ip-adapter-full-face_sd15"},
    }
    assert "made for a DiT" in preset_mismatch("standard", dit_adapter_spec("xlabs"))


def test_adapter_described_without_reading_weights(tmp_path):
    """A header-only file (no data at all) is described: only its header was read. A pickled .bin is read
    through the weights-only unpickler with its tensors mapped, not loaded."""
    spec = describe_adapter_file(_adapter_file(tmp_path, "ip-adapter-plus_sd15")).spec
    assert (spec.layout, spec.tokens, spec.encoder_width, spec.resampler_heads) == ("plus", 16, 1280, 12)
    path = tmp_path / "small.bin"
    save_synthetic_adapter(str(tmp_path / "small.safetensors"), "base", [32] * 16, 32, 24)
    from safetensors.torch import load_file
    torch.save(load_file(str(tmp_path / "small.safetensors")), path)
    assert describe_adapter_file(path).spec.encoder_width == 24
    write_header_only(tmp_path / "lora.safetensors", {"lora_unet_down.lora_down.weight": (4, 8)})
    found = describe_adapter_file(tmp_path / "lora.safetensors")
    assert found.spec is None and "LoRA" in found.problem


def test_needed_encoder_phrases():
    assert encoder_needed(_spec("base", [32], 32, 1024, encoder_name="CLIP ViT-H/14")) \
        == "CLIP ViT-H/14 image_embeds (1024 wide)"
    assert "pooled output (1152 wide" in encoder_needed(dit_adapter_spec("instantx-flux", encoder_width=1152))
    assert AUTO_CLIP_VISION == "auto (by content)"
