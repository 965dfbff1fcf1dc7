"""A file-name widget naming a file that is not there: the node says which folder it looked in, what
is there and where the file goes (the host alone would say "'x' not in []")."""
from __future__ import annotations

import sys
import types

import pytest

from ipadapter_fused.nodes.clip_vision import IPAdapterFusedClipVisionLoader
from ipadapter_fused.nodes.ipadapter_nodes import IPAdapterFusedLoader, IPAdapterFusedSimple
from ipadapter_fused.nodes.unified_loader import IPAdapterFusedUnifiedLoader


@pytest.fixture
def folders(monkeypatch, tmp_path):
    files = {"ipadapter": ["ip-adapter_sd15.safetensors"], "clip_vision": []}
    fake = types.ModuleType("folder_paths")
    fake.get_filename_list = lambda folder: list(files.get(folder, []))
    fake.get_full_path = lambda folder, name: str(tmp_path / name) if name in files.get(folder, []) else None
    fake.get_folder_paths = lambda folder: [f"/comfy/models/{folder}"]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return files


def test_present_files_and_auto_choices_pass(folders):
    assert IPAdapterFusedLoader.VALIDATE_INPUTS("ip-adapter_sd15.safetensors") is True
    assert IPAdapterFusedSimple.VALIDATE_INPUTS("ip-adapter_sd15.safetensors", "auto (by content)") is True
    assert IPAdapterFusedUnifiedLoader.VALIDATE_INPUTS() is True


def test_a_missing_adapter_names_the_folder_and_what_is_there(folders):
    msg = IPAdapterFusedLoader.VALIDATE_INPUTS("ip-adapter-plus_sdxl_vit-h.safetensors")
    assert "'ip-adapter-plus_sdxl_vit-h.safetensors' was not found in the 'ipadapter' model folder" in msg
    assert "/comfy/models/ipadapter" in msg and "it holds ip-adapter_sd15.safetensors" in msg
    assert "Put the file in models/ipadapter" in msg


def test_a_missing_encoder_in_an_empty_folder(folders):
    msg = IPAdapterFusedClipVisionLoader.VALIDATE_INPUTS("CLIP-ViT-H-14.safetensors")
    assert "was not found in the 'clip_vision' model folder" in msg and "it holds no files yet" in msg
    both = IPAdapterFusedSimple.VALIDATE_INPUTS("gone.safetensors", "also-gone.safetensors")
    assert "'gone.safetensors'" in both and "'also-gone.safetensors'" in both


def test_all_in_one_node_sends_face_adapters_to_the_apply_node(monkeypatch):
    from ipadapter_fused.models.synthetic import face_adapter_spec
    from ipadapter_fused.nodes import ipadapter_nodes

    class Loaded:
        spec = face_adapter_spec("faceid", "sd15")

    def no_clip_vision(*a, **k):
        raise AssertionError("no CLIP vision model is loaded for a face adapter")

    monkeypatch.setattr(ipadapter_nodes, "load_adapter", lambda name: Loaded())
    monkeypatch.setattr(ipadapter_nodes, "resolve_clip_vision", no_clip_vision)
    with pytest.raises(ValueError, match="InsightFace Loader"):
        IPAdapterFusedSimple().apply(None, None, "ip-adapter-faceid_sd15.bin", "auto (by content)", 1.0, "linear",
                                     0.0, 1.0)
