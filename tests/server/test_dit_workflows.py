"""The DiT example workflows (workflows/flux_xlabs.json, flux_instantx.json, sd35_instantx.json) run headless
in the real server on tiny models. The workflow files are not changed: the test converts each with the
server's /object_info and then, in the converted prompt only,

- binds the public file names to tiny files (as the runner's --set would): the adapters (random, the published
  key layouts, sized for the tiny DiTs; the InstantX ones as nested .bin pickles like the published files, read
  with weights_only), the vision encoders (a tiny CLIP and a tiny SigLIP with its pooling head, through the
  pack's CLIP vision loader), a 16-channel TAESD-layout VAE (the host's VAELoader lists a taesd3 / taef1 pair),
  the reference picture; 64 px and 3 steps;
- SD3.5: the host's own UNETLoader takes the tiny MMDiT (it detects every size from the shapes; context width
  4096 and pooled width 2048, what the host's SD3 text encoder gives). TripleCLIPLoader becomes the host's
  CLIPLoader (type sd3) with CLIP-L alone: the host then pads CLIP-L's 768 to 4096 and its pooled output to
  2048 with zeros (comfy/text_encoders/sd3_clip.py). CLIP-G (694 M) and T5-XXL cannot be made small: the
  host's configs for them are fixed.
- Flux: UNETLoader and DualCLIPLoader become the test-only stand-ins of tests/server/ipaf_test_probe/
  dit_stand_ins.py (the host's Flux detection hard-codes the full width; T5-XXL is 4.7 B parameters). Every
  other node is the host's or the pack's own.

Each run must save a picture, and a second run without the apply node (the sampler fed by the model loader
directly, everything else the same) must give a different picture: the image prompt acted."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from ipaf_runner import convert, tiny_models

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
STEPS = 3
# The tiny DiTs' sizes (tiny_models.TINY_*_CONFIG): Flux and SD3 both 128 wide, 2 heads, 2 double blocks
# (Flux also 2 single blocks). SD3 here with the real text widths.
SD3_CONFIG = dict(context_dim=4096, adm_in_channels=2048)
CLIP_WIDTH = tiny_models.TINY_CLIP_VISION["projection"]   # XLabs reads image_embeds
SIGLIP_WIDTH = tiny_models.TINY_SIGLIP["width"]           # InstantX: pooled output / penultimate hidden states
FLUX_TEXT = dict(context_dim=tiny_models.TINY_FLUX_CONFIG["context_in_dim"],
                 pooled_dim=tiny_models.TINY_FLUX_CONFIG["vec_in_dim"], tokens=8)


@pytest.fixture(scope="module")
def dit_names(server):
    """Tiny files in the server's model folders; {role: name the loaders list}."""
    work = server.work / "dit"
    tm = tiny_models
    flux_dims = dict(hidden=128, heads=2, double_blocks=2, single_blocks=2, tokens=4)
    files = {
        ("diffusion_models", "flux"): tm.write_tiny_dit(work / "ipaf_tiny_flux.safetensors", "flux"),
        ("diffusion_models", "sd3"): tm.write_tiny_dit(work / "ipaf_tiny_sd3.safetensors", "sd3", config=SD3_CONFIG),
        ("clip_vision", "clip"): tm.write_tiny_clip_vision(work / "ipaf_tiny_clip_vision.safetensors"),
        ("clip_vision", "siglip"): tm.write_tiny_siglip(work / "ipaf_tiny_siglip.safetensors"),
        ("ipadapter", "xlabs"): tm.make_dit_adapter(work / "ipaf_tiny_xlabs.safetensors", "xlabs",
                                                    encoder_width=CLIP_WIDTH, **flux_dims),
        ("ipadapter", "instantx-flux"): tm.make_dit_adapter(work / "ipaf_tiny_instantx_flux.bin", "instantx-flux",
                                                            encoder_width=SIGLIP_WIDTH, **flux_dims),
        ("ipadapter", "instantx-sd3"): tm.make_dit_adapter(work / "ipaf_tiny_instantx_sd3.bin", "instantx-sd3",
                                                           hidden=128, heads=2, double_blocks=2, tokens=4,
                                                           encoder_width=SIGLIP_WIDTH),
        ("text_encoders", "clip_l"): tm.clip_l_text_encoder(),
    }
    names = {role: server.add_model(folder, path) for (folder, role), path in files.items()}
    for name in ("taesd3", "taef1"):
        for path in tm.write_taesd_pair(work / "vae_approx", name):
            server.add_model("vae_approx", path)
    server.refresh_object_info()
    return names


# workflow -> (DiT, adapter, encoder, VAE)
CASES = {"flux_xlabs.json": ("flux", "xlabs", "clip", "taef1"),
         "flux_instantx.json": ("flux", "instantx-flux", "siglip", "taef1"),
         "sd35_instantx.json": ("sd3", "instantx-sd3", "siglip", "taesd3")}


def _only(prompt, cls):
    ids = [k for k, v in prompt.items() if v["class_type"] == cls]
    assert len(ids) == 1, (cls, ids)
    return ids[0]


def tiny_prompt(name, server, names) -> dict:
    """The workflow converted with the server's /object_info, bound to the tiny files (see the docstring)."""
    dit, adapter, encoder, vae = CASES[name]
    prompt = convert.workflow_to_prompt(convert.load_workflow(ROOT / "workflows" / name), server.object_info)
    sets = [f"{_only(prompt, 'IPAdapterFusedLoader')}.ipadapter_file={names[adapter]}",
            f"{_only(prompt, 'IPAdapterFusedClipVisionLoader')}.clip_name={names[encoder]}",
            f"{_only(prompt, 'VAELoader')}.vae_name={vae}",
            f"{_only(prompt, 'LoadImage')}.image={server.names.image}",
            f"{_only(prompt, 'EmptySD3LatentImage')}.width={SIZE}",
            f"{_only(prompt, 'EmptySD3LatentImage')}.height={SIZE}",
            f"{_only(prompt, 'KSampler')}.steps={STEPS}"]
    unet = _only(prompt, "UNETLoader")
    if dit == "sd3":
        sets.append(f"{unet}.unet_name={names['sd3']}")
        convert.apply_overrides(prompt, sets, server.object_info)
        text = _only(prompt, "TripleCLIPLoader")
        prompt[text] = {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip_l"], "type": "sd3"}}
    else:
        convert.apply_overrides(prompt, sets, server.object_info)
        prompt[unet] = {"class_type": "IPAFTestTinyFluxLoader", "inputs": {"unet_name": names["flux"]}}
        text = _only(prompt, "DualCLIPLoader")
        prompt[text] = {"class_type": "IPAFTestTinyFluxText", "inputs": dict(FLUX_TEXT)}
    return prompt


def without_apply(prompt: dict) -> dict:
    """The same prompt with the sampler fed by the model loader directly (no image prompt)."""
    plain = copy.deepcopy(prompt)
    apply = _only(plain, "IPAdapterFusedApply")
    ks = _only(plain, "KSampler")
    plain[ks]["inputs"]["model"] = plain[apply]["inputs"]["model"]
    del plain[apply]
    for nid in [k for k, v in plain.items() if v["class_type"] in ("IPAdapterFusedLoader",
                                                                     "IPAdapterFusedClipVisionLoader", "LoadImage")]:
        del plain[nid]
    plain[_only(plain, "SaveImage")]["inputs"]["filename_prefix"] += "_plain"
    return plain


@pytest.mark.parametrize("name", sorted(CASES))
def test_dit_workflow_runs_headless(server, dit_names, name):
    prompt = tiny_prompt(name, server, dit_names)
    # nothing of the public names is left: every file the graph loads is a tiny one
    public = {"flux1-dev.safetensors", "sd3.5_large.safetensors", "ae.safetensors", "sd3.5_vae.safetensors",
              "example.png", "clip_l.safetensors", "t5xxl_fp16.safetensors", "clip_g.safetensors"}
    assert not public & {v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str)}

    result = server.run_ok(prompt)
    (image,) = server.images(result)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0, "a blank picture"
    (plain,) = server.images(server.run_ok(without_apply(prompt)))
    assert plain.shape == image.shape
    assert not np.array_equal(image, plain), "the image prompt did not change the picture"
