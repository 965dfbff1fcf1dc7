"""Untrusted files for models/ipadapter, shared by the in-process and the server tests.

Each maker writes one bad file into `folder` and returns (file name, words its error message must
contain). `state` is a good adapter's flat state for the model under test (the int and NaN cases
damage a copy of it); `ctx` holds "marker" (a path a pickle payload would create), "unet_sd" (a real
UNet state dict) and "clip_sd" (a CLIP vision state dict)."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile


class _Payload:
    """Unpickling this creates `marker`: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


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
