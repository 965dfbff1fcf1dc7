"""Adapter files in the host's model folders, loaded once and shared.

The weights live in a host ModelPatcher so the host's memory management moves them to
the sampling device with the model and offloads them with it."""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch

FOLDER = "ipadapter"
EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}


def register_folder() -> None:
    """Add models/ipadapter to the host's search paths (creating the folder when it is missing), keeping any
    extra_model_paths.yaml entries."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:  # so the user finds where adapters go; a read-only install still works with extra_model_paths.yaml
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass
    known = folder_paths.folder_names_and_paths.get(FOLDER)
    if known is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], EXTENSIONS)
        return
    paths, exts = known
    if default not in paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    exts = set(exts) | EXTENSIONS
    folder_paths.folder_names_and_paths[FOLDER] = (folder_paths.folder_names_and_paths[FOLDER][0], exts)


@dataclass(eq=False)
class LoadedAdapter:
    """What flows on an IPADAPTER_FUSED link."""
    name: str
    weights: object   # models.IPAdapterWeights
    patcher: object   # comfy ModelPatcher around `weights`

    @property
    def spec(self):
        return self.weights.spec


_lock = threading.Lock()
_adapters: "weakref.WeakValueDictionary[tuple, LoadedAdapter]" = weakref.WeakValueDictionary()
_clip_visions: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def load_adapter(name: str) -> LoadedAdapter:
    """Load `name` from the ipadapter folder, or return the instance already in use."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import folder_paths

    from ..models import load_adapter_file

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"IP-Adapter file {name!r} was not found in the '{FOLDER}' model folder")
    dtype = mm.unet_dtype()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # e.g. fp8 UNets: keep the adapter in 16 bits
        dtype = torch.float16 if mm.should_use_fp16() else torch.float32
    key = _file_key(path) + (dtype,)
    with _lock:
        hit = _adapters.get(key)
        if hit is not None:
            return hit
        weights = load_adapter_file(path).to(dtype=dtype)
        weights.eval().requires_grad_(False)
        patcher = comfy.model_patcher.ModelPatcher(
            weights, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        loaded = LoadedAdapter(name=name, weights=weights, patcher=patcher)
        _adapters[key] = loaded
        return loaded


def load_clip_vision(name: str):
    """`name` from the clip_vision folder, shared with 'IPAdapter CLIP Vision Loader (Fused)' (same cache,
    SigLIP pooling head kept, sizes the host has no config for built from the file's shapes)."""
    from .clip_vision import load_clip_vision as load

    return load(name)
