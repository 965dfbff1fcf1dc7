"""The scene workflows of issue 9 (workflows/regions_two_subjects.json, regions_style.json, mip_two_objects.json)
run headless in the real server on tiny models. The workflow files are not changed: each is converted with the
server's /object_info and, in the converted prompt only, its public file names are bound to tiny files (as the
runner's --set would), the picture is made 64 px and the sampler takes 3 steps. The masks keep the workflow's
size (the pack resamples them to every layer's grid, the host resizes the region prompts' masks).

- two subjects (SD1.5): the tiny SD1.5 checkpoint, the Plus adapter the workflow names (tiny, same layout);
- style region (SDXL): the tiny SDXL checkpoint (CLIP-L + CLIP-G text encoders) and a 70-layer adapter;
- MIP (SDXL): a tiny MIP-Adapter in the published layout (a nested float16 .bin with a text_to_weight gate on
  all 70 layers, made by models/synthetic.py for the tiny SDXL's widths), read with weights_only; the entity
  words are encoded by the checkpoint's own CLIP.

Each run must save a picture, and the same prompt with every adapter node's weight at 0 (everything else, the
region text prompts included, unchanged) must give a different one: the image prompts acted."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from ipaf_runner import convert, tiny_models

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
STEPS = 3
SCENE_NODES = ("IPAdapterFusedRegion", "IPAdapterFusedMultiReference")
PUBLIC = {"v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "example.png", "model_sdxl.bin",
          "ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors",
          "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"}


def write_tiny_mip(path: Path) -> Path:
    """A MIP-Adapter for the tiny SDXL checkpoint (320 wide at all 70 layers, context 2048) and the tiny
    CLIP ViT-L vision model (image_embeds 768 wide), nested and float16 like model_sdxl.bin."""
    synthetic = tiny_models._import_pack_module("models.synthetic")
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    state = synthetic.synthetic_adapter_state("base", tiny_models.SC_SDXL_LAYER_DIMS, tiny_models.SC_SDXL_CONTEXT,
                                              tiny_models.ENCODER_WIDTH["base"], seed=3, dtype=torch.float16,
                                              mip_gate=True)
    torch.save(synthetic.nest_state(state), str(path))
    # the pack reads it as a MIP-Adapter (gated merge), not as a plain IP-Adapter
    adapter = tiny_models._import_pack_module("models.adapter")
    assert adapter.load_adapter_file(path).spec.mip_gate
    return path


@pytest.fixture(scope="module")
def scene_names(server):
    """{role: name the loaders list}: the SD1.5 files of the session, the SDXL checkpoint and adapters."""
    files = tiny_models.sdxl_models(server.work)
    names = {"sd15": server.names.checkpoint, "sd15_adapter": server.names.adapters["plus"],
             "sdxl": server.add_model("checkpoints", files["checkpoints"][0]),
             "sdxl_adapter": server.add_model("ipadapter", files["ipadapter"][0]),
             "mip": server.add_model("ipadapter", write_tiny_mip(server.work / "mip" / "ipaf_tiny_mip_sdxl.bin"))}
    server.refresh_object_info()
    yield names
    server.free(unload_models=True, free_memory=True)  # the SDXL text encoders are ~3 GB


# workflow -> (checkpoint role, adapter role)
CASES = {"regions_two_subjects.json": ("sd15", "sd15_adapter"),
         "regions_style.json": ("sdxl", "sdxl_adapter"),
         "mip_two_objects.json": ("sdxl", "mip")}


def tiny_prompt(name, server, names) -> dict:
    ckpt, adapter = CASES[name]
    prompt = convert.workflow_to_prompt(convert.load_workflow(ROOT / "workflows" / name), server.object_info)
    sets = []
    for nid, node in prompt.items():
        ctype, inputs = node["class_type"], node["inputs"]
        if ctype == "CheckpointLoaderSimple":
            sets.append(f"{nid}.ckpt_name={names[ckpt]}")
        elif ctype == "IPAdapterFusedLoader":
            sets.append(f"{nid}.ipadapter_file={names[adapter]}")
        elif ctype == "CLIPVisionLoader":
            sets.append(f"{nid}.clip_name={server.names.clip_vision}")
        elif ctype == "LoadImage":
            sets.append(f"{nid}.image={server.names.image}")
        elif ctype == "EmptyLatentImage":
            sets += [f"{nid}.width={SIZE}", f"{nid}.height={SIZE}"]
        elif ctype == "KSampler":
            sets.append(f"{nid}.steps={STEPS}")
    convert.apply_overrides(prompt, sets, server.object_info)
    return prompt


def with_weight_zero(prompt: dict) -> dict:
    """The same prompt with every image prompt at weight 0 (region text prompts and masks unchanged)."""
    off = copy.deepcopy(prompt)
    nodes = [n for n in off.values() if n["class_type"] in SCENE_NODES]
    assert nodes
    for n in nodes:
        n["inputs"]["weight"] = 0.0
    for n in off.values():
        if n["class_type"] == "SaveImage":
            n["inputs"]["filename_prefix"] += "_weight0"
    return off


@pytest.mark.parametrize("name", list(CASES))
def test_scene_workflow_runs_headless(server, scene_names, name):
    prompt = tiny_prompt(name, server, scene_names)
    assert not PUBLIC & {v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str)}, \
        "a public file name is left unbound"
    (image,) = server.images(server.run_ok(prompt))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0, "a blank picture"
    (plain,) = server.images(server.run_ok(with_weight_zero(prompt)))
    assert plain.shape == image.shape
    assert not np.array_equal(image, plain), "the image prompts did not change the picture"
