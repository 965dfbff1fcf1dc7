"""Every workflow in workflows/ loads, converts (with the server's own /object_info) and runs headless
on the tiny models. The workflows keep their public model names; the test binds them to the tiny files
the way a user would with the runner's --set, and shrinks picture size and steps the same way."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ipaf_runner import convert, tiny_models

ROOT = Path(__file__).resolve().parents[2]
# The DiT workflows need other tiny models and two test-only stand-ins: test_dit_workflows.py runs them;
# the region / MIP ones (masks, a MIP file, a with/without comparison): test_region_workflows.py; the face
# ones (InsightFace packs, face adapters, Kolors stand-ins): test_face_workflows.py.
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json")
                   if not p.name.startswith(("flux_", "sd35_", "regions_", "mip_", "faceid_", "instantid_",
                                             "kolors_"))) + [
    ROOT / "tools" / "ipaf_runner" / "selfcheck_sd15.json"]
# What stays of each workflow: its graph and settings; only these inputs are rebound (by input name).
MAX_SIZE = 64
MAX_STEPS = 3


def bind_to_tiny_models(prompt: dict, names, object_info: dict) -> list[str]:
    """--set overrides that point every loader of the prompt at the tiny files and keep it small."""
    sets = []
    for nid, node in prompt.items():
        inputs, ctype = node["inputs"], node["class_type"]
        if "ckpt_name" in inputs:
            sets.append(f"{nid}.ckpt_name={names.checkpoint}")
        if "clip_name" in inputs and ctype == "CLIPVisionLoader":
            sets.append(f"{nid}.clip_name={names.clip_vision}")
        if "ipadapter_file" in inputs:
            sets.append(f"{nid}.ipadapter_file={names.adapters['base']}")
        if ctype in convert.LOAD_IMAGE_TYPES:
            sets.append(f"{nid}.image={names.image}")
        for key in ("width", "height"):
            if isinstance(inputs.get(key), int) and inputs[key] > MAX_SIZE:
                sets.append(f"{nid}.{key}={MAX_SIZE}")
        if isinstance(inputs.get("steps"), int) and inputs["steps"] > MAX_STEPS:
            sets.append(f"{nid}.steps={MAX_STEPS}")
    return sets


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_runs_headless(server, path):
    workflow = convert.load_workflow(path)
    names = server.names
    if "sdxl" in path.name:
        # the tiny SDXL checkpoint (full-size CLIP-L + CLIP-G text encoders) and a 70-layer adapter
        files = tiny_models.sdxl_models(server.work)
        names = dataclasses.replace(names, checkpoint=server.add_model("checkpoints", files["checkpoints"][0]),
                                    adapters={"base": server.add_model("ipadapter", files["ipadapter"][0])})
        server.refresh_object_info()
    prompt = convert.workflow_to_prompt(workflow, server.object_info)
    sets = bind_to_tiny_models(prompt, names, server.object_info)
    convert.apply_overrides(prompt, sets, server.object_info)
    # the files the workflow names are public ones, none of them is in this host: nothing left unbound
    assert not any(v in ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "example.png")
                   for n in prompt.values()
                   for v in n["inputs"].values() if isinstance(v, str)), json.dumps(prompt)[:500]

    try:
        result = server.run_ok(prompt)
    finally:
        if "sdxl" in path.name:  # its text encoders are ~3 GB: do not keep them for the next tests
            server.free(unload_models=True, free_memory=True)
    images = server.images(result)
    savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert len(images) == len(savers) >= 1
    for img in images:
        assert img.shape[2] == 3 and img.shape[0] <= MAX_SIZE and img.std() > 0, "a blank picture"
    if len(images) == 2:  # the selfcheck: one picture with the image prompt, one without
        assert not np.array_equal(images[0], images[1]), "the image prompt did not change the picture"


def test_node_error_reaches_the_user_as_its_message(server, sd15_graph, tmp_path):
    """A node of the pack failing (here: an adapter file cut short) is reported as the node and its
    message, the text the runner prints, with none of the host's traceback or module paths."""
    whole = server.names.files["ipadapter"][0].read_bytes()
    broken = tmp_path / "ipaf_cut_short.safetensors"
    broken.write_bytes(whole[: len(whole) // 3])
    name = server.add_model("ipadapter", broken)
    server.refresh_object_info()
    g, ids = sd15_graph(server.names, adapters=[{"layout": "base"}], size=32, steps=1, prefix="err")
    loader = g.prompt[ids["apply"][0]]["inputs"]["ipadapter"][0]
    g.prompt[loader]["inputs"]["ipadapter_file"] = name
    result = server.run(g.prompt)
    assert result.status == "error" and str(result.error.get("node_id")) == loader
    text = result.message()
    assert text.startswith(f"node #{loader} IPAdapterFusedLoader failed: "), text
    assert name in text, "the message does not name the file"
    assert "Traceback" not in text and "File \"" not in text and "custom_nodes" not in text, text
    # the server still serves the next prompt
    g2, _ = sd15_graph(server.names, size=32, steps=1, prefix="after_err")
    assert server.run(g2.prompt).status == "success"
