"""tools/ipaf_runner/migrate.py: workflows written in ComfyUI_IPAdapter_plus's format, built from that
pack's own node declarations (its IPAdapterPlus.py imported with ComfyUI stubbed out), converted to
this pack's nodes: node types, widget values by name, links by slot name, and the report."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from ipaf_runner import migrate as mig  # noqa: E402
from ipaf_runner.convert import map_widget_values, widget_inputs  # noqa: E402

PLUS_ENV = "IPADAPTER_PLUS_PATH"
PLUS_DEFAULT = ROOT.parent / "shared" / "host" / "ComfyUI_IPAdapter_plus"
COMPAT = "skip (IPAdapter_plus compatible)"

# That pack's nodes most used in shared workflows (loaders, apply nodes, helpers); each must either
# convert or be named in the report.
MOST_USED = ["IPAdapterUnifiedLoader", "IPAdapterModelLoader", "IPAdapterAdvanced", "IPAdapter", "IPAdapterBatch",
             "IPAdapterStyleComposition", "IPAdapterMS", "PrepImageForClipVision", "IPAdapterEncoder",
             "IPAdapterEmbeds", "IPAdapterCombineEmbeds", "IPAdapterRegionalConditioning", "IPAdapterCombineParams",
             "IPAdapterFromParams", "IPAdapterNoise", "IPAdapterInsightFaceLoader", "IPAdapterUnifiedLoaderFaceID",
             "IPAdapterFaceID", "IPAdapterTiled", "IPAdapterPreciseStyleTransfer", "IPAdapterPreciseComposition"]


def _plus_path():
    env = os.environ.get(PLUS_ENV)
    path = Path(env) if env else PLUS_DEFAULT
    return path if (path / "IPAdapterPlus.py").is_file() else None


def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


@pytest.fixture(scope="module")
def plus():
    """ComfyUI_IPAdapter_plus's NODE_CLASS_MAPPINGS, its ComfyUI imports stubbed for the import only."""
    path = _plus_path()
    if path is None:
        pytest.skip(f"ComfyUI_IPAdapter_plus not found (set ${PLUS_ENV})")
    pytest.importorskip("einops")
    nothing = lambda *a, **k: None  # noqa: E731
    stubs = {
        "folder_paths": _stub("folder_paths", folder_names_and_paths={}, models_dir="/nonexistent",
                              supported_pt_extensions={".safetensors"},
                              get_filename_list=lambda folder: [f"example.{folder}.safetensors", f"b.{folder}.bin"],
                              get_input_directory=lambda: str(ROOT / "tests")),
        "comfy": _stub("comfy"), "comfy.model_management": _stub("comfy.model_management"),
        "comfy.clip_vision": _stub("comfy.clip_vision", load=nothing, clip_preprocess=nothing, Output=dict),
        "comfy.sd": _stub("comfy.sd", load_lora_for_models=nothing), "comfy.utils": _stub("comfy.utils"),
        "comfy.ldm": _stub("comfy.ldm"), "comfy.ldm.modules": _stub("comfy.ldm.modules"),
        "comfy.ldm.modules.attention": _stub("comfy.ldm.modules.attention", optimized_attention=nothing),
        "node_helpers": _stub("node_helpers", conditioning_set_values=nothing),
    }
    stubs["comfy"].model_management = stubs["comfy.model_management"]
    stubs["comfy"].utils = stubs["comfy.utils"]
    name = "ipadapter_plus_declarations"
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module.NODE_CLASS_MAPPINGS
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


def _decl(cls):
    return mig.declarations_from_classes({"x": cls})["x"]


# -- workflows in that pack's format ----------------------------------------------------------------------

class Workflow:
    """A front-end workflow built the way the front end saves one: link inputs listed with their slot,
    widget values by position in declaration order, links [id, from, slot, to, slot, type]."""

    def __init__(self, decls):
        self.decls = decls
        self.wf = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "version": 0.4}

    def add(self, ntype, values=None, decl=None):
        decl = decl or self.decls[ntype]
        nid = self.wf["last_node_id"] = self.wf["last_node_id"] + 1
        widgets = widget_inputs(decl)
        inputs = [{"name": n, "type": mig._spec_type(s), "link": None}
                  for n, s in mig._all_inputs(decl) if n not in dict(widgets)]
        outs = decl["output"]
        names = decl.get("output_name") or outs
        node = {"id": nid, "type": ntype, "pos": [10 * nid, 20], "size": [300, 100], "flags": {}, "order": nid,
                "mode": 0, "inputs": inputs,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(names, outs))],
                "properties": {"Node name for S&R": ntype, "cnr_id": "comfyui_ipadapter_plus"},
                "widgets_values": [(values or {}).get(n, mig._default(s)) for n, s in widgets]}
        self.wf["nodes"].append(node)
        return node

    def link(self, src, slot, dst, name):
        lid = self.wf["last_link_id"] = self.wf["last_link_id"] + 1
        ins = dst["inputs"]
        t_slot = next(i for i, x in enumerate(ins) if x["name"] == name)
        ltype = src["outputs"][slot]["type"]
        ins[t_slot]["link"] = lid
        src["outputs"][slot]["links"].append(lid)
        self.wf["links"].append([lid, src["id"], slot, dst["id"], t_slot, ltype])
        return lid


HOST = {
    "CheckpointLoaderSimple": mig._decl([("ckpt_name", [["m.safetensors"]])], None, ["MODEL", "CLIP", "VAE"]),
    "LoadImage": mig._decl([("image", [["a.png"], {"image_upload": True}])], None, ["IMAGE", "MASK"]),
    "CLIPVisionLoader": mig.TARGET_NODES["CLIPVisionLoader"],
    "KSampler": mig._decl([("model", ["MODEL"]), ("seed", ["INT", {"default": 0}])], None, ["LATENT"]),
    "Reroute": {"input": {"required": {"": ["*"]}}, "output": ["*"], "output_name": [""]},
    "LoraLoaderModelOnly": mig._decl([("model", ["MODEL"]), ("lora_name", [["l.safetensors"]]),
                                      ("strength_model", mig._f(1.0, -100, 100, 0.01))], None, ["MODEL"]),
    "PreviewImage": mig._decl([("images", ["IMAGE"])], None, []),
}


def _nondefault(decl):
    """A value other than the default for every widget, within its declared range."""
    out = {}
    for i, (name, spec) in enumerate(widget_inputs(decl)):
        kind, opts = mig._spec_type(spec), (spec[1] if len(spec) > 1 else {})
        if kind == "COMBO":
            choices = mig._choices(spec)
            d = mig._default(spec)
            out[name] = next((c for c in choices[1:] if c != d), d) if choices else d
        elif kind == "FLOAT":
            v = round(opts.get("default", 0.0) + opts.get("step", 0.05) * (i + 2), 4)
            out[name] = min(v, opts.get("max", v))
        elif kind == "INT":
            out[name] = opts.get("default", 0) + 1
        elif kind == "BOOLEAN":
            out[name] = not opts.get("default", False)
        elif kind == "STRING":
            out[name] = "3:0.5, 6:1.25"
    return out


def _build_apply(plus, apply_type, values, loader="IPAdapterModelLoader", clip_vision=True, loader_values=None):
    decls = {k: _decl(v) for k, v in plus.items()}
    decls.update(HOST)
    w = Workflow(decls)
    ckpt = w.add("CheckpointLoaderSimple")
    image = w.add("LoadImage")
    if "UnifiedLoader" in loader:  # MODEL through the loader, IPADAPTER on its second output
        ld = w.add(loader, loader_values or ({"preset": "PLUS (high strength)"} if loader == "IPAdapterUnifiedLoader"
                                             else {}))
        w.link(ckpt, 0, ld, "model")
        model_src, ipa_slot = ld, 1
    else:
        ld = w.add(loader, loader_values or {"ipadapter_file": "b.ipadapter.bin"})
        model_src, ipa_slot = ckpt, 0
    ap = w.add(apply_type, values)
    w.link(model_src, 0, ap, "model")
    w.link(ld, ipa_slot, ap, "ipadapter")
    for name in ("image", "image_style", "image_composition"):
        if any(i["name"] == name for i in ap["inputs"]):
            w.link(image, 0, ap, name)
    if any(i["name"] == "attn_mask" for i in ap["inputs"]):
        w.link(image, 1, ap, "attn_mask")
    cv = None
    if clip_vision and any(i["name"] == "clip_vision" for i in ap["inputs"]):
        cv = w.add("CLIPVisionLoader", {"clip_name": "vit-h.safetensors"})
        w.link(cv, 0, ap, "clip_vision")
    ks = w.add("KSampler", {"seed": 5})
    w.link(ap, 0, ks, "model")
    return w, dict(ckpt=ckpt, image=image, loader=ld, apply=ap, cv=cv, ks=ks)


def _links(wf):
    return {row[0]: row for row in wf["links"]}


def _node(wf, nid):
    return next(n for n in wf["nodes"] if n["id"] == nid)


def _same_type(a, b):
    # the front end writes "INT,FLOAT" for a primitive that can feed either, "*" for anything
    return a == b or "*" in (a, b) or bool(set(str(a).split(",")) & set(str(b).split(",")))


def _check_links(wf):
    """Every link agrees with both ends: the origin lists it in that output, the target's input at
    that slot holds it, and the types agree."""
    for lid, o_id, o_slot, t_id, t_slot, ltype in wf["links"]:
        src, dst = _node(wf, o_id), _node(wf, t_id)
        assert lid in src["outputs"][o_slot]["links"], (lid, src["type"])
        assert dst["inputs"][t_slot]["link"] == lid, (lid, dst["type"], dst["inputs"])
        if src["type"] not in ("Reroute", "PrimitiveNode"):
            assert _same_type(src["outputs"][o_slot]["type"], ltype)
        if dst["type"] != "Reroute":
            assert _same_type(dst["inputs"][t_slot]["type"], ltype), (dst["type"], dst["inputs"][t_slot], ltype)
    held = {i["link"] for n in wf["nodes"] for i in n.get("inputs") or [] if i.get("link") is not None}
    assert held == {row[0] for row in wf["links"]}


def _fused_values(node):
    return map_widget_values(mig.TARGET_NODES[node["type"]], node["widgets_values"])


# -- the declarations the converter carries match the real ones --------------------------------------------

def test_plus_declarations_match_that_pack(plus):
    for ntype, decl in mig.PLUS_NODES.items():
        real = _decl(plus[ntype])
        assert [n for n, _ in widget_inputs(decl)] == [n for n, _ in widget_inputs(real)], ntype
        assert [(n, mig._spec_type(s)) for n, s in mig._all_inputs(decl)] == \
               [(n, mig._spec_type(s)) for n, s in mig._all_inputs(real)], ntype
        assert decl["output"] == real["output"], ntype
        for (n, s), (_, r) in zip(widget_inputs(decl), widget_inputs(real)):
            if n != "ipadapter_file":
                assert mig._default(s) == mig._default(r), (ntype, n)
                if mig._choices(s) is not None:
                    assert mig._choices(s) == mig._choices(r), (ntype, n)
        assert decl["output_name"] == list(getattr(plus[ntype], "RETURN_NAMES", None) or real["output"]), ntype


def test_every_node_of_that_pack_is_decided(plus):
    undecided = set(plus) - set(mig.RULES) - set(mig.NO_EQUIVALENT)
    assert not undecided, f"no rule and no reason for {sorted(undecided)}"
    assert set(MOST_USED) <= set(plus)
    assert set(mig.RULES) <= set(plus) and set(mig.NO_EQUIVALENT) <= set(plus)


def test_target_declarations_match_this_pack(monkeypatch):
    fake = types.ModuleType("folder_paths")
    fake.get_filename_list = lambda folder: [f"example.{folder}.safetensors"]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    from ipadapter_fused.nodes import NODE_CLASS_MAPPINGS

    real = mig.declarations_from_classes(NODE_CLASS_MAPPINGS)
    for ntype in [t for t in mig.TARGET_NODES if t in NODE_CLASS_MAPPINGS]:
        decl = mig.TARGET_NODES[ntype]
        assert [n for n, _ in widget_inputs(decl)] == [n for n, _ in widget_inputs(real[ntype])], ntype
        assert [(n, mig._spec_type(s)) for n, s in mig._all_inputs(decl)] == \
               [(n, mig._spec_type(s)) for n, s in mig._all_inputs(real[ntype])], ntype
        assert decl["output"] == real[ntype]["output"]
        for (n, s), (_, r) in zip(widget_inputs(decl), widget_inputs(real[ntype])):
            if n != "ipadapter_file":
                assert mig._default(s) == mig._default(r), (ntype, n)
            if n == "provider":  # the static list: what every onnxruntime offers, first in the real one
                assert mig._choices(r)[:len(mig._choices(s))] == mig._choices(s)
            elif mig._choices(s) is not None and not n.endswith("_file") and n not in ("model_pack", "clip_name"):
                assert mig._choices(s) == mig._choices(r), (ntype, n)
        assert decl["output_name"] == real[ntype]["output_name"], ntype
        if ntype == mig.UNIFIED_TARGET:
            assert mig._choices(dict(mig._all_inputs(decl))["preset"]) == \
                   mig._choices(dict(mig._all_inputs(real[ntype]))["preset"])
    assert set(mig.pack_node_types()) >= set(NODE_CLASS_MAPPINGS)


# -- apply nodes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("apply_type", ["IPAdapterAdvanced", "IPAdapterMS"])
def test_advanced_apply_converts_by_name(plus, apply_type):
    values = _nondefault(_decl(plus[apply_type]))
    w, ids = _build_apply(plus, apply_type, values)
    before = copy.deepcopy(w.wf)
    out, report = mig.migrate(w.wf)
    assert w.wf == before  # the input is not changed
    ap, ld = _node(out, ids["apply"]["id"]), _node(out, ids["loader"]["id"])
    assert (ap["type"], ld["type"]) == ("IPAdapterFusedApply", "IPAdapterFusedLoader")
    assert ld["widgets_values"] == ["b.ipadapter.bin"]
    got = _fused_values(ap)
    for name in ("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"):
        assert got[name] == values[name], name
    assert got["middle_block"] == COMPAT
    if apply_type == "IPAdapterMS":
        assert got["layer_weights"] == values["layer_weights"]
        # the V2 shortcut's weight; no FaceID use here (no insightface), so no FaceID notes
        assert got["face_structure_weight"] == values["weight_faceidv2"]
        assert not [x.notes for x in report.converted if x.node_id == ap["id"] and x.notes]
    # links: same sources, by input name
    links = _links(out)
    src = {i["name"]: links[i["link"]][1:3] for i in ap["inputs"] if i["link"] is not None}
    assert src == {"model": [ids["ckpt"]["id"], 0], "ipadapter": [ld["id"], 0], "image": [ids["image"]["id"], 0],
                   "attn_mask": [ids["image"]["id"], 1], "clip_vision": [ids["cv"]["id"], 0]}
    assert links[ap["inputs"][1]["link"]][5] == "IPADAPTER_FUSED"
    assert [links[x][3] for x in ap["outputs"][0]["links"]] == [ids["ks"]["id"]]
    _check_links(out)
    assert {e.node_type for e in report.converted} == {apply_type, "IPAdapterModelLoader"} and not report.left
    assert "cnr_id" not in ap["properties"]


def test_simple_ipadapter_weight_types(plus):
    for theirs, ours in (("standard", "linear"), ("prompt is more important", "ease out"),
                         ("style transfer", "style transfer")):
        w, ids = _build_apply(plus, "IPAdapter", {"weight": 0.7, "start_at": 0.1, "end_at": 0.9,
                                                  "weight_type": theirs}, loader="IPAdapterUnifiedLoader")
        out, report = mig.migrate(w.wf)
        ap = _node(out, ids["apply"]["id"])
        got = _fused_values(ap)
        assert (got["weight"], got["start_at"], got["end_at"], got["weight_type"]) == (0.7, 0.1, 0.9, ours)
        assert (got["combine_embeds"], got["embeds_scaling"], got["middle_block"]) == ("concat", "V only", COMPAT)
        _check_links(out)


def test_style_composition_with_one_image(plus):
    values = {"weight_style": 1.2, "weight_composition": 0.4, "combine_embeds": "concat"}
    w, ids = _build_apply(plus, "IPAdapterStyleComposition", values)
    out, report = mig.migrate(w.wf)
    got = _fused_values(_node(out, ids["apply"]["id"]))
    assert (got["weight"], got["weight_composition"], got["weight_type"]) == (1.2, 0.4, "style and composition")
    _check_links(out)
    # two different images, or expand_style: no counterpart, left as is with the reason
    w2, ids2 = _build_apply(plus, "IPAdapterStyleComposition", {"expand_style": True})
    out2, report2 = mig.migrate(w2.wf)
    assert _node(out2, ids2["apply"]["id"]) == ids2["apply"]
    assert "expand_style" in report2.left[0].reason
    other = w.add("LoadImage")
    w.wf["links"] = [r for r in w.wf["links"] if not (r[3] == ids["apply"]["id"] and r[4] == 3)]
    ids["image"]["outputs"][0]["links"] = [x for x in ids["image"]["outputs"][0]["links"]
                                           if x in {r[0] for r in w.wf["links"]}]
    w.link(other, 0, ids["apply"], "image_composition")
    out3, report3 = mig.migrate(w.wf)
    assert _node(out3, ids["apply"]["id"])["type"] == "IPAdapterStyleComposition"
    assert "different images" in report3.left[0].reason
    # the loader feeds a node that stays, so it stays too
    assert {e.node_type for e in report3.left} == {"IPAdapterStyleComposition", "IPAdapterModelLoader"}


@pytest.mark.parametrize("apply_type,boost", [("IPAdapterPreciseStyleTransfer", "style_boost"),
                                              ("IPAdapterPreciseComposition", "composition_boost")])
def test_precise_types_convert_only_when_the_boost_is_the_weight(plus, apply_type, boost):
    w, ids = _build_apply(plus, apply_type, {"weight": 0.8, boost: 0.8})
    out, _ = mig.migrate(w.wf)
    got = _fused_values(_node(out, ids["apply"]["id"]))
    assert got["weight"] == 0.8 and got["weight_type"].endswith("precise")
    w, ids = _build_apply(plus, apply_type, {"weight": 0.8, boost: 1.5})
    out, report = mig.migrate(w.wf)
    assert _node(out, ids["apply"]["id"])["type"] == apply_type and boost in report.left[0].reason


@pytest.mark.parametrize("with_unified", [True, False])
def test_unified_loader(plus, with_unified):
    """That pack's unified loader carried the CLIP vision model inside IPADAPTER; the converted apply node
    takes it from the unified loader's clip_vision output, or (a host whose pack has no unified loader,
    given as its object_info) from a CLIPVisionLoader added beside the adapter loader."""
    w, ids = _build_apply(plus, "IPAdapterAdvanced", {"weight": 0.6}, loader="IPAdapterUnifiedLoader",
                          clip_vision=False)
    info = None if with_unified else {k: v for k, v in mig.TARGET_NODES.items() if k != mig.UNIFIED_TARGET}
    out, report = mig.migrate(w.wf, info)
    ld, ap = _node(out, ids["loader"]["id"]), _node(out, ids["apply"]["id"])
    links = _links(out)
    src = {i["name"]: tuple(links[i["link"]][1:3]) for i in ap["inputs"] if i["link"] is not None}
    if with_unified:
        assert ld["type"] == mig.UNIFIED_TARGET
        assert src["model"] == (ld["id"], 0) and src["ipadapter"] == (ld["id"], 1)
        assert src["clip_vision"] == (ld["id"], 2)  # that pack carried the encoder inside IPADAPTER
    else:
        assert ld["type"] == "IPAdapterFusedLoader"
        cv = next(n for n in out["nodes"] if n["type"] == "CLIPVisionLoader")
        assert src["model"] == (ids["ckpt"]["id"], 0) and src["ipadapter"] == (ld["id"], 0)
        assert src["clip_vision"] == (cv["id"], 0)
        assert ld["widgets_values"] == ["ip-adapter-plus_sd15.safetensors"]
        assert any("no unified loader" in n for e in report.converted for n in e.notes)
    _check_links(out)


@pytest.mark.skipif(mig.UNIFIED_TARGET not in mig.pack_node_types(), reason="no unified loader in nodes/")
def test_unified_loader_presets(plus):
    expected = {"LIGHT - SD1.5 only (low strength)": "light", "STANDARD (medium strength)": "standard",
                "VIT-G (medium strength)": "vit-G", "PLUS (high strength)": "plus",
                "PLUS FACE (portraits)": "plus-face", "FULL FACE - SD1.5 only (portraits stronger)": "full-face"}
    assert set(expected) == set(mig._choices(_decl(plus["IPAdapterUnifiedLoader"])["input"]["required"]["preset"]))
    for theirs, ours in expected.items():
        w, ids = _build_apply(plus, "IPAdapterAdvanced", {}, loader="IPAdapterUnifiedLoader", clip_vision=False)
        ids["loader"]["widgets_values"] = [theirs]
        out, report = mig.migrate(w.wf)
        ld = _node(out, ids["loader"]["id"])
        assert _fused_values(ld) == {"preset": ours, "ipadapter_file": "by preset (content)",
                                     "clip_vision_file": "auto (by content)"}
        assert not any(e.notes for e in report.converted if e.node_id == ld["id"])


def test_apply_from_a_node_that_stays_stays(plus):
    """An apply node fed by the community unified loader keeps that pack's IPADAPTER type: it stays."""
    w, ids = _build_apply(plus, "IPAdapterAdvanced", {}, loader="IPAdapterUnifiedLoaderCommunity")
    out, report = mig.migrate(w.wf)
    assert out == w.wf
    reasons = {e.node_type: e.reason for e in report.left}
    assert reasons["IPAdapterUnifiedLoaderCommunity"] == mig.NO_EQUIVALENT["IPAdapterUnifiedLoaderCommunity"]
    assert "not converted" in reasons["IPAdapterAdvanced"]


def test_reroute_between_loader_and_apply(plus):
    w, ids = _build_apply(plus, "IPAdapterAdvanced", {})
    reroute = w.add("Reroute")
    lid = ids["apply"]["inputs"][1]["link"]
    row = next(r for r in w.wf["links"] if r[0] == lid)
    row[3], row[4] = reroute["id"], 0
    reroute["inputs"][0]["link"] = lid
    w.link(reroute, 0, ids["apply"], "ipadapter")
    reroute["outputs"][0]["type"] = "IPADAPTER"
    out, report = mig.migrate(w.wf)
    assert _node(out, ids["apply"]["id"])["type"] == "IPAdapterFusedApply"
    assert {r[5] for r in out["links"] if reroute["id"] in (r[1], r[3])} == {"IPADAPTER_FUSED"}


# -- nodes without an equivalent -------------------------------------------------------------------------------

def test_nodes_without_equivalent_stay_and_are_named(plus):
    decls = {k: _decl(v) for k, v in plus.items()}
    decls.update(HOST)
    w = Workflow(decls)
    image = w.add("LoadImage")
    made = {}
    for ntype in MOST_USED:
        if ntype in mig.NO_EQUIVALENT:
            made[ntype] = w.add(ntype, _nondefault(decls[ntype]))
    w.link(image, 0, made["PrepImageForClipVision"], "image")
    w.link(made["IPAdapterEncoder"], 0, made["IPAdapterCombineEmbeds"], "embed1")
    w.link(made["IPAdapterRegionalConditioning"], 0, made["IPAdapterCombineParams"], "params_1")
    w.link(made["IPAdapterCombineParams"], 0, made["IPAdapterFromParams"], "ipadapter_params")
    out, report = mig.migrate(w.wf)
    assert out == w.wf
    assert not report.converted
    assert {e.node_type for e in report.left} == set(made)
    text = report.text()
    for ntype, node in made.items():
        assert f"#{node['id']} {ntype}: {mig.NO_EQUIVALENT[ntype]}" in text
    assert len(made) >= 10


def test_other_version_of_that_pack_is_left(plus):
    w, ids = _build_apply(plus, "IPAdapterAdvanced", {})
    ids["apply"]["widgets_values"].append("extra")
    out, report = mig.migrate(w.wf)
    assert _node(out, ids["apply"]["id"])["type"] == "IPAdapterAdvanced"
    assert "another version" in next(e.reason for e in report.left if e.node_type == "IPAdapterAdvanced")


def test_command_line(plus, tmp_path):
    w, ids = _build_apply(plus, "IPAdapterAdvanced", {"weight": 0.55})
    w.add("IPAdapterNoise", {})
    src, dst = tmp_path / "old.json", tmp_path / "new.json"
    src.write_text(json.dumps(w.wf))
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "migrate_workflow.py"), str(src), str(dst)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "2 node(s) converted, 1 left in place" in res.stdout
    assert "IPAdapterNoise" in res.stdout and "IPAdapterAdvanced -> IPAdapterFusedApply" in res.stdout
    out = json.loads(dst.read_text())
    assert _fused_values(_node(out, ids["apply"]["id"]))["weight"] == 0.55
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "migrate_workflow.py"), str(tmp_path / "none.json"),
                          str(dst)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error" in bad.stdout


def test_widget_driven_by_a_link_and_links_saved_as_objects(plus):
    """A widget turned into an input (a primitive drives weight) keeps its link on the input of the same
    name; workflows of schema 1 (links as objects) come back in that form."""
    w, ids = _build_apply(plus, "IPAdapterAdvanced", {"weight": 0.3})
    prim = w.add("PrimitiveNode", decl=mig._decl([], None, ["FLOAT"], ["FLOAT"]))
    ids["apply"]["inputs"].append({"name": "weight", "type": "FLOAT", "widget": {"name": "weight"}, "link": None})
    lid = w.link(prim, 0, ids["apply"], "weight")
    w.wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), r))
                     for r in w.wf["links"]]
    out, report = mig.migrate(w.wf)
    assert all(isinstance(r, dict) for r in out["links"])
    out["links"] = [[r["id"], r["origin_id"], r["origin_slot"], r["target_id"], r["target_slot"], r["type"]]
                    for r in out["links"]]
    ap = _node(out, ids["apply"]["id"])
    weight_in = next(i for i in ap["inputs"] if i["name"] == "weight")
    assert weight_in["link"] == lid and weight_in["widget"] == {"name": "weight"}
    assert _links(out)[lid][1] == prim["id"]
    assert _fused_values(ap)["weight"] == 0.3
    _check_links(out)


def _examples():
    path = _plus_path()
    return sorted((path / "examples").glob("*.json")) if path else []


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_that_packs_own_example_workflows(path):
    """The workflows that pack ships (saved by its front end over several versions) convert without
    error; every node of that pack is either converted or named; the links stay consistent."""
    wf = json.loads(path.read_text())
    out, report = mig.migrate(wf)
    theirs = {n["id"] for n in wf["nodes"] if n["type"] in mig.PLUS_NODES or n["type"] in mig.NO_EQUIVALENT}
    assert {e.node_id for e in report.entries} == theirs
    _check_links(out)
    before = {n["id"]: n for n in wf["nodes"]}
    for e in report.converted:
        node = _node(out, e.node_id)
        assert node["type"] == e.target.split(" + ")[0]  # a unified loader may become several loaders
        if node["type"] == "IPAdapterFusedApply":
            got = _fused_values(node)
            assert got["middle_block"] == COMPAT
            assert next(i for i in node["inputs"] if i["name"] == "clip_vision")["link"] is not None
        if e.node_type == "IPAdapterFaceID":  # FaceID: the InsightFace loader that was carried in IPADAPTER
            old = map_widget_values(mig.PLUS_NODES["IPAdapterFaceID"], before[e.node_id]["widgets_values"])
            assert got["face_structure_weight"] == old["weight_faceidv2"]
            face = _links(out)[next(i for i in node["inputs"] if i["name"] == "insightface")["link"]]
            assert _node(out, face[1])["type"] == "IPAdapterFusedInsightFaceLoader" and face[5] == "IPAF_INSIGHTFACE"
            unified = next(n for n in wf["nodes"] if n["type"] == "IPAdapterUnifiedLoaderFaceID")
            assert got["faceid_lora_strength"] == unified["widgets_values"][1]
    if path.name == "IPAdapter_FaceIDv2_Kolors.json":  # weight_kolors 0.85: no counterpart, all FaceID stays
        reasons = {e.node_type: e.reason for e in report.left}
        assert "weight_kolors" in reasons["IPAdapterFaceIDKolors"]
        assert "stays" in reasons["IPAdapterInsightFaceLoader"] and "stays" in reasons["IPAdapterModelLoader"]
    if path.name == "ipadapter_weight_types.json":
        types_ = sorted(_fused_values(_node(out, e.node_id))["weight_type"] for e in report.converted
                        if e.target == "IPAdapterFusedApply")
        assert types_ == sorted(["linear", "ease in", "ease out", "ease in-out", "reverse in-out"])
    if path.name == "ipadapter_simple.json":  # saved before IPAdapter had weight_type: 3 values
        ap = next(_node(out, e.node_id) for e in report.converted if e.node_type == "IPAdapter")
        got = _fused_values(ap)
        assert (got["weight"], got["start_at"], got["end_at"], got["weight_type"]) == (0.8, 0, 1, "linear")


def test_nodes_inside_subgraphs_and_group_nodes_are_named():
    inner = {"nodes": [{"id": 1, "type": "IPAdapterAdvanced", "inputs": [], "outputs": [], "widgets_values": []}]}
    for wf, what in (({"nodes": [], "links": [], "definitions": {"subgraphs": [inner]}}, "subgraph"),
                     ({"nodes": [], "links": [], "extra": {"groupNodes": {"g": inner}}}, "group node")):
        out, report = mig.migrate(wf)
        assert out == wf and [e.node_id for e in report.left] == [what]
        assert "not converted" in report.text()
    with pytest.raises(ValueError, match="not a front-end workflow"):
        mig.migrate({"1": {"class_type": "IPAdapterAdvanced", "inputs": {}}})


# -- FaceID ---------------------------------------------------------------------------------------------------

PLUSV2 = "ip-adapter-faceid-plusv2_sd15.bin"
FACEID_LORA = "ip-adapter-faceid-plusv2_sd15_lora.safetensors"


def _faceid_graph(plus, apply_type="IPAdapterFaceID", values=None, file=PLUSV2, face=("CUDA", "buffalo_l"),
                  clip_vision=True, lora=None, unified=None):
    """checkpoint [-> LoraLoaderModelOnly] [-> IPAdapterUnifiedLoaderFaceID] -> apply -> KSampler, with the
    adapter from IPAdapterModelLoader (or the unified loader), an IPAdapterInsightFaceLoader, a CLIP vision
    loader and the face_image output previewed, as that pack's FaceID examples wire them."""
    decls = {k: _decl(v) for k, v in plus.items()}
    decls.update(HOST)
    w = Workflow(decls)
    ids = {"ckpt": w.add("CheckpointLoaderSimple"), "image": w.add("LoadImage")}
    model = (ids["ckpt"], 0)
    if lora:
        ids["lora"] = w.add("LoraLoaderModelOnly", {"lora_name": lora[0], "strength_model": lora[1]})
        w.link(*model, ids["lora"], "model")
        model = (ids["lora"], 0)
    if unified:
        ids["loader"] = w.add("IPAdapterUnifiedLoaderFaceID", unified)
        w.link(*model, ids["loader"], "model")
        model, adapter = (ids["loader"], 0), (ids["loader"], 1)
    else:
        ids["loader"] = w.add("IPAdapterModelLoader", {"ipadapter_file": file})
        adapter = (ids["loader"], 0)
    ap = ids["apply"] = w.add(apply_type, values)
    w.link(*model, ap, "model")
    w.link(*adapter, ap, "ipadapter")
    w.link(ids["image"], 0, ap, "image")
    if face:
        ids["face"] = w.add("IPAdapterInsightFaceLoader", {"provider": face[0], "model_name": face[1]})
        w.link(ids["face"], 0, ap, "insightface")
    if clip_vision:
        ids["cv"] = w.add("CLIPVisionLoader", {"clip_name": "vit-h.safetensors"})
        w.link(ids["cv"], 0, ap, "clip_vision")
    ids["ks"] = w.add("KSampler", {"seed": 5})
    w.link(ap, 0, ids["ks"], "model")
    if len(ap["outputs"]) > 1:
        ids["preview"] = w.add("PreviewImage")
        w.link(ap, 1, ids["preview"], "images")
    return w, ids


def _sources(wf, node):
    links = _links(wf)
    return {i["name"]: (links[i["link"]][1], links[i["link"]][2], links[i["link"]][5])
            for i in node["inputs"] if i.get("link") is not None}


def _notes(report, nid):
    return " ".join(n for e in report.converted if e.node_id == nid for n in e.notes)


@pytest.mark.parametrize("apply_type", ["IPAdapterFaceID", "IPAdapterFaceIDKolors", "IPAdapterMS"])
def test_faceid_apply_converts(plus, apply_type):
    """FaceID nodes (and IPAdapterMS with insightface) become the apply node in compatibility mode with the
    InsightFace loader linked: weight_faceidv2 -> face_structure_weight, face_image -> face_crops."""
    kolors = apply_type == "IPAdapterFaceIDKolors"
    values = _nondefault(_decl(plus[apply_type]))
    if kolors:
        values["weight_kolors"] = 1.0  # the only value with a counterpart here
    face = ("CPU", "antelopev2") if kolors else ("CUDA", "buffalo_l")
    w, ids = _faceid_graph(plus, apply_type, values, file="Kolors-IP-Adapter-FaceID-Plus.bin" if kolors else PLUSV2,
                           face=face)
    before = copy.deepcopy(w.wf)
    out, report = mig.migrate(w.wf)
    assert w.wf == before
    ap, fl = _node(out, ids["apply"]["id"]), _node(out, ids["face"]["id"])
    assert (ap["type"], fl["type"]) == ("IPAdapterFusedApply", "IPAdapterFusedInsightFaceLoader")
    got = _fused_values(ap)
    for name in ("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"):
        assert got[name] == values[name], name
    assert got["face_structure_weight"] == values["weight_faceidv2"]
    # that pack norms the embedding of every family but Portrait unnorm; this pack feeds Kolors FaceID-Plus raw
    want_embedding = "normed" if kolors else "auto"
    assert (got["middle_block"], got["face_structure"], got["face_embedding"]) == (COMPAT, "auto", want_embedding)
    assert got["faceid_lora_strength"] == 1.0
    assert _fused_values(fl) == {"model_pack": face[1], "provider": face[0], "det_size": 640, "face": "largest",
                                 "face_index": 0, "if_no_face": "error"}
    src = _sources(out, ap)
    assert src["insightface"] == (fl["id"], 0, "IPAF_INSIGHTFACE")
    assert src["clip_vision"] == (ids["cv"]["id"], 0, "CLIP_VISION")
    assert src["ipadapter"] == (ids["loader"]["id"], 0, "IPADAPTER_FUSED")
    assert src["model"] == (ids["ckpt"]["id"], 0, "MODEL")
    if "preview" in ids:  # face_image -> face_crops
        assert _sources(out, _node(out, ids["preview"]["id"]))["images"] == (ap["id"], 1, "IMAGE")
        assert ap["outputs"][1]["name"] == "face_crops"
    _check_links(out)
    assert {e.node_type for e in report.converted} == {apply_type, "IPAdapterModelLoader",
                                                      "IPAdapterInsightFaceLoader"} and not report.left
    notes = _notes(report, ap["id"])
    # that graph loaded no FaceID LoRA; this pack applies the file's own (Kolors files hold none)
    assert ("no FaceID LoRA was loaded" in notes) != kolors
    assert "highest detection score" in _notes(report, fl["id"])


def test_faceid_refusals(plus):
    # weight_kolors other than 1: no counterpart; the loaders feeding that node stay with it
    w, ids = _faceid_graph(plus, "IPAdapterFaceIDKolors", {"weight_kolors": 0.85}, face=("CPU", "antelopev2"))
    out, report = mig.migrate(w.wf)
    assert out == w.wf
    reasons = {e.node_type: e.reason for e in report.left}
    assert "weight_kolors = 0.85" in reasons["IPAdapterFaceIDKolors"] and "no counterpart" in reasons[
        "IPAdapterFaceIDKolors"]
    assert f"feeds #{ids['apply']['id']} IPAdapterFaceIDKolors, which stays" in reasons["IPAdapterInsightFaceLoader"]
    assert "which stays" in reasons["IPAdapterModelLoader"] and not report.converted
    # no CLIP vision model: optional there, required here
    for apply_type in ("IPAdapterFaceID", "IPAdapterMS"):
        w, ids = _faceid_graph(plus, apply_type, {}, clip_vision=False)
        out, report = mig.migrate(w.wf)
        assert out == w.wf
        why = next(e.reason for e in report.left if e.node_type == apply_type)
        assert "clip_vision is not connected" in why and "CLIPVisionLoader" in why
    # unfold batch
    w, ids = _faceid_graph(plus, "IPAAdapterFaceIDBatch", {})
    out, report = mig.migrate(w.wf)
    assert out == w.wf
    assert next(e.reason for e in report.left if e.node_type == "IPAAdapterFaceIDBatch") == \
        mig.NO_EQUIVALENT["IPAAdapterFaceIDBatch"]
    assert "unfold batch" in mig.NO_EQUIVALENT["IPAAdapterFaceIDBatch"]
    # an InsightFace loader also feeding another pack's node stays, and so does what it feeds here
    w, ids = _faceid_graph(plus)
    other = w.add("SomeFaceNode", decl=mig._decl([("insightface", ["INSIGHTFACE"])], None, ["IMAGE"]))
    w.link(ids["face"], 0, other, "insightface")
    out, report = mig.migrate(w.wf)
    assert out == w.wf
    reasons = {e.node_type: e.reason for e in report.left}
    assert "SomeFaceNode, which stays" in reasons["IPAdapterInsightFaceLoader"]
    assert "its insightface input comes from" in reasons["IPAdapterFaceID"]


def test_faceid_without_insightface_is_named(plus):
    w, ids = _faceid_graph(plus, face=None)
    out, report = mig.migrate(w.wf)
    ap = _node(out, ids["apply"]["id"])
    assert ap["type"] == "IPAdapterFusedApply" and "insightface" not in _sources(out, ap)
    assert "insightface is not connected" in _notes(report, ap["id"])


@pytest.mark.parametrize("name", [PLUSV2, "ip-adapter-faceid-plus_sd15.bin", "ip-adapter-faceid-plusv2_sdxl.bin",
                                  "faceid_plus_v2.safetensors", "my-face-adapter.bin", "FaceID-PlusV2-renamed.bin"])
def test_face_structure_as_that_pack_reads_the_file_name(plus, name):
    """That pack turns the V2 shortcut on only for 'plusv2' in the file name (utils.py); after conversion
    this pack's choice resolves to the same for a FaceID Plus file, whatever the file's own default."""
    from ipadapter_fused.nodes.encoders import FaceOptions, shortcut_scale

    w, ids = _faceid_graph(plus, values={"weight_faceidv2": 1.5}, file=name)
    out, report = mig.migrate(w.wf)
    got = _fused_values(_node(out, ids["apply"]["id"]))
    options = FaceOptions(structure=got["face_structure"], structure_weight=got["face_structure_weight"],
                          adapter_name=name)
    for default in (True, False):
        spec = types.SimpleNamespace(face=types.SimpleNamespace(shortcut="choice", shortcut_default=default))
        assert shortcut_scale(spec, options) == (1.5 if "plusv2" in name.lower() else None), (name, default)
    pinned = got["face_structure"] != "auto"
    assert pinned == ("face_structure" in _notes(report, ids["apply"]["id"]))


def test_faceid_names_of_plain_faceid_keep_auto(plus):
    for name in ("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid-portrait_sdxl_unnorm.bin"):
        w, ids = _faceid_graph(plus, file=name)
        out, _ = mig.migrate(w.wf)
        assert _fused_values(_node(out, ids["apply"]["id"]))["face_structure"] == "auto"


def test_faceid_lora_loader_is_named(plus):
    """A LoRA loader with the published FaceID LoRA on the model path: the report says the pack applies the
    file's own LoRA (skipping a duplicate it finds), and its strength becomes faceid_lora_strength."""
    w, ids = _faceid_graph(plus, lora=(FACEID_LORA, 0.6))
    out, report = mig.migrate(w.wf)
    ap = _node(out, ids["apply"]["id"])
    assert _fused_values(ap)["faceid_lora_strength"] == 0.6
    notes = _notes(report, ap["id"])
    assert f"#{ids['lora']['id']} LoraLoaderModelOnly loads {FACEID_LORA!r}" in notes and "can be removed" in notes
    assert _node(out, ids["lora"]["id"]) == ids["lora"]  # the host's node is left to the user
    assert _sources(out, ap)["model"] == (ids["lora"]["id"], 0, "MODEL")
    _check_links(out)
    w, ids = _faceid_graph(plus, lora=("add_detail.safetensors", 0.6))  # another LoRA: not the FaceID one
    out, report = mig.migrate(w.wf)
    ap = _node(out, ids["apply"]["id"])
    assert _fused_values(ap)["faceid_lora_strength"] == 1.0
    assert "LoraLoaderModelOnly" not in _notes(report, ap["id"])


def _object_info(files=(), providers=("auto", "CPU", "CUDA"), packs=("buffalo_l", "antelopev2")):
    """A host's declarations as the route passes them: the target nodes with this machine's lists."""
    info = copy.deepcopy(mig.TARGET_NODES)
    info["IPAdapterFusedLoader"]["input"]["required"]["ipadapter_file"] = [list(files)]
    face = info[mig.INSIGHTFACE_TARGET]["input"]["required"]
    face["provider"] = [list(providers), {"default": "auto"}]
    face["model_pack"] = [list(packs)]
    return info


def test_insightface_loader_provider_and_pack(plus):
    """Providers keep their name (the loader runs an unavailable one on the CPU, saying so); the report
    says when this host's onnxruntime does not offer it."""
    from ipadapter_fused.face.install import full_name

    rocm = _object_info(providers=("auto", "CPU", "CUDA", "ROCM"))
    for theirs, info, offered in (("CPU", None, True), ("CUDA", None, True), ("ROCM", None, False),
                                  ("ROCM", rocm, True)):
        w, ids = _faceid_graph(plus, face=(theirs, "buffalo_l"))
        out, report = mig.migrate(w.wf, info)
        ours = _fused_values(_node(out, ids["face"]["id"]))["provider"]
        assert full_name(ours) == theirs + "ExecutionProvider"  # what that pack asked onnxruntime for
        assert ("is not offered" in _notes(report, ids["face"]["id"])) != offered
    w, ids = _faceid_graph(plus, face=("CPU", "antelopev2"))
    out, report = mig.migrate(w.wf, _object_info(packs=("buffalo_l",)))
    assert _fused_values(_node(out, ids["face"]["id"]))["model_pack"] == "antelopev2"
    assert "models/insightface/models/antelopev2/" in _notes(report, ids["face"]["id"])


@pytest.mark.parametrize("preset,file,lora", [("FACEID PLUS V2", PLUSV2, True),
                                              ("FACEID", "ip-adapter-faceid_sd15.bin", True),
                                              ("FACEID PORTRAIT (style transfer)",
                                               "ip-adapter-faceid-portrait-v11_sd15.bin", False),
                                              ("FACEID PORTRAIT UNNORM - SDXL only (strong)",
                                               "ip-adapter-faceid-portrait_sdxl_unnorm.bin", False)])
def test_unified_faceid_loader(plus, preset, file, lora):
    """That pack's FaceID unified loader put the LoRA on the model and carried CLIP vision and InsightFace in
    IPADAPTER: here the adapter loader plus a CLIP vision loader and an InsightFace loader wired to every
    apply node it fed, the model straight on, lora_strength on the apply nodes. A second apply node without
    weight_faceidv2 (IPAdapterAdvanced) gets that pack's default for it: twice its weight."""
    w, ids = _faceid_graph(plus, values={"weight_faceidv2": 1.7}, face=None, clip_vision=False,
                           unified={"preset": preset, "lora_strength": 0.45, "provider": "CUDA"})
    adv = w.add("IPAdapterAdvanced", {"weight": 0.7})
    ks_link = next(r for r in w.wf["links"] if r[3] == ids["ks"]["id"])
    w.wf["links"].remove(ks_link)
    ids["apply"]["outputs"][0]["links"].remove(ks_link[0])
    ids["ks"]["inputs"][0]["link"] = None
    w.link(ids["apply"], 0, adv, "model")
    w.link(ids["loader"], 1, adv, "ipadapter")
    w.link(ids["image"], 0, adv, "image")
    w.link(adv, 0, ids["ks"], "model")
    direct = w.add("KSampler", {"seed": 6})  # takes the loader's model (with the LoRA, in that pack) itself
    w.link(ids["loader"], 0, direct, "model")
    out, report = mig.migrate(w.wf)
    assert _sources(out, _node(out, direct["id"]))["model"] == (ids["ckpt"]["id"], 0, "MODEL")
    ld = _node(out, ids["loader"]["id"])
    assert ld["type"] == "IPAdapterFusedLoader" and ld["widgets_values"] == [file]
    cv = next(n for n in out["nodes"] if n["type"] == "CLIPVisionLoader")
    fl = next(n for n in out["nodes"] if n["type"] == mig.INSIGHTFACE_TARGET)
    assert _fused_values(fl)["provider"] == "CUDA" and _fused_values(fl)["model_pack"] == "buffalo_l"
    face_ap, adv_ap = _node(out, ids["apply"]["id"]), _node(out, adv["id"])
    for ap, model_from, structure_weight in ((face_ap, ids["ckpt"]["id"], 1.7), (adv_ap, face_ap["id"], 1.4)):
        src = _sources(out, ap)
        assert src["model"] == (model_from, 0, "MODEL")
        assert src["ipadapter"] == (ld["id"], 0, "IPADAPTER_FUSED")
        assert src["clip_vision"] == (cv["id"], 0, "CLIP_VISION")
        assert src["insightface"] == (fl["id"], 0, "IPAF_INSIGHTFACE")
        got = _fused_values(ap)
        assert (got["faceid_lora_strength"], got["face_structure_weight"]) == (0.45, structure_weight)
        assert got["middle_block"] == COMPAT
    assert "model" not in _sources(out, ld)
    _check_links(out)
    notes = _notes(report, ld["id"])
    assert f"#{cv['id']}" in notes and f"#{fl['id']}" in notes and file in notes
    assert ("lora_strength 0.45 became faceid_lora_strength" in notes) == lora
    assert (f"#{direct['id']} KSampler took the model with the FaceID LoRA" in notes) == lora
    assert not report.left


def test_unified_faceid_files_and_providers_of_this_host(plus):
    """With the host's lists (the route), the preset takes the file there is, SD1.5 first (that pack
    chose by the model; the report names the SDXL one), and DirectML becomes onnxruntime's 'Dml'."""
    from ipadapter_fused.face.install import full_name

    files = ("sub/ip-adapter-faceid-plusv2_sdxl.bin", "IP-Adapter-FaceID-PlusV2_SD15.safetensors",
             "ip-adapter-faceid-plus_sd15.bin", "ip-adapter_sd15.bin")
    info = _object_info(files=files, providers=("auto", "CPU", "CUDA", "Dml"))
    unified = {"preset": "FACEID PLUS V2", "lora_strength": 0.6, "provider": "DirectML"}
    w, ids = _faceid_graph(plus, face=None, clip_vision=False, unified=unified)
    out, report = mig.migrate(w.wf, info)
    assert _node(out, ids["loader"]["id"])["widgets_values"] == ["IP-Adapter-FaceID-PlusV2_SD15.safetensors"]
    assert "on SDXL choose 'sub/ip-adapter-faceid-plusv2_sdxl.bin'" in _notes(report, ids["loader"]["id"])
    fl = next(n for n in out["nodes"] if n["type"] == mig.INSIGHTFACE_TARGET)
    assert _fused_values(fl)["provider"] == "Dml"
    w, ids = _faceid_graph(plus, face=None, clip_vision=False, unified=unified)
    out, report = mig.migrate(w.wf)  # static lists: no DirectML here
    fl = next(n for n in out["nodes"] if n["type"] == mig.INSIGHTFACE_TARGET)
    assert full_name(_fused_values(fl)["provider"]) == "DmlExecutionProvider"  # onnxruntime's name for it
    assert "'Dml' is not offered" in _notes(report, ids["loader"]["id"])
