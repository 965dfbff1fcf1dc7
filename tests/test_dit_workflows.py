"""The DiT example workflows (Flux XLabs, Flux InstantX, SD3.5 InstantX): the host's own loaders for model and
text, the pack's loader and apply nodes, settings each family is used with, and a Note that names every file
the graph loads, the folder it goes in and where it is published. (Conversion, links and widget types of every
shipped workflow: test_run_workflow.test_shipped_workflows_convert; headless runs: tests/server.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
from ipaf_runner import convert  # noqa: E402
from test_run_workflow import OBJECT_INFO  # noqa: E402  (the trimmed /object_info of the host)

# workflow -> (text loader, encoder file, adapter file, publishers and file names the Note must name)
DIT = {
    "flux_xlabs.json": ("DualCLIPLoader", "clip-vit-large-patch14.safetensors", "flux-ip-adapter-v2.safetensors",
                        ["XLabs-AI/flux-ip-adapter-v2", "ip_adapter.safetensors", "openai/clip-vit-large-patch14",
                         "black-forest-labs/FLUX.1-dev"]),
    "flux_instantx.json": ("DualCLIPLoader", "siglip-so400m-patch14-384.safetensors", "instantx-flux-ip-adapter.bin",
                           ["InstantX/FLUX.1-dev-IP-Adapter", "ip-adapter.bin", "google/siglip-so400m-patch14-384",
                            "black-forest-labs/FLUX.1-dev"]),
    "sd35_instantx.json": ("TripleCLIPLoader", "siglip-so400m-patch14-384.safetensors",
                           "instantx-sd35-large-ip-adapter.bin",
                           ["InstantX/SD3.5-Large-IP-Adapter", "ip-adapter.bin", "google/siglip-so400m-patch14-384",
                            "stabilityai/stable-diffusion-3.5-large"]),
}
FOLDER_OF_INPUT = {"unet_name": "diffusion_models", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
                   "clip_name3": "text_encoders", "vae_name": "vae", "ipadapter_file": "ipadapter"}


def _load(name):
    wf = json.loads((ROOT / "workflows" / name).read_text())
    return wf, convert.workflow_to_prompt(wf, OBJECT_INFO)


def _one(prompt, cls):
    nodes = [n for n in prompt.values() if n["class_type"] == cls]
    assert len(nodes) == 1, (cls, len(nodes))
    return nodes[0]["inputs"]


@pytest.mark.parametrize("name", sorted(DIT))
def test_dit_workflow_graph(name):
    text_loader, encoder, adapter, _ = DIT[name]
    _, prompt = _load(name)
    assert {"UNETLoader", text_loader, "VAELoader", "CLIPTextEncode", "KSampler", "VAEDecode", "SaveImage",
            "IPAdapterFusedLoader", "IPAdapterFusedClipVisionLoader", "IPAdapterFusedApply", "LoadImage",
            "EmptySD3LatentImage"} <= {n["class_type"] for n in prompt.values()}
    assert _one(prompt, "IPAdapterFusedClipVisionLoader")["clip_name"] == encoder
    assert _one(prompt, "IPAdapterFusedLoader")["ipadapter_file"] == adapter
    apply = _one(prompt, "IPAdapterFusedApply")
    ksampler = _one(prompt, "KSampler")
    # the sampler samples the patched model; the apply node gets the loaders' outputs
    assert prompt[ksampler["model"][0]]["class_type"] == "IPAdapterFusedApply"
    assert prompt[apply["model"][0]]["class_type"] == "UNETLoader"
    assert prompt[apply["clip_vision"][0]]["class_type"] == "IPAdapterFusedClipVisionLoader"
    assert 0 < apply["weight"] <= 1.0
    if name.startswith("flux"):
        # guidance-distilled: cfg 1, strength through FluxGuidance on the positive
        assert ksampler["cfg"] == 1.0 and _one(prompt, "DualCLIPLoader")["type"] == "flux"
        assert prompt[ksampler["positive"][0]]["class_type"] == "FluxGuidance"
    else:
        assert ksampler["cfg"] > 1.0


@pytest.mark.parametrize("name", sorted(DIT))
def test_dit_workflow_note_names_every_file(name):
    """Each file a loader names appears in the Note with its models/ folder, and the publishers are named;
    nothing is fetched at run time (no URL)."""
    wf, prompt = _load(name)
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for node in prompt.values():
        for key, value in node["inputs"].items():
            folder = "clip_vision" if node["class_type"] == "IPAdapterFusedClipVisionLoader" else FOLDER_OF_INPUT.get(key)
            if folder is None:
                continue
            line = next((ln for ln in text.splitlines() if ln.startswith(f"- models/{folder}:")), "")
            assert value in line, f"{name}: the Note's models/{folder} line does not name {value!r}"
    for publisher in DIT[name][3]:
        assert publisher in text, (name, publisher)
    assert "nothing is downloaded at run time" in text and "http" not in text
