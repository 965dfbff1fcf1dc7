"""Face-identity families recognised from key names and shapes: every published layout (full sizes as
shape-only meta tensors, tiny ones as real files in the published containers), the facts each family's
spec must carry, and damaged files refused with messages that say what is wrong."""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from models import (AdapterFormatError, IPAdapterWeights, detect_family, expected_shapes, load_adapter_file,
                    load_adapter_state)
from models.face_families import face_family_of
from models.synthetic import (FACE_KINDS, face_adapter_spec, save_synthetic_face_adapter, sd15_layer_dims,
                              sdxl_layer_dims, synthetic_adapter_state, synthetic_face_state)

SD15 = tuple(sd15_layer_dims(320))
SDXL = tuple(sdxl_layer_dims(320))

# The published files' facts (face_families.py's docstring names the sources), written out here rather than
# taken from the synthetic writer: kind, arch -> (tokens, context, token width, CLIP width or None, embedding,
# shortcut, crop, LoRA rank or None, perceiver/resampler (width, heads, depth, ff) or None, encoder).
PUBLISHED = {
    ("faceid", "sd15"): (4, 768, 768, None, "normed", "none", 224, 128, None, "insightface"),
    ("faceid", "sdxl"): (4, 2048, 2048, None, "normed", "none", 256, 128, None, "insightface"),
    ("faceid-plus", "sd15"): (4, 768, 768, 1280, "normed", "choice", 224, 128, (768, 12, 4, 3072), "insightface+clip"),
    ("faceid-plus", "sdxl"): (4, 2048, 2048, 1280, "normed", "choice", 256, 128, (2048, 32, 4, 8192),
                              "insightface+clip"),
    ("portrait", "sd15"): (16, 768, 768, None, "normed", "none", 224, None, None, "insightface"),
    ("portrait", "sdxl"): (16, 2048, 2048, None, "normed", "none", 256, None, None, "insightface"),
    ("face-resampler", "sdxl"): (16, 2048, 2048, None, "raw", "none", 256, None, (1280, 20, 4, 5120), "insightface"),
    ("kolors-faceid-plus", "kolors"): (6, 2048, 4096, 1024, "raw", "always", 336, None, (4096, 64, 4, 16384),
                                       "insightface+clip"),
}


@pytest.mark.parametrize("kind,arch", list(PUBLISHED))
def test_published_layouts_detected(kind, arch):
    tokens, ctx, width, clip, emb, shortcut, crop, rank, resampler, encoder = PUBLISHED[(kind, arch)]
    state = synthetic_face_state(kind, arch, "full", meta=True, dtype=torch.float16)
    spec = detect_family(state)
    face = spec.face
    assert face is not None and face.kind == kind and spec.encoder == encoder
    assert (spec.tokens, spec.context_dim, face.token_width) == (tokens, ctx, width)
    assert (face.embedding, face.shortcut, face.crop_size, face.embedding_width) == (emb, shortcut, crop, 512)
    assert face.uses_clip == (clip is not None)
    if clip is not None:
        assert spec.encoder_width == clip
        assert spec.encoder_name == ("CLIP ViT-L/14-336" if clip == 1024 else "CLIP ViT-H/14")
    assert spec.layer_dims == (SD15 if arch == "sd15" else SDXL)
    assert spec.arch_hint == arch
    if rank is None:
        assert spec.lora is None
    else:
        assert spec.lora.rank == rank and spec.lora.processors == tuple(range(2 * spec.num_layers))
    if resampler is not None:
        assert (spec.resampler_dim, spec.resampler_heads, spec.resampler_depth, spec.resampler_ff_dim) == resampler
    if spec.layout in ("faceid", "faceid-plus"):
        assert spec.proj_hidden_dim == 1024
    # the whole key set is the one the module holds, so the file loads strictly
    assert set(expected_shapes(spec)) == set(state)
    assert spec == face_adapter_spec(kind, arch, "full")


def test_published_shapes_spot_checks():
    """A few shapes of the published files, independent of the spec arithmetic."""
    s = synthetic_face_state("faceid", "sd15", "full", meta=True)
    assert s["image_proj.proj.0.weight"].shape == (1024, 512)
    assert s["image_proj.proj.2.weight"].shape == (3072, 1024)
    assert s["ip_adapter.0.to_q_lora.down.weight"].shape == (128, 320)
    assert s["ip_adapter.1.to_k_lora.down.weight"].shape == (128, 768)
    assert s["ip_adapter.31.to_out_lora.up.weight"].shape == (1280, 128)
    assert "ip_adapter.32.to_q_lora.down.weight" not in s
    s = synthetic_face_state("faceid-plus", "sdxl", "full", meta=True)
    assert s["image_proj.perceiver_resampler.proj_in.weight"].shape == (2048, 1280)
    assert s["image_proj.perceiver_resampler.layers.3.0.to_q.weight"].shape == (2048, 2048)
    assert s["ip_adapter.139.to_v_ip.weight"].shape == (1280, 2048)
    assert s["ip_adapter.138.to_v_lora.down.weight"].shape == (128, 1280)
    s = synthetic_face_state("kolors-faceid-plus", "kolors", "full", meta=True)
    assert s["image_proj.perceiver_resampler.layers.0.0.to_out.weight"].shape == (4096, 4096)
    assert s["image_proj.proj.2.weight"].shape == (6 * 4096, 1024)
    assert s["ip_adapter.1.to_k_ip.weight"].shape == (640, 2048)
    s = synthetic_face_state("face-resampler", "sdxl", "full", meta=True)
    assert s["image_proj.latents"].shape == (1, 16, 1280) and s["image_proj.proj_in.weight"].shape == (1280, 512)
    assert s["image_proj.proj_out.weight"].shape == (2048, 1280)


def test_summaries():
    plus = detect_family(synthetic_face_state("faceid-plus", "sd15", "full", meta=True)).describe()
    assert "FaceID Plus (V1/V2: choose on the apply node)" in plus
    assert "LoRA rank 128 on 32 attention layers (applied automatically)" in plus
    assert "for SD1.5" in plus and "CLIP ViT-H/14" in plus and "224-px" in plus and "\n" not in plus
    xl = detect_family(synthetic_face_state("faceid", "sdxl", "full", meta=True)).describe()
    assert "for SDXL" in xl and "LoRA rank 128 on 140 attention layers" in xl
    kolors = detect_family(synthetic_face_state("kolors-faceid-plus", "kolors", "full", meta=True)).describe()
    assert "for Kolors" in kolors and "encoder_hid_proj (4096 -> 2048)" in kolors and "raw" in kolors
    instantid = detect_family(synthetic_face_state("face-resampler", "sdxl", "full", meta=True))
    assert "InstantID" in instantid.family_name and "raw, not normed" in instantid.describe()
    portrait = detect_family(synthetic_face_state("portrait", "sd15", "full", meta=True)).describe()
    assert "Portrait" in portrait and "16 tokens" in portrait and "no LoRA" in portrait


def test_encoder_of_the_clip_and_dit_families():
    from models.synthetic import synthetic_dit_adapter_state

    assert detect_family(synthetic_adapter_state("base", [8], 12, 20)).encoder == "clip-embeds"
    assert detect_family(synthetic_adapter_state("plus", [8], 12, 20)).encoder == "clip-hidden"
    assert detect_family(synthetic_adapter_state("full-face", [8], 12, 20)).encoder == "clip-hidden"
    assert detect_family(synthetic_dit_adapter_state("xlabs")).encoder == "clip-embeds"
    assert detect_family(synthetic_dit_adapter_state("instantx-flux")).encoder == "siglip-pooled"
    assert detect_family(synthetic_dit_adapter_state("instantx-sd3")).encoder == "siglip-hidden"
    for spec in (detect_family(synthetic_adapter_state("plus", [8], 12, 1280)),):
        assert spec.face is None and spec.lora is None  # a CLIP Plus is not a face family


def test_kolors_plus_names_its_encoder():
    """Kolors IP-Adapter-Plus: an SDXL-shaped Plus with a 2048-wide, 12-head resampler over CLIP ViT-L/14-336."""
    from models import AdapterSpec

    spec = AdapterSpec(layout="plus", tokens=16, context_dim=2048, encoder_width=1024, encoder_input="penultimate",
                       encoder_name="x", num_layers=70, layer_dims=SDXL, resampler_dim=2048, resampler_heads=12,
                       resampler_depth=4, resampler_ff_dim=8192)
    state = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in expected_shapes(spec).items()}
    got = detect_family(state)
    assert got.face is None and got.encoder == "clip-hidden"
    assert got.encoder_name == "CLIP ViT-L/14-336" and got.arch_hint == "kolors"
    assert (got.resampler_dim, got.resampler_heads, got.tokens) == (2048, 12, 16)
    assert "for Kolors" in got.describe()
    # SDXL Plus (1280 wide, ViT-H) is unchanged
    sdxl = detect_family(synthetic_adapter_state("plus", [8] * 70, 2048, 1280, resampler_dim=64, resampler_heads=1,
                                                 depth=1))
    assert sdxl.arch_hint == "sdxl" and sdxl.encoder_name == "CLIP ViT-H/14"


# --------------------------------------------------------------------------- files in their containers

TINY = dict(context_dim=64, model_channels=8)


@pytest.mark.parametrize("kind", FACE_KINDS)
@pytest.mark.parametrize("container", ["nested.bin", "flat.bin", "flat.safetensors"])
def test_files_round_trip(tmp_path, kind, container):
    layers_group = "adapter_modules" if kind == "kolors-faceid-plus" and container == "nested.bin" else "ip_adapter"
    path = tmp_path / f"adapter.{container.split('.')[1]}"
    state = save_synthetic_face_adapter(path, kind, nested=container.startswith("nested"),
                                        layers_group=layers_group, **TINY)
    groups = load_adapter_state(path)
    assert sorted(groups) == ["image_proj", "ip_adapter"]  # adapter_modules is read as ip_adapter
    if container.startswith("nested"):
        raw = torch.load(path, weights_only=True)
        assert sorted(raw) == sorted({"image_proj", layers_group})
    w = load_adapter_file(path)
    assert isinstance(w, IPAdapterWeights) and w.spec.face.kind == kind
    own = w.state_dict()
    flat = {k.replace("adapter_modules.", "ip_adapter.", 1): t for k, t in state.items()}
    assert sorted(own) == sorted(flat)
    for k, t in flat.items():
        assert torch.equal(own[k], t), k


def test_stripped_faceid_loads_without_lora():
    """A FaceID file whose LoRA was taken out (4 MLP tokens, no LoRA keys) is still FaceID; its summary
    says the LoRA is missing, so the apply node can warn."""
    state = synthetic_face_state("faceid", lora=False, **TINY)
    assert not any("_lora." in k for k in state)
    spec = detect_family(state)
    assert spec.face.kind == "faceid" and spec.lora is None
    assert "no LoRA in this file" in spec.describe()
    assert IPAdapterWeights.from_state(state).lora_weights() == {}


def test_face_family_of_only_claims_face_files():
    assert face_family_of(synthetic_adapter_state("plus", [8], 12, 20)) is None
    assert face_family_of(synthetic_adapter_state("full-face", [8], 12, 20)) is None
    assert face_family_of(synthetic_adapter_state("base", [8], 12, 20)) is None
    for kind in FACE_KINDS:
        assert face_family_of(synthetic_face_state(kind, meta=True, **TINY)) == kind


# --------------------------------------------------------------------------- damaged files


def _damaged(kind, edit, **dims):
    state = synthetic_face_state(kind, meta=True, **{**TINY, **dims})
    edit(state)
    with pytest.raises(AdapterFormatError) as info:
        detect_family(state)
    return str(info.value)


def test_missing_lora_up_weight():
    msg = _damaged("faceid", lambda s: s.pop("ip_adapter.5.to_k_lora.up.weight"))
    assert "ip_adapter.5.to_k_lora.up.weight is missing" in msg and "down" in msg


def test_wrong_lora_rank():
    def edit(s):
        s["ip_adapter.7.to_v_lora.down.weight"] = torch.empty(8, 64, device="meta")
        s["ip_adapter.7.to_v_lora.up.weight"] = torch.empty(s["ip_adapter.7.to_v_lora.up.weight"].shape[0], 8,
                                                            device="meta")
    msg = _damaged("faceid-plus", edit)
    assert "rank 4" in msg and "rank 8" in msg and "ip_adapter.7.to_v_lora" in msg


def test_lora_missing_for_some_processors():
    msg = _damaged("faceid", lambda s: [s.pop(k) for k in list(s) if k.startswith("ip_adapter.6.") and "_lora." in k])
    assert "processors 6" in msg and "missing" in msg


def test_lora_with_wrong_input_width():
    """attn2's K LoRA must read the context width; a layer-width one is a shape error naming the key."""
    def edit(s):
        s["ip_adapter.1.to_k_lora.down.weight"] = torch.empty(4, 8, device="meta")
    msg = _damaged("faceid", edit)
    assert "ip_adapter.1.to_k_lora.down.weight is (4, 8), expected (4, 64)" in msg and "FaceID" in msg


def test_missing_perceiver_layer():
    def edit(s):
        for k in [k for k in s if k.startswith("image_proj.perceiver_resampler.layers.1.")]:
            del s[k]
    msg = _damaged("faceid-plus", edit, depth=3)
    assert "FaceID Plus" in msg and "perceiver_resampler.layers.1.*" in msg and "is missing" in msg
    assert "layers 0, 2" in msg


def test_missing_perceiver_part():
    msg = _damaged("faceid-plus", lambda s: s.pop("image_proj.perceiver_resampler.proj_in.weight"))
    assert "image_proj.perceiver_resampler.proj_in.weight is missing" in msg


def test_lora_where_the_family_has_none():
    msg = _damaged("kolors-faceid-plus", lambda s: s.update(
        {"ip_adapter.0.to_q_lora.down.weight": torch.empty(4, 64, device="meta")}))
    assert "Kolors" in msg and "no LoRA" in msg
    msg = _damaged("face-resampler", lambda s: s.update(
        {"ip_adapter.0.to_q_lora.down.weight": torch.empty(4, 64, device="meta")}))
    assert "resampler" in msg and "no LoRA" in msg


def test_mlp_and_layers_disagree():
    msg = _damaged("portrait", lambda s: s.update({"image_proj.norm.weight": torch.empty(32, device="meta"),
                                                   "image_proj.norm.bias": torch.empty(32, device="meta")}))
    assert "width 32" in msg and "width 64" in msg


def test_unknown_lora_key():
    msg = _damaged("faceid", lambda s: s.update({"ip_adapter.1.to_x_lora.down.weight": torch.empty(4, 4,
                                                                                                  device="meta")}))
    assert "ip_adapter.1.to_x_lora.down.weight" in msg


def test_damaged_file_named(tmp_path):
    state = synthetic_face_state("faceid", **TINY)
    del state["ip_adapter.2.to_out_lora.up.weight"]
    save_file(state, tmp_path / "faceid_broken.safetensors")
    with pytest.raises(AdapterFormatError, match=r"^faceid_broken\.safetensors: .*to_out_lora\.up\.weight is missing"):
        load_adapter_file(tmp_path / "faceid_broken.safetensors")


def test_specs_are_frozen_and_comparable():
    spec = face_adapter_spec("faceid")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.face.kind = "portrait"
    assert spec == face_adapter_spec("faceid") and hash(spec) == hash(face_adapter_spec("faceid"))


def test_spec_parts():
    """The spec's encoder / projection / layers / LoRA parts, for a face family and a CLIP one."""
    spec = detect_family(synthetic_face_state("kolors-faceid-plus", "kolors", "full", meta=True))
    enc, proj, layers = spec.encoder_part, spec.projection, spec.layers
    assert (enc.name, enc.model, enc.input, enc.width, enc.face.kind) == (
        "insightface+clip", "CLIP ViT-L/14-336", "penultimate", 1024, "kolors-faceid-plus")
    assert (proj.layout, proj.tokens, proj.token_width, proj.resampler, proj.hidden_dim) == (
        "faceid-plus", 6, 4096, (4096, 64, 4, 16384), 1024)
    assert (layers.architecture, layers.context_dim, layers.widths, layers.arch_hint) == ("unet", 2048, SDXL, "kolors")
    assert spec.lora is None
    plus = detect_family(synthetic_adapter_state("plus", [8, 16], 12, 20, resampler_dim=64, resampler_heads=1, depth=2))
    assert (plus.encoder_part.name, plus.encoder_part.face, plus.projection.token_width) == ("clip-hidden", None, 12)
    assert plus.projection.resampler == (64, 1, 2, 256) and plus.layers.widths == (8, 16) and not plus.layers.gated
