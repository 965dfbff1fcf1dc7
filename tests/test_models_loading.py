"""Adapter files: safe reading, family detection, strict loading, K/V computation."""
import copy
import os
import pathlib
import pickle
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ipadapter_fused.models import (
    AdapterFormatError,
    IPAdapterWeights,
    detect_family,
    load_adapter_file,
    load_adapter_state,
)
from ipadapter_fused.models.synthetic import (
    nest_state,
    save_synthetic_adapter,
    sd15_layer_dims,
    sdxl_layer_dims,
    synthetic_adapter_state,
)

MODELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "models"

# Tiny but structurally complete adapters: (layout, kwargs for the synthetic builder, expected fields).
SMALL = {
    "base": (dict(layer_dims=[8, 16, 8], context_dim=12, encoder_width=20), dict(tokens=4)),
    "base-6tok": (dict(layer_dims=[8, 16, 8], context_dim=12, encoder_width=20, tokens=6), dict(tokens=6)),
    "plus": (
        dict(layer_dims=[8, 16, 8], context_dim=12, encoder_width=20, resampler_dim=24, resampler_heads=2,
             depth=2),
        dict(tokens=16, resampler_dim=24, resampler_heads=2, resampler_depth=2, resampler_ff_dim=96),
    ),
    "full-face": (dict(layer_dims=[8, 16, 8], context_dim=12, encoder_width=20), dict(tokens=257)),
}


def _layout(name):
    return name.split("-6")[0] if name.startswith("base") else name


def _write(path, layout, nested=True, **kw):
    return save_synthetic_adapter(path, layout, nested=nested, **kw)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("fmt", ["x.safetensors", "nested.bin", "flat.bin", "nested.pt", "nested.pth"])
def test_round_trip_and_detection(tmp_path, name, fmt):
    kw, want = SMALL[name]
    layout = _layout(name)
    path = tmp_path / f"adapter_{fmt}"
    state = _write(path, layout, nested=fmt.startswith("nested"), **kw)

    groups = load_adapter_state(path)
    assert set(groups) == {"image_proj", "ip_adapter"}
    assert set(groups["ip_adapter"]) == {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight",
                                         "3.to_v_ip.weight", "5.to_k_ip.weight", "5.to_v_ip.weight"}

    spec = detect_family(groups)
    assert spec.layout == layout
    assert spec.context_dim == 12
    assert spec.encoder_width == 20
    assert spec.num_layers == 3 and spec.layer_dims == (8, 16, 8)
    assert spec.encoder_input == ("image_embeds" if layout == "base" else "penultimate")
    assert spec.encoder_name == "CLIP vision of width 20"
    assert spec.arch_hint is None
    for field, value in want.items():
        assert getattr(spec, field) == value, field
    assert detect_family(state) == spec  # flat dicts are accepted too

    weights = load_adapter_file(path)
    assert isinstance(weights, torch.nn.Module)
    assert weights.spec == spec
    sd = weights.state_dict()
    assert set(sd) == set(state)
    for key, t in state.items():
        assert torch.equal(sd[key], t), key
    assert spec.describe() in repr(weights)


def test_adapter_modules_alias(tmp_path):
    state = synthetic_adapter_state("base", [8, 8], 12, 20)
    renamed = {k.replace("ip_adapter.", "adapter_modules."): v for k, v in state.items()}
    save_file(renamed, tmp_path / "a.safetensors")
    assert load_adapter_file(tmp_path / "a.safetensors").spec.num_layers == 2


def test_content_decides_container_not_extension(tmp_path):
    state = synthetic_adapter_state("base", [8, 8], 12, 20)
    save_file(state, tmp_path / "renamed.bin")
    assert set(load_adapter_state(tmp_path / "renamed.bin")) == {"image_proj", "ip_adapter"}


def test_real_unet_layer_counts_small_widths(tmp_path):
    sd15 = sd15_layer_dims(8)
    sdxl = sdxl_layer_dims(8)
    assert sd15 == [8, 8, 16, 16, 32, 32, 32, 32, 32, 16, 16, 16, 8, 8, 8, 32]
    assert len(sdxl) == 70
    assert sdxl[:4] == [16] * 4 and sdxl[4:24] == [32] * 20 and sdxl[24:54] == [32] * 30
    assert sdxl[54:60] == [16] * 6 and sdxl[60:] == [32] * 10

    _write(tmp_path / "sd15.safetensors", "plus", layer_dims=sd15, context_dim=12, encoder_width=20,
           resampler_dim=16, resampler_heads=1, depth=1)
    _write(tmp_path / "sdxl.bin", "base", layer_dims=sdxl, context_dim=12, encoder_width=20)
    a = load_adapter_file(tmp_path / "sd15.safetensors")
    b = load_adapter_file(tmp_path / "sdxl.bin")
    assert a.spec.num_layers == 16 and a.spec.layer_dims == tuple(sd15)
    assert b.spec.num_layers == 70 and b.spec.layer_dims == tuple(sdxl)
    # the checkpoint index of layer i is 2i+1, all the way to 139 for SDXL
    assert "ip_adapter.139.to_v_ip.weight" in b.state_dict()
    assert b.state_dict()["ip_adapter.139.to_v_ip.weight"].shape == (32, 12)


# --------------------------------------------------------------------------- published shapes

# Shapes written out by hand from the public checkpoints (not from expected_shapes), built as
# meta tensors so that full-size adapters cost no memory.


def _meta(shape):
    return torch.empty(shape, device="meta")


def _layers(widths, ctx):
    out = {}
    for i, w in enumerate(widths):
        out[f"{2 * i + 1}.to_k_ip.weight"] = _meta((w, ctx))
        out[f"{2 * i + 1}.to_v_ip.weight"] = _meta((w, ctx))
    return out


def _base_proj(tokens, ctx, enc):
    return {"proj.weight": _meta((tokens * ctx, enc)), "proj.bias": _meta((tokens * ctx,)),
            "norm.weight": _meta((ctx,)), "norm.bias": _meta((ctx,))}


def _plus_proj(dim, heads, enc, ctx, tokens=16, depth=4):
    inner = heads * 64
    p = {"latents": _meta((1, tokens, dim)), "proj_in.weight": _meta((dim, enc)), "proj_in.bias": _meta((dim,)),
         "proj_out.weight": _meta((ctx, dim)), "proj_out.bias": _meta((ctx,)),
         "norm_out.weight": _meta((ctx,)), "norm_out.bias": _meta((ctx,))}
    for i in range(depth):
        for n in ("norm1", "norm2"):
            p[f"layers.{i}.0.{n}.weight"] = _meta((dim,))
            p[f"layers.{i}.0.{n}.bias"] = _meta((dim,))
        p[f"layers.{i}.0.to_q.weight"] = _meta((inner, dim))
        p[f"layers.{i}.0.to_kv.weight"] = _meta((2 * inner, dim))
        p[f"layers.{i}.0.to_out.weight"] = _meta((dim, inner))
        p[f"layers.{i}.1.0.weight"] = _meta((dim,))
        p[f"layers.{i}.1.0.bias"] = _meta((dim,))
        p[f"layers.{i}.1.1.weight"] = _meta((4 * dim, dim))
        p[f"layers.{i}.1.3.weight"] = _meta((dim, 4 * dim))
    return p


def _full_proj(enc, ctx):
    return {"proj.0.weight": _meta((enc, enc)), "proj.0.bias": _meta((enc,)),
            "proj.2.weight": _meta((ctx, enc)), "proj.2.bias": _meta((ctx,)),
            "proj.3.weight": _meta((ctx,)), "proj.3.bias": _meta((ctx,))}


SD15 = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
SDXL = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10

PUBLISHED = {
    # name: (image_proj, ctx, widths, expected fields)
    "ip-adapter_sd15 / sd15_light": (_base_proj(4, 768, 1024), 768, SD15,
                                     dict(layout="base", tokens=4, encoder_width=1024, arch_hint="sd15",
                                          encoder_name="CLIP ViT-H/14", encoder_input="image_embeds")),
    "ip-adapter_sd15_vit-G": (_base_proj(4, 768, 1280), 768, SD15,
                              dict(layout="base", encoder_width=1280, encoder_name="CLIP ViT-bigG/14")),
    "ip-adapter_sdxl": (_base_proj(4, 2048, 1280), 2048, SDXL,
                        dict(layout="base", encoder_width=1280, arch_hint="sdxl", encoder_name="CLIP ViT-bigG/14")),
    "ip-adapter_sdxl_vit-h": (_base_proj(4, 2048, 1024), 2048, SDXL,
                              dict(layout="base", encoder_width=1024, encoder_name="CLIP ViT-H/14")),
    "ip-adapter-plus(-face)_sd15": (_plus_proj(768, 12, 1280, 768), 768, SD15,
                                    dict(layout="plus", tokens=16, resampler_dim=768, resampler_heads=12,
                                         resampler_depth=4, resampler_ff_dim=3072, encoder_width=1280,
                                         encoder_input="penultimate", encoder_name="CLIP ViT-H/14",
                                         arch_hint="sd15")),
    "ip-adapter-plus(-face)_sdxl_vit-h / composition": (
        _plus_proj(1280, 20, 1280, 2048), 2048, SDXL,
        dict(layout="plus", tokens=16, resampler_dim=1280, resampler_heads=20, encoder_width=1280,
             arch_hint="sdxl", context_dim=2048)),
    "ip-adapter-full-face_sd15": (_full_proj(1280, 768), 768, SD15,
                                  dict(layout="full-face", tokens=257, encoder_width=1280,
                                       encoder_input="penultimate", encoder_name="CLIP ViT-H/14")),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_shapes_detected(name):
    proj, ctx, widths, want = PUBLISHED[name]
    spec = detect_family({"image_proj": proj, "ip_adapter": _layers(widths, ctx)})
    assert spec.context_dim == ctx
    assert spec.layer_dims == tuple(widths)
    assert spec.num_layers == len(widths)
    for field, value in want.items():
        assert getattr(spec, field) == value, field
    text = spec.describe()
    assert str(spec.num_layers) in text and spec.encoder_name in text


# --------------------------------------------------------------------------- unsafe pickles


class _Payload:
    """Unpickling this would create a directory: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle", "protocol 0"])
def test_malicious_pickle_refused_without_running(tmp_path, how):
    marker = tmp_path / "code_ran"
    obj = {"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": {"evil": _Payload(marker)}}
    path = tmp_path / "evil.bin"
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=0 if how == "protocol 0" else 2)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_state(path)
    assert not marker.exists()
    msg = str(info.value)
    if how == "protocol 0":  # torch never writes these; refused before any unpickling
        assert "neither a safetensors file nor a torch checkpoint" in msg
        return
    assert "refused for safety" in msg and "non-tensor" in msg and ".safetensors" in msg
    assert "weights_only=False" not in msg  # never advise the unsafe route
    with pytest.raises(AdapterFormatError):
        load_adapter_file(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- damaged files


def test_damaged_containers(tmp_path):
    save_synthetic_adapter(tmp_path / "ok.safetensors", "base", [8, 8], 12, 20)
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint at all")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a checkpoint at all")
    (tmp_path / "empty.bin").write_bytes(b"")
    save_synthetic_adapter(tmp_path / "ok.bin", "base", [8, 8], 12, 20)
    zipdata = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(zipdata[: len(zipdata) // 2])
    for name, words in [("cut.safetensors", "damaged"), ("junk.bin", "damaged"),
                        ("junk.safetensors", "safetensors header"), ("empty.bin", "empty"),
                        ("cut.bin", "damaged")]:
        with pytest.raises(AdapterFormatError, match=words):
            load_adapter_state(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_adapter_state(tmp_path / "absent.safetensors")


def test_header_claiming_more_than_the_file_is_refused_unread(tmp_path, monkeypatch):
    """The length is compared with the file size before anything is read: neither safetensors
    nor our own header parser may be handed a claimed length it would have to allocate."""
    import safetensors.torch

    def must_not_run(*a, **k):
        raise AssertionError("safetensors was asked to read a file whose header lies about its size")

    monkeypatch.setattr(safetensors.torch, "load_file", must_not_run)
    for claim in (2**62, 2**40, 10_000):
        path = tmp_path / "liar.safetensors"
        path.write_bytes(struct.pack("<Q", claim) + b'{"a": {"dtype": "F32"' + b" " * 64)
        with pytest.raises(AdapterFormatError) as info:
            load_adapter_file(path)
        msg = str(info.value)
        assert msg.startswith("liar.safetensors: ") and f"claims {claim:,} bytes" in msg, msg
        assert f"only {path.stat().st_size:,}" in msg
    # a claim inside the file but beyond any real header (100 MB): refused the same way, sparse file
    path = tmp_path / "big_header.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 200 * 2**20) + b"{")
        f.truncate(8 + 200 * 2**20 + 16)
    with pytest.raises(AdapterFormatError, match="claims 209,715,200 bytes, more than any model"):
        load_adapter_state(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["ip_adapter.3.to_v_ip.weight", "image_proj.norm.bias"])
def test_non_finite_weights_refused_naming_the_key(tmp_path, value, where):
    state = synthetic_adapter_state("base", [8, 16, 8], 12, 20)
    state[where] = state[where].clone()
    state[where].view(-1)[1] = value
    save_file(state, tmp_path / "diverged.safetensors")
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(tmp_path / "diverged.safetensors")
    msg = str(info.value)
    nan = 1 if value != value else 0
    assert msg.startswith("diverged.safetensors: ") and f"'{where}' ({nan} NaN, {1 - nan} infinite)" in msg, msg
    torch.save(nest_state(state), tmp_path / "diverged.bin")  # same check for pickles
    with pytest.raises(AdapterFormatError, match=f"diverged.bin: .*'{where}'"):
        load_adapter_file(tmp_path / "diverged.bin")


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "photos.bin", "w") as z:
        z.writestr("holiday/img1.jpg", b"\xff\xd8" + b"0" * 100)
        z.writestr("notes.txt", "hi")
    with pytest.raises(AdapterFormatError, match=r"photos\.bin: the file is a zip archive holding "
                                                 r"'holiday/img1\.jpg', 'notes\.txt'.*no data\.pkl"):
        load_adapter_file(tmp_path / "photos.bin")
    # a real torch zip holding allowed but unexpected objects: named, not executed
    torch.save({"ip_adapter": {"1.to_k_ip.weight": [1.0, 2.0]}, "note": "text"}, tmp_path / "objects.bin")
    with pytest.raises(AdapterFormatError, match=r"objects\.bin: .*not tensors: 'ip_adapter\.1\.to_k_ip\.weight' "
                                                 r"\(list\), 'note' \(str\)"):
        load_adapter_file(tmp_path / "objects.bin")


def test_refusal_never_advises_allow_listing(tmp_path):
    torch.save({"a": torch.nn.Linear(2, 2)}, tmp_path / "module.bin")
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(tmp_path / "module.bin")
    msg = str(info.value)
    assert "torch.nn.modules.linear.Linear" in msg and "refused for safety" in msg
    for advice in ("add_safe_globals", "safe_globals", "weights_only=False", "weights_only` set to `False"):
        assert advice not in msg


def test_foreign_model_judged_from_its_header_alone(tmp_path):
    """A UNet's header is enough to refuse it: the data after the header is cut off here, so a
    reader that loaded the tensors first would fail with a damaged-file error instead."""
    unet = {"input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3), "middle_block.1.proj_in.weight": torch.zeros(32, 32),
            "time_embed.0.weight": torch.zeros(128, 32), "out.2.weight": torch.zeros(4, 32, 3, 3)}
    save_file(unet, tmp_path / "unet.safetensors")
    data = (tmp_path / "unet.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    (tmp_path / "unet.safetensors").write_bytes(data[:header_end + 16])
    with pytest.raises(AdapterFormatError, match=r"^unet\.safetensors: found keys like 'input_blocks\.0\.0\.weight'.*"
                                                 r"UNet \(diffusion model\).*models/diffusion_models"):
        load_adapter_file(tmp_path / "unet.safetensors")
    # integer tensors with an adapter's keys and shapes: refused from the header too
    state = synthetic_adapter_state("base", [8, 16, 8], 12, 20)
    save_file({k: (v * 100).to(torch.int32) for k, v in state.items()}, tmp_path / "ints.safetensors")
    with pytest.raises(AdapterFormatError, match=r"^ints\.safetensors: weights .* of type torch\.int32; "
                                                 r"expected floating-point"):
        load_adapter_file(tmp_path / "ints.safetensors")


def test_non_dict_pickle(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(AdapterFormatError, match="not a dictionary"):
        load_adapter_state(tmp_path / "list.pt")


def test_non_tensor_values_named(tmp_path):
    nested = nest_state(synthetic_adapter_state("base", [8, 8], 12, 20))
    nested["ip_adapter"]["1.to_k_ip.weight"] = 3  # weights_only allows ints, we do not
    torch.save(nested, tmp_path / "int.bin")
    with pytest.raises(AdapterFormatError, match=r"not tensors: 'ip_adapter\.1\.to_k_ip\.weight' \(int\)"):
        load_adapter_state(tmp_path / "int.bin")
    with pytest.raises(AdapterFormatError, match="not tensors"):
        detect_family(nested)


def _base_groups():
    return nest_state(synthetic_adapter_state("base", [8, 16, 8], 12, 20))


def _mutated(fn):
    g = _base_groups()
    fn(g)
    return g


BROKEN = {
    "full checkpoint": (
        lambda g: g.clear() or g.update({"model": {"diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}}),
        ["model.diffusion_model.input_blocks.0.0.weight", "full Stable Diffusion checkpoint"]),
    "lora": (
        lambda g: g.clear() or g.update({"": {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}}),
        ["LoRA"]),
    "clip vision": (
        lambda g: g.clear() or g.update({"vision_model": {"embeddings.patch_embedding.weight": torch.zeros(2)}}),
        ["CLIP vision"]),
    "no image_proj": (lambda g: g.pop("image_proj"), ["no 'image_proj'"]),
    "no ip_adapter": (lambda g: g.pop("ip_adapter"), ["no 'ip_adapter'"]),
    "gap": (lambda g: [g["ip_adapter"].pop(k) for k in ("3.to_k_ip.weight", "3.to_v_ip.weight")],
            ["gaps", "3", "consecutive odd"]),
    "even index": (lambda g: g["ip_adapter"].update({"2.to_k_ip.weight": torch.zeros(8, 12),
                                                     "2.to_v_ip.weight": torch.zeros(8, 12)}),
                   ["odd"]),
    "k/v mismatch": (lambda g: g["ip_adapter"].update({"3.to_v_ip.weight": torch.zeros(8, 12)}),
                     ["to_k_ip is (16, 12) but to_v_ip is (8, 12)"]),
    "lone k": (lambda g: g["ip_adapter"].pop("5.to_v_ip.weight"), ["5.to_v_ip.weight is missing"]),
    "wrong ndim": (lambda g: g["ip_adapter"].update({"1.to_k_ip.weight": torch.zeros(8, 12, 1),
                                                     "1.to_v_ip.weight": torch.zeros(8, 12, 1)}),
                   ["2-d"]),
    "context differs across layers": (
        lambda g: g["ip_adapter"].update({"5.to_k_ip.weight": torch.zeros(8, 10),
                                          "5.to_v_ip.weight": torch.zeros(8, 10)}),
        ["context width 10"]),
    "image_proj vs layers width": (
        lambda g: g["image_proj"].update({"norm.weight": torch.ones(6), "norm.bias": torch.zeros(6)}),
        ["width 6", "width 12"]),
    "proj rows not multiple": (
        lambda g: g["image_proj"].update({"norm.weight": torch.ones(10), "norm.bias": torch.zeros(10)}),
        ["not a multiple"]),
    "unexpected image_proj key": (lambda g: g["image_proj"].update({"extra.weight": torch.zeros(3)}),
                                  ["unexpected", "image_proj.extra.weight"]),
    "bias shape": (lambda g: g["image_proj"].update({"proj.bias": torch.zeros(5)}),
                   ["image_proj.proj.bias is (5,), expected (48,)"]),
    "missing bias": (lambda g: g["image_proj"].pop("norm.bias"), ["missing", "image_proj.norm.bias"]),
    "integer weights": (lambda g: g["ip_adapter"].update({"1.to_k_ip.weight": torch.zeros(8, 12, dtype=torch.int64),
                                                          "1.to_v_ip.weight": torch.zeros(8, 12, dtype=torch.int64)}),
                        ["floating-point"]),
    "unknown image_proj": (lambda g: g.update({"image_proj": {"mystery.weight": torch.zeros(2, 2)}}),
                           ["unrecognised image_proj layout", "mystery.weight"]),
    "unknown layer keys": (lambda g: g["ip_adapter"].update({"single_blocks.0.to_k_ip.weight": torch.zeros(2, 2)}),
                           ["unexpected ip_adapter keys", "not supported yet"]),
    "extra group": (lambda g: g.update({"controlnet": {"x.weight": torch.zeros(2)}}),
                    ["controlnet.x.weight"]),
    "mip-adapter gate on one layer": (lambda g: g["ip_adapter"].update({"1.text_to_weight.weight": torch.zeros(1, 8)}),
                                      ["MIP-Adapter", "have none", "3", "5"]),
    "faceid lora": (lambda g: g["ip_adapter"].update({"0.to_q_lora.down.weight": torch.zeros(2, 2)}),
                    ["FaceID", "not the FaceID MLP", "0.to_q_lora.down.weight"]),
    "faceid plus": (lambda g: g["image_proj"].update({"perceiver_resampler.proj_in.weight": torch.zeros(2, 2)}),
                    ["FaceID Plus", "proj.0.weight is missing"]),
    "faceid / portrait mlp": (
        lambda g: g.update({"image_proj": {"proj.0.weight": torch.zeros(1024, 500), "proj.0.bias": torch.zeros(1024),
                                           "proj.2.weight": torch.zeros(48, 1024), "proj.2.bias": torch.zeros(48),
                                           "norm.weight": torch.ones(12), "norm.bias": torch.zeros(12)}}),
        ["FaceID", "reads 500 values", "512"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_states_explained(tmp_path, name):
    fn, words = BROKEN[name]
    groups = _mutated(fn)
    with pytest.raises(AdapterFormatError) as info:
        detect_family(groups)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    # the same through a file, with the file name in front
    flat = {(f"{g}.{k}" if g else k): t for g, sub in groups.items() for k, t in sub.items()}
    path = tmp_path / "broken.safetensors"
    save_file(flat, path)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter_file(path)
    assert str(info.value).startswith("broken.safetensors")


def test_plus_with_missing_resampler_layer():
    state = synthetic_adapter_state("plus", [8], 12, 20, resampler_dim=16, resampler_heads=1, depth=3)
    for k in [k for k in state if k.startswith("image_proj.layers.1.")]:
        del state[k]
    with pytest.raises(AdapterFormatError, match=r"missing .*image_proj\.layers\.1\..*unexpected .*layers\.2"):
        detect_family(state)


def test_from_state_strict_keys():
    state = synthetic_adapter_state("full-face", [8], 12, 20)
    state["image_proj.proj.1.weight"] = torch.zeros(3)
    with pytest.raises(AdapterFormatError, match=r"image_proj\.proj\.1\.weight"):
        IPAdapterWeights.from_state(state)


# --------------------------------------------------------------------------- the module


def _weights(layout="plus", dtype=torch.float32, **kw):
    args = dict(layer_dims=[8, 16, 24], context_dim=12, encoder_width=20)
    if layout == "plus":
        args.update(resampler_dim=16, resampler_heads=1, depth=2)
    args.update(kw)
    state = synthetic_adapter_state(layout, dtype=dtype, **args)
    return IPAdapterWeights.from_state(state), state


def test_layer_kv_matches_checkpoint_weights():
    w, state = _weights()
    tokens = torch.randn(2, 5, 12)
    all_kv = w.all_layer_kv(tokens)
    assert len(all_kv) == 3
    for i in range(3):
        n = 2 * i + 1
        k, v = w.layer_kv(i, tokens)
        torch.testing.assert_close(k, F.linear(tokens, state[f"ip_adapter.{n}.to_k_ip.weight"]), rtol=0, atol=0)
        torch.testing.assert_close(v, F.linear(tokens, state[f"ip_adapter.{n}.to_v_ip.weight"]), rtol=0, atol=0)
        assert k.shape == (2, 5, w.spec.layer_dims[i])
        torch.testing.assert_close(all_kv[i][0], k, rtol=0, atol=0)
        torch.testing.assert_close(all_kv[i][1], v, rtol=0, atol=0)
    with pytest.raises(IndexError):
        w.layer_kv(3, tokens)
    with pytest.raises(ValueError, match="width 11"):
        w.layer_kv(0, torch.randn(1, 4, 11))


def test_image_tokens_shapes_and_casting():
    w, _ = _weights("plus")
    t = w.image_tokens(torch.randn(3, 7, 20, dtype=torch.float64))
    assert t.shape == (3, 16, 12) and t.dtype == torch.float32 and torch.isfinite(t).all()
    assert w.image_tokens(torch.randn(7, 20)).shape == (1, 16, 12)
    with pytest.raises(ValueError, match="E = 20"):
        w.image_tokens(torch.randn(3, 7, 21))
    b, _ = _weights("base")
    assert b.image_tokens(torch.randn(3, 20)).shape == (3, 4, 12)
    assert b.image_tokens(torch.randn(20)).shape == (1, 4, 12)
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        b.image_tokens(torch.randn(3, 7, 20))
    f, _ = _weights("full-face")
    assert f.image_tokens(torch.randn(2, 9, 20)).shape == (2, 9, 12)


def test_module_follows_dtype_and_copies():
    w, _ = _weights("plus")
    assert not any(p.requires_grad for p in w.parameters())
    half = copy.deepcopy(w).to(torch.bfloat16)
    assert half.spec == w.spec
    t = half.image_tokens(torch.randn(2, 7, 20))
    assert t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all()
    k, v = half.layer_kv(1, t)
    assert k.dtype == torch.bfloat16
    assert next(w.parameters()).dtype == torch.float32  # the copy did not touch the original


def test_file_dtype_kept_and_mixed_dtypes_unified():
    w, _ = _weights("base", dtype=torch.float16)
    assert {p.dtype for p in w.parameters()} == {torch.float16}
    state = synthetic_adapter_state("base", [8], 12, 20)
    state["image_proj.norm.weight"] = state["image_proj.norm.weight"].half()
    mixed = IPAdapterWeights.from_state(state)
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}


def test_models_package_never_imports_the_host():
    for path in MODELS_DIR.glob("*.py"):
        text = path.read_text()
        for banned in ("import comfy", "from comfy", "folder_paths", "ipadapter_fused"):
            assert banned not in text, f"{path.name} mentions {banned!r}"
