"""Migration on a real server with ComfyUI_IPAdapter_plus loaded beside this pack: a workflow in that
pack's format (IPAdapterModelLoader + CLIPVisionLoader + IPAdapterAdvanced, widget values by position
from the server's own /object_info) runs, is converted by POST /ipadapter_fused/migrate (the route the
front-end action calls), and runs again on this pack's nodes: the same sampled latent.

What the compatible mode promises (README "Migrating from ComfyUI_IPAdapter_plus"): that pack's pictures,
within the bound tests/host/util.py measured for sampled latents of the tiny models (LATENT_BOUND: the
torch builds batch their CPU matmuls differently, so equality to the last bit is not a property of the
formula). The test also reports whether the two latents were bit-identical on this machine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import server_harness
from ipaf_runner import convert

ROOT = Path(__file__).resolve().parents[2]
PLUS_ENV = "IPADAPTER_PLUS_PATH"
LATENT_BOUND = 2e-5  # tests/host/util.py: 5x a one-ulp change of the adapter weight, relative to max|latent|
COMPAT = "skip (IPAdapter_plus compatible)"


def _plus_path():
    env = os.environ.get(PLUS_ENV)
    path = Path(env) if env else ROOT.parent / "shared" / "host" / "ComfyUI_IPAdapter_plus"
    return path.resolve() if (path / "IPAdapterPlus.py").is_file() else None


@pytest.fixture(scope="module")
def both_packs():
    """Its own server: the session one loads this pack alone (others' tests check that)."""
    host, plus = server_harness.host_path(), _plus_path()
    if host is None or plus is None:
        pytest.skip("needs ComfyUI and ComfyUI_IPAdapter_plus ($COMFYUI_PATH, $IPADAPTER_PLUS_PATH)")
    harness = server_harness.ServerHarness(host)
    harness.server.extra_custom_nodes.append(plus)
    try:
        harness.start()
        if "IPAdapterAdvanced" not in harness.object_info:
            pytest.fail("ComfyUI_IPAdapter_plus did not load in the host\n" + harness.log_tail())
        yield harness
    finally:
        harness.close()


class FrontEndGraph:
    """A workflow as the front end saves it, from the server's declarations (widget values by position,
    with the control value after seed and the upload value after LoadImage's image)."""

    def __init__(self, object_info):
        self.info = object_info
        self.wf = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "version": 0.4}

    def add(self, ntype, **values):
        info = self.info[ntype]
        widgets = convert.widget_inputs(info)
        nid = self.wf["last_node_id"] = self.wf["last_node_id"] + 1
        vals = []
        for name, spec in widgets:
            vals.append(values[name])
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if spec[0] == "INT" and name in ("seed", "noise_seed") or opts.get("control_after_generate"):
                vals.append("fixed")
            if opts.get("image_upload"):
                vals.append("image")
        names = dict(widgets)
        inputs = []
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                if name not in names:
                    inputs.append({"name": name, "type": spec[0], "link": None})
        node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": nid, "mode": 0,
                "inputs": inputs, "properties": {"Node name for S&R": ntype}, "widgets_values": vals,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))]}
        self.wf["nodes"].append(node)
        return node

    def link(self, src, slot, dst, name):
        lid = self.wf["last_link_id"] = self.wf["last_link_id"] + 1
        t_slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == name)
        dst["inputs"][t_slot]["link"] = lid
        src["outputs"][slot]["links"].append(lid)
        self.wf["links"].append([lid, src["id"], slot, dst["id"], t_slot, src["outputs"][slot]["type"]])


def plus_workflow(server):
    names = server.names
    g = FrontEndGraph(server.object_info)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=names.checkpoint)
    pos = g.add("CLIPTextEncode", text="a photo of a red square")
    neg = g.add("CLIPTextEncode", text="blurry")
    for n in (pos, neg):
        g.link(ckpt, 1, n, "clip")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    loader = g.add("IPAdapterModelLoader", ipadapter_file=names.adapters["plus"])
    cv = g.add("CLIPVisionLoader", clip_name=names.clip_vision)
    image = g.add("LoadImage", image=names.image)
    ap = g.add("IPAdapterAdvanced", weight=0.8, weight_type="ease in", combine_embeds="concat", start_at=0.0,
               end_at=1.0, embeds_scaling="V only")
    g.link(ckpt, 0, ap, "model")
    g.link(loader, 0, ap, "ipadapter")
    g.link(image, 0, ap, "image")
    g.link(cv, 0, ap, "clip_vision")
    ks = g.add("KSampler", seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.link(ap, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(latent, 0, ks, "latent_image")
    save = g.add("SaveLatent", filename_prefix="migrate")
    g.link(ks, 0, save, "samples")
    return g.wf


def run_workflow(server, wf):
    prompt = convert.workflow_to_prompt(wf, server.object_info)
    return run_prompt(server, prompt)


def run_prompt(server, prompt):
    result = server.run_ok(prompt)
    print(f"run: {result.seconds:.1f} s")
    return server.latent(result)


def test_converted_graph_samples_the_same_latent(both_packs):
    server = both_packs
    original = plus_workflow(server)
    want = run_workflow(server, original)

    status, answer = server.client.post_json("/ipadapter_fused/migrate", {"workflow": original})
    assert status == 200, answer
    report, converted = answer["report"], answer["workflow"]
    assert {(c["type"], c["target"]) for c in report["converted"]} == {
        ("IPAdapterModelLoader", "IPAdapterFusedLoader"), ("IPAdapterAdvanced", "IPAdapterFusedApply")}
    assert not report["left"]
    assert not any(n["type"].startswith("IPAdapter") and not n["type"].startswith("IPAdapterFused")
                   for n in converted["nodes"])
    prompt = convert.workflow_to_prompt(converted, server.object_info)
    applies = [n for n in prompt.values() if n["class_type"] == "IPAdapterFusedApply"]
    assert len(applies) == 1 and applies[0]["inputs"]["middle_block"] == COMPAT
    assert (applies[0]["inputs"]["weight"], applies[0]["inputs"]["weight_type"]) == (0.8, "ease in")
    got = run_prompt(server, prompt)

    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    print(f"converted vs original latent: max difference {err:.3g} (max|latent| {scale:.3g}); "
          f"bit-identical: {bool((got == want).all())}")
    assert err <= LATENT_BOUND * max(scale, 1.0), f"max difference {err:.3g} of max|latent| {scale:.3g}"

    # the comparison can tell: with the middle block patched (what the pack does by default) the latent moves
    applies[0]["inputs"]["middle_block"] = "patch"
    patched = run_prompt(server, prompt)
    assert float((patched - want).abs().max()) > 10 * LATENT_BOUND * max(scale, 1.0)


def _tiny_faceid_plus(path: Path) -> Path:
    """A random FaceID Plus adapter in the published key layout, sized for the tiny SD1.5 UNet (320 channels
    in every layer) and the tiny CLIP vision model's 1024-wide penultimate states."""
    import dataclasses

    import torch
    from ipadapter_fused.models.families import expected_shapes
    from ipadapter_fused.models.synthetic import face_adapter_spec, write_state
    from ipaf_runner import tiny_models

    # that pack builds its projection with the published sizes (MLP 1024, 4 perceiver layers of 12 heads)
    spec = face_adapter_spec("faceid-plus", "sd15", "tiny", clip_width=1024, hidden=1024, heads=12, depth=4,
                             ff_dim=3072)
    spec = dataclasses.replace(spec, layer_dims=tuple(tiny_models.SC_LAYER_DIMS))
    g = torch.Generator().manual_seed(11)
    state = {}
    for key, shape in expected_shapes(spec).items():
        noise = torch.randn(shape, generator=g)
        state[key] = noise / shape[-1] ** 0.5 if len(shape) == 2 or key.endswith("latents") else (
            1.0 + 0.1 * noise if key.endswith(".weight") else 0.05 * noise)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_state(path, state, nested=True)
    return path


def test_converted_faceid_graph_samples_the_same_latent(both_packs):
    """IPAdapterModelLoader + IPAdapterInsightFaceLoader + IPAdapterFaceID (FaceID Plus V2, weight_faceidv2 not
    the default) on that pack, then converted: the same latent once the LoRA held in the file is off (that
    graph loaded none; the report says so, and with it on the latent moves). The same tiny InsightFace pack
    (named buffalo_l, one of that pack's two choices) serves both packs' loaders."""
    from ipaf_runner import tiny_faces

    server = both_packs
    names = server.names
    work = server.work / "faceid"
    tiny_faces.write_pack(server.server.model_dir("insightface"), "buffalo_l")
    adapter = server.add_model("ipadapter", _tiny_faceid_plus(work / "ipaf_tiny_faceid-plusv2_sd15.bin"))
    picture = work / "ipaf_face.png"
    from PIL import Image
    Image.fromarray(tiny_faces.draw_faces(128, 128, [(30, 34, 40)])).save(picture)
    face_image = server.upload_image(picture)
    server.refresh_object_info()

    g = FrontEndGraph(server.object_info)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=names.checkpoint)
    pos, neg = g.add("CLIPTextEncode", text="a portrait"), g.add("CLIPTextEncode", text="blurry")
    for n in (pos, neg):
        g.link(ckpt, 1, n, "clip")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    loader = g.add("IPAdapterModelLoader", ipadapter_file=adapter)
    cv = g.add("CLIPVisionLoader", clip_name=names.clip_vision)
    face = g.add("IPAdapterInsightFaceLoader", provider="CPU", model_name="buffalo_l")
    image = g.add("LoadImage", image=face_image)
    ap = g.add("IPAdapterFaceID", weight=0.9, weight_faceidv2=1.7, weight_type="linear", combine_embeds="concat",
               start_at=0.0, end_at=1.0, embeds_scaling="V only")
    for src, slot, name in ((ckpt, 0, "model"), (loader, 0, "ipadapter"), (image, 0, "image"), (cv, 0, "clip_vision"),
                            (face, 0, "insightface")):
        g.link(src, slot, ap, name)
    ks = g.add("KSampler", seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    for src, name in ((ap, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.link(src, 0, ks, name)
    save = g.add("SaveLatent", filename_prefix="migrate_faceid")
    g.link(ks, 0, save, "samples")
    want = run_workflow(server, g.wf)

    status, answer = server.client.post_json("/ipadapter_fused/migrate", {"workflow": g.wf})
    assert status == 200, answer
    report = answer["report"]
    assert {(c["type"], c["target"]) for c in report["converted"]} == {
        ("IPAdapterModelLoader", "IPAdapterFusedLoader"), ("IPAdapterFaceID", "IPAdapterFusedApply"),
        ("IPAdapterInsightFaceLoader", "IPAdapterFusedInsightFaceLoader")} and not report["left"]
    assert "no FaceID LoRA was loaded" in report["text"]
    prompt = convert.workflow_to_prompt(answer["workflow"], server.object_info)
    apply = next(n for n in prompt.values() if n["class_type"] == "IPAdapterFusedApply")["inputs"]
    assert (apply["middle_block"], apply["face_structure_weight"], apply["faceid_lora_strength"]) == (COMPAT, 1.7, 1.0)
    with_lora = run_prompt(server, prompt)
    apply["faceid_lora_strength"] = 0.0  # as the report says, for that graph's exact pictures
    got = run_prompt(server, prompt)

    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    print(f"FaceID converted vs original latent: max difference {err:.3g} (max|latent| {scale:.3g}); "
          f"bit-identical: {bool((got == want).all())}")
    assert err <= LATENT_BOUND * max(scale, 1.0), f"max difference {err:.3g} of max|latent| {scale:.3g}"
    assert float((with_lora - want).abs().max()) > 10 * LATENT_BOUND * max(scale, 1.0)


def test_route_refuses_what_is_not_a_workflow(both_packs):
    client = both_packs.client
    for body in ({"workflow": {"nodes": "x"}}, {"1": {"class_type": "KSampler", "inputs": {}}}):
        status, answer = _post(client, body)
        assert status == 400 and "not a front-end workflow" in answer["error"]
    status, answer = _post(client, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = _post(client, {"nodes": [], "links": []})
    assert status == 200 and answer["report"]["text"].startswith("no ComfyUI_IPAdapter_plus nodes")


def _post(client, body):
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{client.host}:{client.port}/ipadapter_fused/migrate", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
