"""Front-end workflow (nodes, links, widgets_values) -> the host's API prompt, and the runner's
--set / --image references checked against the workflow before anything starts.

The conversion reads the node declarations of a running host (/object_info): the front end stores
widget values by position, and only the declarations say which input each position is."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError, WorkflowError

# Nodes that exist only in the front end (never sent to the server).
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_ALWAYS, MODE_ON_EVENT, MODE_NEVER, MODE_ON_TRIGGER, MODE_BYPASS = 0, 1, 2, 3, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_VALUES = {"image", "video", "audio", "file"}


def load_workflow(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"cannot read workflow {path}: {exc}")
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: not a workflow (expected a JSON object)")
    return data


def is_api_prompt(data: dict) -> bool:
    """True for a prompt already in API format ({id: {class_type, inputs}})."""
    return bool(data) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def _input_spec_items(info: dict):
    """(name, spec) of a node's declared inputs, required then optional, in declaration order."""
    inputs = info.get("input", {}) or {}
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        names = order.get(section) or list(declared.keys())
        for name in names:
            if name in declared:
                yield name, declared[name]


def _spec_type_opts(spec) -> tuple[object, dict]:
    if isinstance(spec, (list, tuple)) and spec:
        kind = spec[0]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return kind, opts
    return spec, {}


def is_widget_input(spec) -> bool:
    kind, opts = _spec_type_opts(spec)
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def widget_inputs(info: dict) -> list[tuple[str, object]]:
    return [(n, s) for n, s in _input_spec_items(info) if is_widget_input(s)]


def _has_control_widget(name: str, spec) -> bool:
    kind, opts = _spec_type_opts(spec)
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return kind == "INT" and name in ("seed", "noise_seed")


def _has_upload_widget(spec) -> bool:
    _, opts = _spec_type_opts(spec)
    return any(k.endswith("_upload") and v for k, v in opts.items())


def map_widget_values(info: dict, values) -> dict:
    """Widget values of one node, by input name, in the order the node declares its widget inputs.

    The front end stores one value per widget, plus the values of the widgets it adds itself:
    'control_after_generate' after seed-like widgets (KSampler: [seed, "randomize", steps, ...]) and an
    upload button after upload combos (LoadImage: ["example.png", "image"]). When the count says
    whether those extra values are there, it decides; otherwise (a workflow saved before the node got
    more widgets) each extra value is recognised by its content."""
    if values is None:
        return {}
    widgets = widget_inputs(info)
    if isinstance(values, dict):  # some nodes save {name: value}
        names = {n for n, _ in widgets}
        return {k: v for k, v in values.items() if k in names}
    vals = list(values)
    extras = [(_has_control_widget(n, s), _has_upload_widget(s)) for n, s in widgets]
    n_extra = sum(a + b for a, b in extras)
    if len(vals) == len(widgets) + n_extra:
        mode = "all"
    elif len(vals) <= len(widgets) and n_extra:
        mode = "guess" if any(v in CONTROL_VALUES or v in UPLOAD_VALUES for v in vals if isinstance(v, str)) else "none"
    else:
        mode = "guess"
    out = {}
    i = 0
    for (name, spec), (control, upload) in zip(widgets, extras):
        if i >= len(vals):
            break
        out[name] = vals[i]
        i += 1
        if control and i < len(vals):
            v = vals[i]
            if mode == "all" or (mode == "guess" and (v in CONTROL_VALUES if isinstance(v, str) else isinstance(v, bool))):
                i += 1
        if upload and i < len(vals):
            v = vals[i]
            if mode == "all" or (mode == "guess" and isinstance(v, str) and v in UPLOAD_VALUES):
                i += 1
    return out


def _links_by_id(workflow: dict) -> dict:
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):  # schema version 1
            lid = link["id"]
            links[lid] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                          link.get("type", "*"))
        else:  # version 0.4: [id, origin_id, origin_slot, target_id, target_slot, type]
            lid, o_id, o_slot, t_id, t_slot = link[:5]
            links[lid] = (o_id, o_slot, t_id, t_slot, link[5] if len(link) > 5 else "*")
    return links


def _types_match(a, b) -> bool:
    if a in (None, "*", "") or b in (None, "*", ""):
        return True
    sa = set(str(a).split(","))
    sb = set(str(b).split(","))
    return bool(sa & sb)


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """Convert a front-end workflow (nodes, links, widgets_values) to the API prompt format."""
    if is_api_prompt(workflow):
        return json.loads(json.dumps(workflow))
    if "nodes" not in workflow:
        raise WorkflowError("not a front-end workflow: no 'nodes'")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this runner; "
                            "unpack the subgraphs in the editor first")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links_by_id(workflow)

    missing = sorted({n["type"] for n in nodes.values()
                      if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY
                      and n.get("mode", 0) not in (MODE_NEVER,)})
    if missing:
        raise WorkflowError("node types unknown to the host: " + ", ".join(missing)
                            + " (a custom node pack is missing or failed to load; see the host log)")

    def resolve(link_id, depth=0):
        """Origin of a link, following Reroutes and bypassed nodes.
        Returns (node_id, slot), ("primitive", None) or None (no value)."""
        if depth > 64:
            raise WorkflowError("link cycle through reroute/bypassed nodes")
        if link_id is None or link_id not in links:
            return None
        o_id, o_slot, _, _, ltype = links[link_id]
        node = nodes.get(o_id)
        if node is None:
            return None
        mode = node.get("mode", 0)
        if node["type"] == "Reroute":
            ins = node.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, depth + 1)
        if node["type"] == "PrimitiveNode":
            return ("primitive", None)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            outs = node.get("outputs") or []
            otype = outs[o_slot].get("type") if o_slot < len(outs) else ltype
            ins = node.get("inputs") or []
            candidates = []
            if o_slot < len(ins) and _types_match(ins[o_slot].get("type"), otype):
                candidates.append(ins[o_slot])
            candidates += [i for i in ins if _types_match(i.get("type"), otype) and i not in candidates]
            for cand in candidates:
                if cand.get("link") is not None:
                    return resolve(cand["link"], depth + 1)
            return None
        return (str(o_id), o_slot)

    prompt = {}
    for nid, node in sorted(nodes.items(), key=lambda kv: (kv[1].get("order", 0), str(kv[0]))):
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[ntype]
        inputs = map_widget_values(info, node.get("widgets_values"))
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if inp.get("link") is None:
                continue
            origin = resolve(inp["link"])
            if origin is None:
                if not inp.get("widget"):
                    inputs.pop(name, None)  # source muted / bypassed with nothing to pass through
                continue
            if origin[0] == "primitive":
                continue  # the value is in this node's own widgets_values
            inputs[name] = [origin[0], origin[1]]
        title = node.get("title") or info.get("display_name") or ntype
        prompt[str(nid)] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}
    return prompt


LOAD_IMAGE_TYPES = ("LoadImage", "LoadImageMask")


def sent_nodes(workflow: dict) -> dict:
    """The nodes the host will get, before conversion: {id: {"class_type", "_meta": {"title"}}}
    (front-end-only, muted and bypassed nodes left out). Titles are the workflow's own; the host's
    display names are known only after /object_info."""
    if is_api_prompt(workflow):
        return workflow
    if "nodes" not in workflow:
        raise WorkflowError("not a front-end workflow: no 'nodes'")
    out = {}
    for node in workflow["nodes"]:
        if node.get("type") in FRONTEND_ONLY or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        out[str(node["id"])] = {"class_type": node.get("type"), "_meta": {"title": node.get("title") or ""},
                                "widgets_values": node.get("widgets_values")}
    return out


def find_nodes(nodes: dict, ref: str) -> list[str]:
    """Node ids matching an id, a title or a class type."""
    if ref in nodes:
        return [ref]
    by_title = [k for k, v in nodes.items() if v.get("_meta", {}).get("title") == ref]
    if by_title:
        return by_title
    return [k for k, v in nodes.items() if v.get("class_type") == ref]


def parse_override(item: str) -> tuple[str, str, object]:
    """--set NODE.INPUT=VALUE -> (NODE, INPUT, VALUE); VALUE is JSON when it parses, else text."""
    target, sep, raw = item.partition("=")
    if not sep or "." not in target:
        raise UsageError(f"--set {item!r}: expected NODE.INPUT=VALUE (e.g. --set 5.weight=0.5)")
    ref, name = target.rsplit(".", 1)
    if not ref or not name:
        raise UsageError(f"--set {item!r}: expected NODE.INPUT=VALUE (e.g. --set 5.weight=0.5)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return ref, name, value


def _describe(nodes: dict, ids) -> str:
    return ", ".join(f"#{i} {nodes[i].get('class_type')}" for i in ids)


def check_override_nodes(nodes: dict, overrides: list[str]) -> None:
    """Before the host starts: every --set names a node of the workflow. A node id must exist; a
    name that is no title or class type here may still be a display name, checked after /object_info."""
    for item in overrides or []:
        ref, _, _ = parse_override(item)
        if ref.isdigit() and ref not in nodes:
            raise UsageError(f"--set {item!r}: the workflow has no node #{ref} (its nodes: {_describe(nodes, nodes)})")


def declared_inputs(info: dict) -> list[str]:
    return [name for name, _ in _input_spec_items(info)]


def apply_overrides(prompt: dict, overrides: list[str], object_info: dict | None = None) -> None:
    """--set NODE.INPUT=VALUE (NODE: id, title or class type). With the host's declarations
    (object_info), an input the node does not declare is an error naming the ones it has."""
    for item in overrides or []:
        ref, name, value = parse_override(item)
        ids = find_nodes(prompt, ref)
        if not ids:
            raise UsageError(f"--set {item!r}: no node {ref!r} (give a node id, title or class type; "
                             f"the prompt has {_describe(prompt, prompt)})")
        for nid in ids:
            info = (object_info or {}).get(prompt[nid]["class_type"])
            if info is not None and name not in declared_inputs(info):
                raise UsageError(f"--set {item!r}: node #{nid} {prompt[nid]['class_type']} has no input {name!r}; "
                                 f"its inputs: {', '.join(declared_inputs(info))}")
        for nid in ids:
            prompt[nid]["inputs"][name] = value


def _workflow_image_name(node: dict) -> str:
    """The picture a LoadImage node names (API inputs or the first widget value), tags stripped."""
    name = (node.get("inputs") or {}).get("image") if isinstance(node.get("inputs"), dict) else None
    if name is None:
        values = node.get("widgets_values")
        if isinstance(values, dict):
            name = values.get("image")
        elif values:
            name = values[0]
    name = str(name or "")
    for tag in (" [input]", " [output]", " [temp]"):
        if name.endswith(tag):
            name = name[: -len(tag)]
    return name


def plan_images(nodes: dict, images: list[str], example_folder: Path | None = None) -> dict[str, Path]:
    """Before the host starts: the picture of every LoadImage node, {node id: file}.

    --image PATH gives all LoadImage nodes their picture, --image NODE=PATH one node (id or title).
    A LoadImage node left without one is an error, unless `example_folder` is given (the runner's
    --example-image): then it gets the file its workflow names from that folder (ComfyUI's input/)."""
    load_nodes = [nid for nid, n in nodes.items() if n.get("class_type") in LOAD_IMAGE_TYPES]
    explicit: dict[str, Path] = {}
    default = None
    for item in images or []:
        ref, sep, path = item.partition("=")
        if sep and not Path(item).exists():
            ids = find_nodes(nodes, ref)
            if not ids:
                raise UsageError(f"--image {item!r}: the workflow has no node {ref!r}; its image loaders: "
                                 + (_describe(nodes, load_nodes) or "none"))
            wrong = [i for i in ids if i not in load_nodes]
            if wrong:
                raise UsageError(f"--image {item!r}: node {_describe(nodes, wrong)} loads no image; "
                                 f"its image loaders: " + (_describe(nodes, load_nodes) or "none"))
            for nid in ids:
                if nid in explicit and explicit[nid] != Path(path):
                    raise UsageError(f"--image: two pictures for {_describe(nodes, [nid])}: {explicit[nid]} and "
                                     f"{path}; give each image loader one")
                explicit[nid] = Path(path)
        else:
            # a second bare path would silently replace the first for every loader
            if default is not None and default != Path(item):
                raise UsageError(
                    f"--image given twice for every image loader: {default} and {item}; to feed different "
                    "loaders write " + " ".join(f"--image {nid}=PATH" for nid in load_nodes)
                    + f" (image loaders: {_describe(nodes, load_nodes) or 'none'})")
            default = Path(item)
    if (images or []) and not load_nodes:
        raise UsageError("--image given, but the workflow has no LoadImage node")
    plan = {}
    for nid in load_nodes:
        path = explicit.get(nid) or default
        if path is None:
            if example_folder is None:
                raise UsageError(
                    f"the workflow's image loader {_describe(nodes, [nid])} has no picture: pass --image PATH "
                    f"(every loader) or --image {nid}=PATH, or --example-image to use the file the workflow "
                    f"names ({_workflow_image_name(nodes[nid])!r}) from ComfyUI's input folder")
            path = Path(example_folder) / _workflow_image_name(nodes[nid])
            if not path.is_file():
                raise UsageError(f"--example-image: node {_describe(nodes, [nid])} names {path.name!r}, which is not "
                                 f"in {example_folder}; pass --image PATH")
        elif not path.is_file():
            raise UsageError(f"--image: no such file: {path}")
        plan[nid] = path
    return plan


def check_pictures(nodes: dict, plan: dict[str, Path]) -> None:
    """Before the host starts: every planned picture opens with Pillow (what the host's LoadImage
    uses), so a wrong file is not found only after the host has started and loaded models. Without
    Pillow in this Python the host's own error will tell."""
    try:
        from PIL import Image
    except ImportError:
        return
    for nid, path in plan.items():
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # Pillow raises several kinds for files it cannot read
            raise UsageError(f"--image: {path} is not a picture (for {_describe(nodes, [nid])}): "
                             f"{type(exc).__name__}: {exc}") from None
