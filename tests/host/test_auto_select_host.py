"""Encoders and presets chosen by content, in the real host: 'IPAdapter Unified Loader (Fused)' and the all-in-one
node's 'auto (by content)' with the host's folder_paths pointed at temporary model folders.

Files: tiny real encoders whose output widths are the published ones where it matters (a 64-wide CLIP tower whose
image_embeds are 1024 wide reads as a ViT-H stand-in for image_embeds adapters), a tiny real SD1.5 adapter, and
header-only files (no data) for adapters that are only looked at, never loaded."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

import util
from dit_models import build_dit, diffusion_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers
from test_auto_select import ADAPTERS, write_header_only  # noqa: E402

CLIP_SIZES = dict(width=64, layers=2, intermediate=96, patch=14, image_size=56)


def _tm():
    util.load_runner()
    import importlib
    return importlib.import_module("ipaf_runner.tiny_models")


@pytest.fixture
def folders(host, tmp_path, monkeypatch):
    """(ipadapter folder, clip_vision folder): empty temporary folders the host's folder_paths lists."""
    ip, cv = tmp_path / "ipadapter", tmp_path / "clip_vision"
    ip.mkdir()
    cv.mkdir()
    fp = host.folder_paths
    monkeypatch.setitem(fp.folder_names_and_paths, "ipadapter", ([str(ip)], {".safetensors", ".bin"}))
    monkeypatch.setitem(fp.folder_names_and_paths, "clip_vision", ([str(cv)], {".safetensors", ".bin"}))
    return ip, cv


def _sd15_adapter(path, model, encoder_width=1024, seed=0):
    from ipadapter_fused.models import save_synthetic_adapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    save_synthetic_adapter(path, "base", [s.width for s in sites], sites[0].context_dim, encoder_width, tokens=1,
                           seed=seed)
    return path


def _node(name):
    from ipadapter_fused.nodes.ipadapter_nodes import NODE_CLASS_MAPPINGS
    return NODE_CLASS_MAPPINGS[name]()


def _populate(ip, cv, model):
    tm = _tm()
    tm.write_tiny_clip_vision(cv / "enc_a.safetensors", projection=768, **CLIP_SIZES)    # ViT-L-like image_embeds
    tm.write_tiny_clip_vision(cv / "enc_b.safetensors", projection=1024, **CLIP_SIZES)   # ViT-H-like image_embeds
    tm.write_tiny_siglip(cv / "enc_c.safetensors", **CLIP_SIZES)
    _sd15_adapter(ip / "first.safetensors", model)
    write_header_only(ip / "second.safetensors", {"lora_unet_down.lora_down.weight": (4, 8)})  # a LoRA
    write_header_only(ip / "third.safetensors", _plus_sdxl_shapes())


def _plus_sdxl_shapes():
    from ipadapter_fused.models.families import expected_shapes
    return expected_shapes(ADAPTERS["ip-adapter-plus_sdxl_vit-h"])


def test_unified_loader_finds_both_files_by_content(host, folders, tiny_sd15, tiny_clip_vision, sampler, cond):
    from ipadapter_fused.nodes.clip_vision import load_clip_vision
    from ipadapter_fused.nodes.loaders import load_adapter

    ip, cv = folders
    model = tiny_sd15()
    _populate(ip, cv, model)
    out = _node("IPAdapterFusedUnifiedLoader").load(model, "standard")
    got_model, adapter, clip_vision = out["result"]
    assert got_model is model
    assert adapter is load_adapter("first.safetensors")            # the only SD1.5 base adapter with 1024 inputs
    assert clip_vision is load_clip_vision("enc_b.safetensors")    # the only encoder with 1024-wide image_embeds
    assert out["ui"]["ipadapter_info"][0].startswith("first.safetensors: IP-Adapter for SD1.5")
    assert out["ui"]["ipadapter_info"][0].endswith("CLIP vision: enc_b.safetensors")

    # the all-in-one node's 'auto' takes the same encoder, and the prompt changes the picture
    torch = host.torch
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    simple = _node("IPAdapterFusedSimple")
    (patched,) = simple.apply(model, image, "first.safetensors", "auto (by content)", 1.0, "linear", 0.0, 1.0)
    (explicit,) = simple.apply(model, image, "first.safetensors", "enc_b.safetensors", 1.0, "linear", 0.0, 1.0)
    run = lambda m: sampler(m, cond("sd15", seed=1), cond("sd15", seed=2), steps=1, latent_size=16)  # noqa: E731
    auto_latent, plain = run(patched), run(model)
    assert torch.equal(auto_latent, run(explicit))
    assert not torch.equal(auto_latent, plain)


def test_errors_name_what_was_looked_for_and_each_file(host, folders, tiny_sd15, tiny_sdxl):
    ip, cv = folders
    model = tiny_sd15()
    _populate(ip, cv, model)
    loader = _node("IPAdapterFusedUnifiedLoader")
    with pytest.raises(ValueError) as err:
        loader.load(model, "plus")
    text = str(err.value)
    assert "is a Plus adapter (high strength): a resampler of CLIP ViT-H/14 penultimate hidden states (1280 wide)" in text
    assert str(ip) in text
    assert "first.safetensors -> IP-Adapter for SD1.5" in text and "[not a Plus adapter]" in text
    assert "second.safetensors -> " in text and "LoRA" in text
    assert "third.safetensors -> IP-Adapter Plus-type" in text and "for SDXL" in text

    with pytest.raises(ValueError, match="'light' exists for SD1.5 only"):
        loader.load(tiny_sdxl(), "light")

    # an SDXL Plus that fits is not found on SD1.5: the model check is part of the preset
    with pytest.raises(ValueError, match=r"third\.safetensors -> .*\[does not fit the model"):
        loader.load(model, "plus")

    # several files of one structure: named, and the explicit choice wins
    _sd15_adapter(ip / "fourth.safetensors", model, seed=1)
    with pytest.raises(ValueError, match=r"2 files .* first\.safetensors, fourth\.safetensors.*ipadapter_file"):
        loader.load(model, "light")
    _, adapter, _ = loader.load(model, "light", ipadapter_file="fourth.safetensors")["result"]
    assert adapter.name == "fourth.safetensors"

    # no encoder fits: what is needed, and what each file there is
    (cv / "enc_b.safetensors").unlink()
    with pytest.raises(ValueError) as err:
        loader.load(model, "standard", ipadapter_file="first.safetensors")
    text = str(err.value)
    assert "needs CLIP ViT-H/14 image_embeds (1024 wide)" in text
    assert "enc_a.safetensors -> CLIP vision tower of width 64 (hidden width 64, image_embeds 768" in text
    assert "enc_c.safetensors -> SigLIP vision tower of width 64" in text
    # an explicit encoder always wins (the apply node then names the width mismatch)
    _, _, chosen = loader.load(model, "standard", ipadapter_file="first.safetensors",
                               clip_vision_file="enc_a.safetensors")["result"]
    from ipadapter_fused.nodes.clip_vision import load_clip_vision
    assert chosen is load_clip_vision("enc_a.safetensors")


def test_dit_model_takes_the_adapter_that_fits(host, folders):
    from ipadapter_fused.models.synthetic import save_synthetic_dit_adapter
    from ipadapter_fused.nodes.dit_sites import dit_model

    ip, cv = folders
    flux = build_dit("flux")
    blocks = dit_model(diffusion_model(flux))
    kinds = [s.block for s in blocks.blocks]
    save_synthetic_dit_adapter(ip / "xlabs.safetensors", "xlabs", hidden=blocks.hidden_size, heads=blocks.heads,
                               tokens=4, encoder_width=1024, double_blocks=len(kinds) - kinds.count("single"))
    _sd15_adapter(ip / "unet.safetensors", util.build_unet("sd15"))
    _tm().write_tiny_clip_vision(cv / "enc.safetensors", projection=1024, **CLIP_SIZES)
    _, adapter, _ = _node("IPAdapterFusedUnifiedLoader").load(flux, "plus")["result"]
    assert adapter.name == "xlabs.safetensors" and adapter.spec.injection == "xlabs"


def test_models_ipadapter_created_at_startup(host, tmp_path, monkeypatch):
    from ipadapter_fused.nodes.loaders import register_folder

    fp = host.folder_paths
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setattr(fp, "models_dir", str(models))
    monkeypatch.setitem(fp.folder_names_and_paths, "ipadapter", (["/elsewhere/ipadapter"], {".safetensors"}))
    register_folder()
    assert (models / "ipadapter").is_dir()
    assert fp.get_folder_paths("ipadapter") == ["/elsewhere/ipadapter", str(models / "ipadapter")]
