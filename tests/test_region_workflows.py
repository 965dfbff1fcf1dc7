"""The scene workflows of issue 9: two subjects in two regions, style in one region, MIP-Adapter two-object
composition. Their graphs (masks from core nodes, chained region nodes each with its own mask and text, the
multi-reference node's prompt feeding the sampler) and a Note naming every file the graph loads, its folder and
its publisher. (Conversion, links and widget types: test_run_workflow.test_shipped_workflows_convert; headless
runs on tiny models: tests/server/test_region_workflows.py.)"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
from ipaf_runner import convert  # noqa: E402
from test_run_workflow import OBJECT_INFO  # noqa: E402  (with region_object_info's entries)

# workflow -> publishers and file names its Note must name
SCENES = {
    "regions_two_subjects.json": ["h94/IP-Adapter", "stable-diffusion-v1-5/stable-diffusion-v1-5"],
    "regions_style.json": ["h94/IP-Adapter", "stabilityai/stable-diffusion-xl-base-1.0"],
    "mip_two_objects.json": ["hqhQAQ/MIP-Adapter", "model_sdxl.bin", "model_sdxl_plus.bin", "h94/IP-Adapter",
                             "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "stabilityai/stable-diffusion-xl-base-1.0"],
}
FOLDER_OF_INPUT = {"ckpt_name": "checkpoints", "ipadapter_file": "ipadapter", "clip_name": "clip_vision"}


def _load(name):
    wf = json.loads((ROOT / "workflows" / name).read_text())
    return wf, convert.workflow_to_prompt(wf, OBJECT_INFO)


def _of(prompt, cls):
    return [n["inputs"] for n in prompt.values() if n["class_type"] == cls]


def _src(prompt, link):
    return prompt[link[0]]


def _mask_box(prompt, link):
    """The rectangle of a mask made by MaskComposite(SolidMask 0, SolidMask 1, x, y, 'add'): (x, y, w, h, W, H)."""
    comp = _src(prompt, link)
    assert comp["class_type"] == "MaskComposite" and comp["inputs"]["operation"] == "add"
    dst, src = _src(prompt, comp["inputs"]["destination"]), _src(prompt, comp["inputs"]["source"])
    assert dst["class_type"] == src["class_type"] == "SolidMask"
    assert dst["inputs"]["value"] == 0.0 and src["inputs"]["value"] == 1.0
    i = comp["inputs"]
    return (i["x"], i["y"], src["inputs"]["width"], src["inputs"]["height"], dst["inputs"]["width"],
            dst["inputs"]["height"])


def test_two_subjects_chain_two_regions_with_own_masks_and_text():
    _, prompt = _load("regions_two_subjects.json")
    regions = {k: v for k, v in prompt.items() if v["class_type"] == "IPAdapterFusedRegion"}
    assert len(regions) == 2
    (ks,) = _of(prompt, "KSampler")
    last = _src(prompt, ks["model"])
    assert last["class_type"] == "IPAdapterFusedRegion"
    # the sampler takes model, positive and negative from the second region, which takes them from the first
    assert ks["positive"][0] == ks["model"][0] == ks["negative"][0]
    first = _src(prompt, last["inputs"]["model"])
    assert first["class_type"] == "IPAdapterFusedRegion" and last["inputs"]["positive"][0] == last["inputs"]["model"][0]
    assert _src(prompt, first["inputs"]["model"])["class_type"] == "CheckpointLoaderSimple"
    boxes, texts, images = [], [], []
    for r in (first, last):
        boxes.append(_mask_box(prompt, r["inputs"]["mask"]))
        text = _src(prompt, r["inputs"]["region_prompt"])
        assert text["class_type"] == "CLIPTextEncode"
        texts.append(text["inputs"]["text"])
        images.append(r["inputs"]["image"][0])
        assert 0 < r["inputs"]["weight"] <= 1.0
    (lat,) = _of(prompt, "EmptyLatentImage")
    # the masks are the two halves of the picture, at the picture's size
    assert [b[4:] for b in boxes] == [(lat["width"], lat["height"])] * 2
    (x0, _, w0, h0, W, H), (x1, _, w1, h1, _, _) = boxes
    assert x0 + w0 <= x1 and w0 + w1 == W and h0 == h1 == H
    assert len(set(texts)) == 2 and len(set(images)) == 2, "each region has its own text and picture"


def test_style_region_is_style_transfer_over_part_of_an_sdxl_picture():
    _, prompt = _load("regions_style.json")
    (region,) = _of(prompt, "IPAdapterFusedRegion")
    assert region["weight_type"] == "style transfer"
    assert "sd_xl" in _of(prompt, "CheckpointLoaderSimple")[0]["ckpt_name"]
    x, y, w, h, W, H = _mask_box(prompt, region["mask"])
    (lat,) = _of(prompt, "EmptyLatentImage")
    assert (W, H) == (lat["width"], lat["height"]) == (1024, 1024)
    assert 0 < w * h < W * H, "the mask covers part of the picture"
    (ks,) = _of(prompt, "KSampler")
    assert _src(prompt, ks["model"])["class_type"] == "IPAdapterFusedRegion"


def test_mip_workflow_routes_two_named_objects_and_feeds_its_prompt_to_the_sampler():
    _, prompt = _load("mip_two_objects.json")
    (mr,) = _of(prompt, "IPAdapterFusedMultiReference")
    assert mr["routing"] == "attention"
    words = [w.strip() for w in mr["entities"].split(",")]
    assert words == ["cat", "jacket"] and all(w in re.findall(r"\w+", mr["text"]) for w in words)
    assert {"image_1", "image_2"} <= mr.keys() and mr["image_1"] != mr["image_2"]
    assert _of(prompt, "IPAdapterFusedLoader")[0]["ipadapter_file"] == "model_sdxl.bin"
    # model_sdxl.bin reads CLIP ViT-bigG image embeds
    assert _of(prompt, "CLIPVisionLoader")[0]["clip_name"] == "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
    (ks,) = _of(prompt, "KSampler")
    node_id = [k for k, v in prompt.items() if v["class_type"] == "IPAdapterFusedMultiReference"][0]
    assert ks["model"] == [node_id, 0] and ks["positive"] == [node_id, 1]
    assert _src(prompt, ks["negative"])["class_type"] == "CLIPTextEncode"
    assert _src(prompt, mr["clip"])["class_type"] == "CheckpointLoaderSimple"


@pytest.mark.parametrize("name", sorted(SCENES))
def test_scene_workflow_note_names_every_file(name):
    """Each file a loader names appears in the Note on its models/ folder's line, the publishers are named,
    nothing is fetched at run time (no URL)."""
    wf, prompt = _load(name)
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for node in prompt.values():
        for key, value in node["inputs"].items():
            folder = FOLDER_OF_INPUT.get(key)
            if folder is None:
                continue
            line = next((ln for ln in text.splitlines() if ln.startswith(f"- models/{folder}:")), "")
            assert value in line, f"{name}: the Note's models/{folder} line does not name {value!r}"
    for publisher in SCENES[name]:
        assert publisher in text, (name, publisher)
    assert "nothing is downloaded at run time" in text and "http" not in text
