"""Untrusted files in models/ipadapter, through the pack's loader node inside the host.

Every bad file must give an AdapterFormatError whose message starts with the file's name and
says what is wrong; a pickle's payload must never run; and the node must keep working for the
next (good) file, including a good file that replaces a bad one under the same name."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile

import pytest

CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


class _Payload:
    """Unpickling this creates `marker`: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def folder(host, tmp_path, monkeypatch):
    """models/ipadapter of the host pointed at an empty temporary folder."""
    from ipadapter_fused.nodes.loaders import EXTENSIONS, FOLDER

    path = tmp_path / "ipadapter"
    path.mkdir()
    monkeypatch.setitem(host.folder_paths.folder_names_and_paths, FOLDER, ([str(path)], set(EXTENSIONS)))
    return path


@pytest.fixture
def sd15_state(tiny_sd15):
    """A good base adapter's flat state for the tiny SD1.5 UNet (its real layer widths)."""
    from ipadapter_fused.models import synthetic_adapter_state
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(tiny_sd15().get_model_object("diffusion_model"))
    return synthetic_adapter_state("base", [s.width for s in sites], sites[0].context_dim, CLIP["projection_dim"])


def _load(name):
    from ipadapter_fused.nodes.ipadapter_nodes import IPAdapterFusedLoader

    return IPAdapterFusedLoader().load(name)["result"][0]


# --------------------------------------------------------------------------- the bad files
# Each maker writes one file into the folder and returns the words its error must contain.


def _save(path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _good_bytes(folder, state):
    _save(folder / "_good.tmp", state)
    data = (folder / "_good.tmp").read_bytes()
    (folder / "_good.tmp").unlink()
    return data


def truncated_data(folder, state, ctx):
    data = _good_bytes(folder, state)
    (folder / "cut.safetensors").write_bytes(data[: len(data) - 100])
    return "cut.safetensors", ["could not be read as safetensors", "truncated or damaged"]


def truncated_header(folder, state, ctx):
    data = _good_bytes(folder, state)
    (folder / "cut_header.safetensors").write_bytes(data[:200])
    n = struct.unpack("<Q", data[:8])[0]
    return "cut_header.safetensors", [f"header claims {n:,} bytes", "has only 200", "truncated"]


def zero_bytes(folder, state, ctx):
    (folder / "empty.safetensors").write_bytes(b"")
    return "empty.safetensors", ["empty (0 bytes)"]


def zero_bytes_bin(folder, state, ctx):
    (folder / "empty.bin").write_bytes(b"")
    return "empty.bin", ["empty (0 bytes)"]


def huge_header(folder, state, ctx):
    (folder / "liar.safetensors").write_bytes(struct.pack("<Q", 2**63 - 1) + b'{"x": ' + b" " * 50)
    return "liar.safetensors", [f"header claims {2**63 - 1:,} bytes", "has only 64"]


def int_tensors(folder, state, ctx):
    import torch

    _save(folder / "ints.safetensors", {k: (v * 1000).to(torch.int32) for k, v in state.items()})
    return "ints.safetensors", ["of type torch.int32", "expected floating-point"]


def nan_weights(folder, state, ctx):
    s = dict(state)
    s["ip_adapter.5.to_k_ip.weight"] = s["ip_adapter.5.to_k_ip.weight"].clone()
    s["ip_adapter.5.to_k_ip.weight"][2, :3] = float("nan")
    _save(folder / "nan.safetensors", s)
    return "nan.safetensors", ["'ip_adapter.5.to_k_ip.weight' (3 NaN, 0 infinite)", "NaN or infinite"]


def inf_weights(folder, state, ctx):
    s = dict(state)
    s["image_proj.proj.weight"] = s["image_proj.proj.weight"].clone()
    s["image_proj.proj.weight"][0, 0] = float("inf")
    s["image_proj.proj.weight"][1, 0] = float("-inf")
    _save(folder / "inf.safetensors", s)
    return "inf.safetensors", ["'image_proj.proj.weight' (0 NaN, 2 infinite)"]


def _evil_state(state, marker):
    from ipadapter_fused.models.synthetic import nest_state

    nested = nest_state(state)
    nested["ip_adapter"]["1.to_k_ip.weight"] = _Payload(marker)
    return nested


def pickle_payload_zip(folder, state, ctx):
    import torch

    torch.save(_evil_state(state, ctx["marker"]), folder / "evil.bin")
    return "evil.bin", ["refused for safety", "posix.mkdir", "Use a .safetensors version"]


def pickle_payload_raw(folder, state, ctx):
    with open(folder / "evil_raw.pt", "wb") as f:
        pickle.dump(_evil_state(state, ctx["marker"]), f, protocol=2)
    # plain pickle.dump of tensors goes through torch.storage._load_from_bytes, refused first
    return "evil_raw.pt", ["refused for safety", "GLOBAL torch.storage._load_from_bytes"]


def pickle_payload_legacy(folder, state, ctx):
    import torch

    torch.save(_evil_state(state, ctx["marker"]), folder / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    return "evil_legacy.pth", ["refused for safety"]


def zip_of_files(folder, state, ctx):
    with zipfile.ZipFile(folder / "archive.bin", "w") as z:
        z.writestr("ip-adapter/README.md", "# weights")
        z.writestr("ip-adapter/model.onnx", b"\x08\x07" * 64)
    return "archive.bin", ["zip archive holding 'ip-adapter/README.md', 'ip-adapter/model.onnx'", "no data.pkl"]


def zip_of_module(folder, state, ctx):
    import torch

    torch.save({"image_proj": torch.nn.Linear(4, 4), "ip_adapter": {}}, folder / "module.bin")
    return "module.bin", ["refused for safety", "torch.nn.modules.linear.Linear"]


def zip_of_plain_objects(folder, state, ctx):
    import torch

    torch.save({"image_proj": {"proj.weight": [[0.0, 1.0]]}, "version": "1.0", "step": 1000}, folder / "objects.bin")
    return "objects.bin", ["not tensors", "'image_proj.proj.weight' (list)", "'version' (str)", "'step' (int)"]


def unet_state_dict(folder, state, ctx):
    _save(folder / "unet.safetensors", ctx["unet_sd"])
    return "unet.safetensors", ["input_blocks.", "UNet (diffusion model)", "models/diffusion_models"]


def full_checkpoint(folder, state, ctx):
    _save(folder / "checkpoint.safetensors", {"model.diffusion_model." + k: v for k, v in ctx["unet_sd"].items()})
    return "checkpoint.safetensors", ["full Stable Diffusion checkpoint", "models/checkpoints"]


def lora(folder, state, ctx):
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {}
    for block in ("down_blocks_0_attentions_0", "up_blocks_1_attentions_2"):
        for proj in ("to_k", "to_v"):
            base = f"lora_unet_{block}_transformer_blocks_0_attn2_{proj}"
            sd[base + ".lora_down.weight"] = torch.randn(4, 768, generator=g)
            sd[base + ".lora_up.weight"] = torch.randn(320, 4, generator=g)
            sd[base + ".alpha"] = torch.tensor(4.0)
    _save(folder / "style_lora.safetensors", sd)
    return "style_lora.safetensors", ["LoRA", "models/loras"]


def lora_pickle(folder, state, ctx):
    import torch

    torch.save({"diffusion_model.input_blocks.1.1.proj_in.lora_A.weight": torch.zeros(4, 32),
                "diffusion_model.input_blocks.1.1.proj_in.lora_B.weight": torch.zeros(32, 4)}, folder / "peft_lora.bin")
    return "peft_lora.bin", ["LoRA"]


def clip_vision_model(folder, state, ctx):
    _save(folder / "clip_vision_h.safetensors", ctx["clip_sd"])
    return "clip_vision_h.safetensors", ["CLIP vision encoder", "models/clip_vision"]


BAD_FILES = [truncated_data, truncated_header, zero_bytes, zero_bytes_bin, huge_header, int_tensors, nan_weights,
             inf_weights, pickle_payload_zip, pickle_payload_raw, pickle_payload_legacy, zip_of_files, zip_of_module,
             zip_of_plain_objects, unet_state_dict, full_checkpoint, lora, lora_pickle, clip_vision_model]


@pytest.fixture
def ctx(tmp_path, tiny_sd15, tiny_clip_vision):
    return {"marker": tmp_path / "code_ran",
            "unet_sd": tiny_sd15().model.diffusion_model.state_dict(),
            "clip_sd": tiny_clip_vision(**CLIP).get_sd()}


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__)
def test_bad_file_names_itself_and_the_problem(host, folder, sd15_state, ctx, make):
    from ipadapter_fused.models import AdapterFormatError

    name, words = make(folder, sd15_state, ctx)
    with pytest.raises(AdapterFormatError) as info:
        _load(name)
    msg = str(info.value)
    assert msg.startswith(f"{name}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert not ctx["marker"].exists(), "the pickle's payload ran"
    for unsafe in ("weights_only=False", "add_safe_globals"):
        assert unsafe not in msg


def test_the_loader_keeps_working_after_bad_files(host, folder, sd15_state, ctx, tiny_sd15, tiny_clip_vision,
                                                  sampler, cond):
    """All bad files in a row, then a good one through load, apply and sampling; then a bad file
    replaced by a good one under the same name loads (failures are not cached)."""
    import torch

    from ipadapter_fused.models import AdapterFormatError, IPAdapterWeights
    from ipadapter_fused.nodes.ipadapter_nodes import IPAdapterFusedApply

    for make in BAD_FILES:
        name, _ = make(folder, sd15_state, ctx)
        with pytest.raises(AdapterFormatError):
            _load(name)
    assert not ctx["marker"].exists()

    _save(folder / "good.safetensors", sd15_state)
    adapter = _load("good.safetensors")
    expected = IPAdapterWeights.from_state(sd15_state)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(adapter.weights.state_dict()[key].float(), value, rtol=0, atol=0)

    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    patched = IPAdapterFusedApply().apply(model, adapter, cv, image, 1.0, "linear", 0.0, 1.0, "concat", "V only",
                                          "patch")[0]
    pos, neg = cond("sd15", seed=1), cond("sd15", seed=2)
    out = sampler(patched, pos, neg, steps=1, latent_size=16)
    base = sampler(model, pos, neg, steps=1, latent_size=16)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4, "the good adapter acts"

    # the bad file fixed in place: same name, new content
    stat = (folder / "nan.safetensors").stat()
    _save(folder / "nan.safetensors", sd15_state)
    os.utime(folder / "nan.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _load("nan.safetensors").spec == adapter.spec
