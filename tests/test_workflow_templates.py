"""The examples the host lists in its template browser (every workflows/*.json; the runner-only
selfcheck lives in tools/ipaf_runner/): each has a thumbnail beside it and one Note that names every
model file its loaders ask for, the models/ folder it goes in, and where it is published."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
MODEL_FILE = re.compile(r"\.(safetensors|sft|bin|pt|pth|ckpt|gguf)$", re.I)
# the host folder each loader reads its files from
FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "CLIPVisionLoader": "clip_vision", "IPAdapterFusedLoader": "ipadapter",
           "IPAdapterFusedClipVisionLoader": "clip_vision", "UNETLoader": "diffusion_models", "VAELoader": "vae",
           "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders", "TripleCLIPLoader": "text_encoders",
           "IPAdapterFusedSimple": "ipadapter", "IPAdapterFusedUnifiedLoader": "ipadapter",
           "IPAdapterFusedMultiReference": "ipadapter", "ControlNetLoader": "controlnet",
           # ComfyUI-Kolors-MZ's loaders (workflows/kolors_faceid.json)
           "MZ_KolorsUNETLoaderV2": "unet", "MZ_ChatGLM3Loader": "LLM"}
PUBLISHED = re.compile(r"\b[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/repository (Hugging Face)


def test_the_template_folder_holds_the_examples_only():
    assert WORKFLOWS and not (ROOT / "workflows" / "selfcheck_sd15.json").exists()
    assert (ROOT / "tools" / "ipaf_runner" / "selfcheck_sd15.json").is_file()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_template_has_thumbnail(path):
    thumb = path.with_suffix(".jpg")  # the front-end asks for <name>.jpg beside <name>.json
    assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: no JPEG thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_note_names_every_model_file_its_folder_and_publisher(path):
    wf = json.loads(path.read_text())
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1, f"{path.name}: one Note node saying which model files it needs"
    note = notes[0]["widgets_values"][0]
    files = [(n["type"], v) for n in wf["nodes"] for v in n.get("widgets_values") or []
             if isinstance(v, str) and MODEL_FILE.search(v)]
    assert files, f"{path.name}: no model file named by any loader"
    for node_type, name in files:
        assert node_type in FOLDERS, f"{path.name}: {node_type} names {name}; add its folder to FOLDERS"
        assert name in note, f"{path.name}: the Note does not name {name}"
        lines = [ln for ln in note.splitlines() if name in ln]
        folder = f"models/{FOLDERS[node_type]}"
        assert any(folder in ln for ln in lines), f"{path.name}: the Note does not put {name} in {folder}/"
        assert any(PUBLISHED.search(ln.replace(folder, "")) for ln in lines), \
            f"{path.name}: the Note does not say where {name} is published (owner/repository)"
