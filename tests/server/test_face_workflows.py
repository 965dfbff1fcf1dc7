"""The face example workflows (workflows/faceid_plusv2_sd15.json, faceid_sdxl_references.json,
faceid_portrait_sd15.json, instantid_sdxl.json, kolors_faceid.json) run headless in the real server on tiny
models. The workflow files are not changed: the test converts each with the server's /object_info and then,
in the converted prompt only, binds the public names to tiny files (as the runner's --set would):

- the InsightFace packs: tiny ONNX packs with the real SCRFD / ArcFace signatures
  (tools/ipaf_runner/tiny_faces.py) in the server's models/insightface/models/, run by the real insightface
  package on onnxruntime (CPU); the reference pictures are bright squares on black, the "faces" that detector
  finds, one per picture, each a different size and place;
- the face adapters: random, in the published key layouts (models/synthetic.py), sized for the tiny UNets
  (320 channels in every layer) with the real context widths, written as nested .bin pickles like the
  published files; FaceID Plus and Kolors FaceID-Plus read the CLIP ViT-L layout's 1024-wide penultimate states;
- InstantID's IdentityNet: a tiny SDXL ControlNet in the host's layout (tools/ipaf_runner/tiny_controlnet.py);
- 64 px pictures and 2 steps.

Stand-ins (tests/server/ipaf_test_probe/face_stand_ins.py, same input names), swapped in the loaded workflow
before conversion:
- Kolors: its three ComfyUI-Kolors-MZ nodes (a tiny SDXL UNet carrying Kolors' `encoder_hid_proj`, and a text
  stand-in for ChatGLM3);
- SDXL: CheckpointLoaderSimple (the tiny SDXL UNet and TAESD through the host's checkpoint loader, and a text
  stand-in of SDXL's widths for CLIP-L + CLIP-G, whose fixed 694 M-parameter CLIP-G would take most of this
  test's time; tests/server/test_workflows.py runs sdxl_basic.json with the real ones).
Every other node is the host's or the pack's own.

Each run must save a non-blank picture and show the face crops (or keypoints) it used, one per face; a second
run without the face node (the sampler fed by the model loader and the text encoders directly) must give a
different picture: the face prompt acted. FaceID Plus V2 also runs with faceid_lora_strength 0: the LoRA held
inside the file changes the picture."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipaf_runner import convert, tiny_controlnet, tiny_faces, tiny_models

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SIZE = 64
STEPS = 2
PICTURE = 128
# (x0, y0, side) of the one bright square in each reference picture, sizes the tiny detector finds
# (tiny_faces.BLOB_SIZE_RANGE after scaling to the detection size): the first two at 640, the third only
# on the loader's retry at 576
FACES = ((30, 34, 40), (52, 20, 34), (16, 60, 46))
# Tiny CLIP towers (2 layers, width 64) in the host's key layout, loaded by the pack's own CLIP vision loader,
# which builds sizes the host has no config for from the file's shapes (the host's CLIPVisionLoader accepts
# full ViT-L and larger only, whose CPU encoding took most of this test's time); swapped in for the
# workflows' CLIPVisionLoader with the same input
CLIP_WIDTH = 64
CLIP_SWAPS = {"CLIPVisionLoader": "IPAdapterFusedClipVisionLoader"}
SD15_DIMS = tuple(tiny_models.SC_LAYER_DIMS)
SDXL_DIMS = tuple(tiny_models.SC_SDXL_LAYER_DIMS)
SDXL_FILE = "ipaf_tiny_sdxl_unet_taesd.safetensors"   # no text encoders (see the stand-ins)
SDXL_SWAPS = {"CheckpointLoaderSimple": "IPAFTestTinySDXLCheckpoint"}


def _stand_ins():
    # the probe package's __init__ imports the host's server module; its stand-in module alone does not
    spec = importlib.util.spec_from_file_location("ipaf_face_stand_ins", HERE / "ipaf_test_probe" / "face_stand_ins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MZ_STAND_INS = _stand_ins().MZ_STAND_INS


def _face_adapter(path: Path, kind: str, arch: str, layer_dims: tuple, **dims) -> Path:
    """A random face adapter of `kind` in the published layout whose layers are `layer_dims` wide (the tiny
    UNets have 320 channels at every level; face_adapter_spec's widths follow SD's channel multipliers)."""
    import torch
    from ipadapter_fused.models.families import expected_shapes
    from ipadapter_fused.models.synthetic import face_adapter_spec, write_state

    spec = face_adapter_spec(kind, arch, "tiny", **dims)
    assert len(spec.layer_dims) == len(layer_dims)  # same layers (and LoRA processors), other widths
    spec = dataclasses.replace(spec, layer_dims=layer_dims)
    g = torch.Generator().manual_seed(len(path.name))
    state = {}
    for key, shape in expected_shapes(spec).items():
        if kind == "kolors-faceid-plus" and key.startswith("ip_adapter."):
            key = "adapter_modules" + key[len("ip_adapter"):]  # as Kolors' ipa-faceid-plus.bin names them
        noise = torch.randn(shape, generator=g)
        if len(shape) == 2 or key.endswith("latents"):
            state[key] = noise / shape[-1] ** 0.5
        elif key.endswith(".weight"):
            state[key] = 1.0 + 0.1 * noise
        else:
            state[key] = 0.05 * noise
    path.parent.mkdir(parents=True, exist_ok=True)
    write_state(path, state, nested=True)
    return path


def _write_sdxl_without_text(path: Path) -> None:
    sd = tiny_models.sdxl_unet_state()
    sd.update({"first_stage_model." + k: v for k, v in tiny_models.taesd_state().items()})
    tiny_models._save(sd, path)


def _face_picture(path: Path, square) -> Path:
    Image.fromarray(tiny_faces.draw_faces(PICTURE, PICTURE, [square])).save(path)
    return path


@pytest.fixture(scope="module")
def face_names(server):
    """Tiny files in the server's model folders; {role: name the loaders list}."""
    work = server.work / "face"
    cache = tiny_models.default_cache_dir() / f"selfcheck-models-v{tiny_models.SELFCHECK_MODELS_VERSION}"
    names = {}
    for role in ("buffalo_l", "antelopev2"):
        names[role] = tiny_faces.write_pack(server.server.model_dir("insightface"), f"ipaf_tiny_{role}").name
    work.mkdir(parents=True, exist_ok=True)
    names["faces"] = [server.upload_image(_face_picture(work / f"ipaf_face_{i}.png", sq)) for i, sq in enumerate(FACES)]
    adapters = {
        "faceid-plusv2-sd15": (work / "ipaf_tiny_faceid-plusv2_sd15.bin", "faceid-plus", "sd15", SD15_DIMS,
                               dict(clip_width=CLIP_WIDTH)),
        "faceid-sdxl": (work / "ipaf_tiny_faceid_sdxl.bin", "faceid", "sdxl", SDXL_DIMS, {}),
        "portrait-sd15": (work / "ipaf_tiny_faceid-portrait_sd15.bin", "portrait", "sd15", SD15_DIMS, {}),
        "instantid": (work / "ipaf_tiny_instantid_ip-adapter.bin", "face-resampler", "sdxl", SDXL_DIMS, {}),
        "kolors": (work / "ipaf_tiny_kolors_faceid-plus.bin", "kolors-faceid-plus", "kolors", SDXL_DIMS,
                   dict(clip_width=CLIP_WIDTH)),
    }
    for role, (path, kind, arch, dims, extra) in adapters.items():
        names[role] = server.add_model("ipadapter", _face_adapter(path, kind, arch, dims, **extra))
    sdxl = tiny_models._cached(cache / "checkpoints" / SDXL_FILE, "SDXL-layout UNet and TAESD, no text encoders",
                               _write_sdxl_without_text)
    names["sdxl"] = server.add_model("checkpoints", sdxl)
    names["controlnet"] = server.add_model("controlnet", tiny_models._cached(
        cache / "controlnet" / "ipaf_tiny_sdxl_controlnet.safetensors", "SDXL ControlNet layout (IdentityNet stand-in)",
        tiny_controlnet.write_tiny_sdxl_controlnet))
    for role, size in (("clip", 224), ("clip336", 336)):
        path = work / f"ipaf_tiny_clip_vision_{size}.safetensors"
        tiny_models._save(tiny_models.clip_vision_state(width=CLIP_WIDTH, layers=2, intermediate=128, image_size=size,
                                                        projection=32, seed=size), path)
        names[role] = server.add_model("clip_vision", path)
    names["kolors-unet"] = server.add_model("diffusion_models", sdxl)  # the host's UNet loader reads the UNet keys
    tiny_models.write_taesd_pair(server.server.model_dir("vae_approx"), "taesdxl", latent_channels=4)
    names["kolors-vae"] = "taesdxl"
    server.refresh_object_info()
    yield names
    server.free(unload_models=True, free_memory=True)


# workflow -> (checkpoint role, adapter role, InsightFace pack role, reference pictures, the face node's type)
CASES = {
    "faceid_plusv2_sd15.json": ("sd15", "faceid-plusv2-sd15", "buffalo_l", 1, "IPAdapterFusedApply"),
    "faceid_sdxl_references.json": ("sdxl", "faceid-sdxl", "buffalo_l", 3, "IPAdapterFusedApply"),
    "faceid_portrait_sd15.json": ("sd15", "portrait-sd15", "buffalo_l", 3, "IPAdapterFusedApply"),
    "instantid_sdxl.json": ("sdxl", "instantid", "antelopev2", 1, "IPAdapterFusedInstantID"),
    "kolors_faceid.json": (None, "kolors", "antelopev2", 1, "IPAdapterFusedApply"),
}
PUBLIC_PACKS = {"buffalo_l", "antelopev2"}
MODEL_FILE = re.compile(r"\.(safetensors|bin|png)$")


def public_names(name) -> set:
    """The files and packs the shipped workflow names (none of them is in the test's host)."""
    wf = json.loads((ROOT / "workflows" / name).read_text())
    values = {v for n in wf["nodes"] for v in n.get("widgets_values") or [] if isinstance(v, str)}
    return {v for v in values if MODEL_FILE.search(v)} | (values & PUBLIC_PACKS)


def _ids(prompt, cls):
    return sorted((k for k, v in prompt.items() if v["class_type"] == cls), key=int)


def _only(prompt, cls):
    ids = _ids(prompt, cls)
    assert len(ids) == 1, (cls, ids)
    return ids[0]


def tiny_prompt(name, server, names) -> dict:
    """The workflow converted with the server's /object_info, bound to the tiny files (see the docstring)."""
    ckpt, adapter, pack, pictures, _ = CASES[name]
    workflow = convert.load_workflow(ROOT / "workflows" / name)
    swapped = [n for n in workflow["nodes"] if n["type"] in MZ_STAND_INS]
    assert bool(swapped) == (name == "kolors_faceid.json"), "only the Kolors workflow uses ComfyUI-Kolors-MZ nodes"
    swaps = dict(MZ_STAND_INS, **CLIP_SWAPS, **(SDXL_SWAPS if ckpt == "sdxl" else {}))
    for node in workflow["nodes"]:
        node["type"] = swaps.get(node["type"], node["type"])
    prompt = convert.workflow_to_prompt(workflow, server.object_info)
    loads = _ids(prompt, "LoadImage")
    assert len(loads) == pictures, f"{name}: {len(loads)} reference pictures"
    sets = [f"{_only(prompt, 'IPAdapterFusedLoader')}.ipadapter_file={names[adapter]}",
            f"{_only(prompt, 'IPAdapterFusedInsightFaceLoader')}.model_pack={names[pack]}",
            f"{_only(prompt, 'EmptyLatentImage')}.width={SIZE}",
            f"{_only(prompt, 'EmptyLatentImage')}.height={SIZE}",
            f"{_only(prompt, 'KSampler')}.steps={STEPS}"]
    sets += [f"{nid}.image={face}" for nid, face in zip(loads, names["faces"])]
    for nid in _ids(prompt, "IPAdapterFusedClipVisionLoader"):
        sets.append(f"{nid}.clip_name={names['clip336' if name.startswith('kolors') else 'clip']}")
    for nid in _ids(prompt, "CheckpointLoaderSimple"):
        sets.append(f"{nid}.ckpt_name={server.names.checkpoint}")
    for nid in _ids(prompt, "IPAFTestTinySDXLCheckpoint"):
        sets.append(f"{nid}.ckpt_name={names['sdxl']}")
    for nid in _ids(prompt, "ControlNetLoader"):
        sets.append(f"{nid}.control_net_name={names['controlnet']}")
    for nid in _ids(prompt, "IPAFTestKolorsUNetLoader"):
        sets.append(f"{nid}.unet_name={names['kolors-unet']}")
    for nid in _ids(prompt, "VAELoader"):
        sets.append(f"{nid}.vae_name={names['kolors-vae']}")
    for nid in _ids(prompt, "IPAFTestKolorsChatGLM3Loader"):
        sets.append(f"{nid}.chatglm3_checkpoint=ipaf_test_stand_in")
    convert.apply_overrides(prompt, sets, server.object_info)
    return prompt


def without_face(prompt: dict, face_type: str) -> dict:
    """The same prompt with the sampler fed by the model loader and the text encoders directly."""
    plain = copy.deepcopy(prompt)
    face = _only(plain, face_type)
    ks = _only(plain, "KSampler")
    for key in ("model", "positive", "negative"):
        origin = plain[ks]["inputs"][key]
        if origin[0] == face:
            plain[ks]["inputs"][key] = plain[face]["inputs"][key]
    for nid in [face] + _ids(plain, "PreviewImage"):
        del plain[nid]
    plain[_only(plain, "SaveImage")]["inputs"]["filename_prefix"] += "_plain"
    return plain


def _previews(result, prompt) -> list:
    (preview,) = _ids(prompt, "PreviewImage")
    return (result.outputs.get(preview) or {}).get("images") or []


@pytest.mark.parametrize("name", sorted(CASES))
def test_face_workflow_runs_headless(server, face_names, name):
    prompt = tiny_prompt(name, server, face_names)
    # nothing of the public names is left: every file the graph loads is a tiny one
    public = public_names(name)
    assert len(public) >= 4
    assert not public & {v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str)}, \
        json.dumps(prompt)[:600]
    # SDXL-sized models (1.1 GB in float32): free them after the SDXL cases, but not between the two that
    # load the same checkpoint (the second then reuses the host's cached loader outputs)
    free_after = CASES[name][0] != "sd15" and name != "faceid_sdxl_references.json"
    try:
        result = server.run_ok(prompt)
        (image,) = server.images(result)
        assert image.shape == (SIZE, SIZE, 3) and image.std() > 0, "a blank picture"
        # the face crops (InstantID: the keypoint picture) the run used: one per reference face
        shown = _previews(result, prompt)
        assert len(shown) == (1 if name.startswith("instantid") else CASES[name][3]), shown
        (plain,) = server.images(server.run_ok(without_face(prompt, CASES[name][4])))
        assert plain.shape == image.shape
        assert not np.array_equal(image, plain), "the face prompt did not change the picture"
        if name == "faceid_plusv2_sd15.json":
            no_lora = copy.deepcopy(prompt)
            no_lora[_only(no_lora, "IPAdapterFusedApply")]["inputs"]["faceid_lora_strength"] = 0.0
            no_lora[_only(no_lora, "SaveImage")]["inputs"]["filename_prefix"] += "_nolora"
            (unpatched,) = server.images(server.run_ok(no_lora))
            assert not np.array_equal(image, unpatched), "the LoRA inside the FaceID file did not act"
    finally:
        if free_after:
            server.free(unload_models=True, free_memory=True)
