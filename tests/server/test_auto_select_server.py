"""Encoders and presets chosen by content in a real server: the unified loader and the all-in-one node's
'auto (by content)' against the server's tiny models (a ViT-L/14-size CLIP vision file, tiny SD1.5 adapters
reading its 768-wide image_embeds). Reference: the same graph with the files named explicitly."""
from __future__ import annotations

from pathlib import Path

import torch

from ipadapter_fused.models.adapter_files import describe_adapter_file
from ipadapter_fused.models.vision_files import describe_vision_file, encoder_fits

AUTO = "auto (by content)"


def test_declared_choices(server):
    info = server.object_info
    simple = info["IPAdapterFusedSimple"]["input"]["required"]["clip_vision_file"]
    assert simple[0][0] == AUTO and simple[1]["default"] == AUTO
    assert server.names.clip_vision in simple[0]  # saved workflows naming a file still validate
    unified = info["IPAdapterFusedUnifiedLoader"]["input"]
    assert unified["required"]["preset"][0] == ["light", "standard", "vit-G", "plus", "plus-face", "full-face"]
    assert unified["optional"]["clip_vision_file"][0][0] == AUTO
    assert server.names.clip_vision in unified["optional"]["clip_vision_file"][0]


def _unified_graph(sd15_graph, names, **loader_inputs):
    g, ids = sd15_graph(names, size=32, steps=1, prefix="unified")
    ul = g.add("IPAdapterFusedUnifiedLoader", model=g.out(ids["ckpt"]), **loader_inputs)
    img = g.add("LoadImage", image=names.image)
    apply = g.add("IPAdapterFusedApply", model=g.out(ul, 0), ipadapter=g.out(ul, 1), clip_vision=g.out(ul, 2),
                  image=g.out(img), weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0,
                  combine_embeds="concat", embeds_scaling="V only", middle_block="patch")
    g.prompt[ids["sampler"]]["inputs"]["model"] = g.out(apply)
    return g, ul


def test_unified_loader_matches_the_explicit_graph(server, sd15_graph):
    """One prompt, two samplers: unified loader (encoder 'auto') -> apply, and the all-in-one node with both files
    named. The second branch names the encoder the first reported choosing."""
    names = server.names
    g, ul = _unified_graph(sd15_graph, names, preset="standard", ipadapter_file=names.adapters["base"],
                           clip_vision_file=AUTO)
    # the encoders of the server's folder that give what the tiny base adapter reads (768-wide image_embeds): the
    # ViT-L-size file, and any of that kind another test added; the first by name is the documented choice
    listed = server.refresh_object_info()["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]
    cv_dir = Path(names.files["clip_vision"][0]).parent
    spec = describe_adapter_file(Path(names.files["ipadapter"][0]).parent / names.adapters["base"]).spec
    fitting = sorted((n for n in listed if encoder_fits(spec, describe_vision_file(cv_dir / n)) is None), key=str.lower)
    assert names.clip_vision in fitting
    sampler = g.prompt[next(k for k, v in g.prompt.items() if v["class_type"] == "KSampler")]
    img = next(k for k, v in g.prompt.items() if v["class_type"] == "LoadImage")
    simple = g.add("IPAdapterFusedSimple", model=g.out(next(k for k, v in g.prompt.items()
                                                             if v["class_type"] == "CheckpointLoaderSimple")),
                   image=g.out(img), ipadapter_file=names.adapters["base"], clip_vision_file=fitting[0],
                   weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0)
    ref = g.add("KSampler", **dict(sampler["inputs"], model=g.out(simple)))
    g.add("SaveLatent", samples=g.out(ref), filename_prefix="explicit")
    got = server.run_ok(g.prompt)
    info = got.outputs[ul]["ipadapter_info"][0]
    assert info.startswith(names.adapters["base"] + ": ")
    assert info.endswith("CLIP vision: " + fitting[0]), info
    latents = server.latents(got)
    assert len(latents) == 2 and torch.equal(latents[0], latents[1])


def test_no_preset_match_reaches_the_user(server, sd15_graph):
    g, ul = _unified_graph(sd15_graph, server.names, preset="plus")
    result = server.run(g.prompt)
    assert result.status == "error" and str(result.error.get("node_id")) == ul
    text = result.message()
    assert "is a Plus adapter (high strength)" in text and "The folder holds:" in text
    assert server.names.adapters["plus"] in text  # the tiny Plus is listed, with why it is not the one
    assert "Traceback" not in text
