#!/usr/bin/env python3
"""Run a ComfyUI workflow headless, with this pack loaded, and fetch its images.

    python tools/run_workflow.py --comfyui /path/to/ComfyUI workflows/sd15_basic.json --image me.png
    python tools/run_workflow.py --comfyui /path/to/ComfyUI --selfcheck --cpu

What it does:
  1. makes a temp folder with a ``custom_nodes/`` that links to this pack (unless the host already has
     this checkout installed), an ``extra_model_paths.yaml`` and empty input/output/user folders, so the
     ComfyUI install is not written to;
  2. starts the host (``main.py``) on 127.0.0.1 on a free port, only this pack loaded unless
     ``--all-custom-nodes``; ``--cpu`` and ``--host-arg`` are passed through;
  3. reads ``/object_info``, converts the front-end workflow (nodes + links + widgets_values) to the API
     prompt format, uploads the LoadImage pictures, queues it, prints progress from the websocket;
  4. downloads the output images to ``--out`` and prints their paths, then stops the host.

``--selfcheck`` makes tiny random-weight models with the real layouts (cached), runs
``workflows/selfcheck_sd15.json`` and checks the pictures: a machine without downloaded models can check
that the pack loads, patches and samples in the real host.

This file needs only the standard library; heavy work (making models, reading pictures) runs in the
host's Python (``--python``, default: the one running this script).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-ipadapter-fused"        # [project].name in pyproject.toml
LINK_NAME = "ComfyUI-IPAdapter-Fused"        # folder name under the temp custom_nodes/
WORKFLOWS = PACK_ROOT / "workflows"
SELFCHECK_WORKFLOW = WORKFLOWS / "selfcheck_sd15.json"
# Bump when the generated host models change (names, shapes, init): the cache is keyed by it.
SELFCHECK_MODELS_VERSION = 1
PROBE_NODE = "IPAdapterFusedApply"

# Selfcheck file names (workflows/selfcheck_sd15.json refers to them).
SC_CHECKPOINT = "ipaf_selfcheck_sd15.safetensors"
SC_CLIP_VISION = "ipaf_selfcheck_clip_vision_vitl.safetensors"
SC_ADAPTER = "ipaf_selfcheck_sd15_base.safetensors"
SC_IMAGE = "ipaf_selfcheck_input.png"
SC_PREFIX_IP = "ipaf_selfcheck_ip"
SC_PREFIX_PLAIN = "ipaf_selfcheck_plain"


class RunnerError(Exception):
    """An error to report to the user without a traceback."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# torchvision beside a CPU-only torch
# --------------------------------------------------------------------------------------------------
# The host imports torchvision at start-up (comfy.model_base -> comfy.ldm.cosmos / cascade). PyPI's
# torchvision wheels link their compiled ops against CUDA torch; beside the CPU-only torch build the
# ops library does not load and `import torchvision` then fails in torchvision._meta_registrations
# ("operator torchvision::nms does not exist"). The pure-Python parts (transforms) work without the
# ops. This import hook runs just before torchvision is imported: when the ops library does not load,
# it declares the two operator schemas torchvision registers fake kernels for, so the import succeeds.
# Calling those ops then fails clearly ("no kernel"), everything else works. When the ops load, it does
# nothing. It is self-contained so that it can also be installed as a .pth hook in a venv
# (--install-torchvision-fix).
TORCHVISION_FIX_SOURCE = r'''
import importlib.abc
import importlib.machinery
import os
import sys

_STATE = {"checked": False, "library": None}
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _prepare():
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = []
    for folder in spec.submodule_search_locations:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        libs += [os.path.join(folder, n) for n in names
                 if n.startswith("_C.") and n.endswith((".so", ".pyd"))]
    if not libs:
        return
    import torch
    try:
        torch.ops.load_library(libs[0])
        return
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        try:
            library.define(schema)
        except RuntimeError:
            pass
    _STATE["library"] = library
    sys.stderr.write("[ipadapter-fused] torchvision's compiled ops do not load beside this torch build; "
                     "declared stubs so that its Python parts import (detection ops are unavailable).\n")


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not _STATE["checked"]:
            _STATE["checked"] = True
            try:
                _prepare()
            except Exception as exc:  # never break the import itself
                sys.stderr.write("[ipadapter-fused] torchvision check failed: %r\n" % (exc,))
        return None


def install():
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
'''
TORCHVISION_FIX_MODULE = "ipadapter_fused_tvfix"


def install_torchvision_fix() -> None:
    """Install the torchvision hook in this process (before torchvision is imported)."""
    module = sys.modules.get(TORCHVISION_FIX_MODULE)
    if module is None:
        module = types.ModuleType(TORCHVISION_FIX_MODULE)
        exec(compile(TORCHVISION_FIX_SOURCE, "<ipadapter_fused_tvfix>", "exec"), module.__dict__)
        sys.modules[TORCHVISION_FIX_MODULE] = module
    module.install()


def write_torchvision_fix_pth(site_dir: str | None = None) -> list[Path]:
    """Install the hook into a venv's site-packages as a .pth file (runs at interpreter start)."""
    import sysconfig
    target = Path(site_dir or sysconfig.get_paths()["purelib"])
    mod = target / f"{TORCHVISION_FIX_MODULE}.py"
    pth = target / f"{TORCHVISION_FIX_MODULE}.pth"
    mod.write_text(TORCHVISION_FIX_SOURCE)
    pth.write_text(f"import {TORCHVISION_FIX_MODULE}; {TORCHVISION_FIX_MODULE}.install()\n")
    return [mod, pth]


def boot_host(main_py: str, host_args: list[str]) -> None:
    """Entry used as the host process: install the hook, then run ComfyUI's main.py as __main__."""
    import runpy
    install_torchvision_fix()
    main_py = os.path.abspath(main_py)
    host_dir = os.path.dirname(main_py)
    sys.argv = [main_py] + host_args
    if sys.path and os.path.abspath(sys.path[0] or ".") == str(Path(__file__).resolve().parent):
        sys.path[0] = host_dir
    else:
        sys.path.insert(0, host_dir)
    runpy.run_path(main_py, run_name="__main__")


# --------------------------------------------------------------------------------------------------
# Front-end workflow -> API prompt
# --------------------------------------------------------------------------------------------------
# Nodes that exist only in the front end (never sent to the server).
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_ALWAYS, MODE_ON_EVENT, MODE_NEVER, MODE_ON_TRIGGER, MODE_BYPASS = 0, 1, 2, 3, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_VALUES = {"image", "video", "audio", "file"}


class WorkflowError(RunnerError):
    pass


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


def find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids matching an id, a title or a class type."""
    if ref in prompt:
        return [ref]
    by_title = [k for k, v in prompt.items() if v.get("_meta", {}).get("title") == ref]
    if by_title:
        return by_title
    return [k for k, v in prompt.items() if v["class_type"] == ref]


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    """--set NODE.INPUT=VALUE (NODE: id, title or class type; VALUE: JSON, else a string)."""
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RunnerError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        target, raw = item.split("=", 1)
        ref, name = target.rsplit(".", 1)
        ids = find_nodes(prompt, ref)
        if not ids:
            raise RunnerError(f"--set {item!r}: no node {ref!r} (id, title or class type)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        for nid in ids:
            prompt[nid]["inputs"][name] = value


# --------------------------------------------------------------------------------------------------
# HTTP and websocket (standard library only)
# --------------------------------------------------------------------------------------------------
class HostHTTP:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.base = f"http://{host}:{port}"

    def request(self, method, path, body=None, headers=None, timeout=60):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path, timeout=60):
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RunnerError(f"GET {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def post_json(self, path, obj, timeout=60):
        status, data = self.request("POST", path, json.dumps(obj).encode(),
                                    {"Content-Type": "application/json"}, timeout=timeout)
        try:
            payload = json.loads(data) if data else {}
        except json.JSONDecodeError:
            payload = {"raw": data.decode(errors="replace")}
        return status, payload

    def upload_image(self, path: Path, name: str | None = None) -> str:
        boundary = uuid.uuid4().hex
        name = name or path.name
        parts = []
        for field, value in (("overwrite", "true"), ("type", "input")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                      f'Content-Type: application/octet-stream\r\n\r\n').encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        status, data = self.request("POST", "/upload/image", b"".join(parts),
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise RunnerError(f"uploading {path} failed: HTTP {status}: {data[:300]!r}")
        info = json.loads(data)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


class WebSocket:
    """Minimal RFC 6455 client for the host's /ws (text frames; binary previews are skipped)."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("websocket handshake: connection closed")
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise OSError("websocket handshake refused: " + head.split(b"\r\n", 1)[0].decode(errors="replace"))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self, timeout: float):
        """Next text message (str), or None on timeout. Raises ConnectionError when closed."""
        self.sock.settimeout(timeout)
        message, msg_op = b"", None
        try:
            while True:
                b0, b1 = self._read(2)
                fin, opcode = b0 & 0x80, b0 & 0x0F
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x8:
                    raise ConnectionError("websocket closed by host")
                if opcode == 0x9:
                    self._send(0xA, payload)
                    continue
                if opcode == 0xA:
                    continue
                if opcode in (0x1, 0x2):
                    msg_op, message = opcode, payload
                elif opcode == 0x0:
                    message += payload
                if fin:
                    if msg_op == 0x1:
                        return message.decode("utf-8", errors="replace")
                    message, msg_op = b"", None  # binary (previews): skip
        except socket.timeout:
            return None

    def close(self):
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# The host process
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def _installed_copy(custom_nodes_dirs: list[Path]) -> tuple[str | None, list[Path]]:
    """(folder name of this checkout if the host has it installed, other installed copies)."""
    this, others = None, []
    for d in custom_nodes_dirs:
        if not d.is_dir():
            continue
        for entry in d.iterdir():
            try:
                if entry.resolve() == PACK_ROOT:
                    this = entry.name
                    continue
                pyproject = entry / "pyproject.toml"
                if pyproject.is_file() and f'name = "{PACK_NAME}"' in pyproject.read_text(errors="replace"):
                    others.append(entry)
            except OSError:
                continue
    return this, others


class Host:
    """A ComfyUI process started for one run, in a temp folder of its own."""

    def __init__(self, comfyui: Path, python: str, cpu: bool = False, all_custom_nodes: bool = False,
                 model_dirs: dict | None = None, host_args: list[str] | None = None,
                 keep_temp: bool = False, startup_timeout: float = 300.0, verbose: bool = False):
        self.comfyui = comfyui
        self.python = python
        self.cpu = cpu
        self.all_custom_nodes = all_custom_nodes
        self.model_dirs = model_dirs or {}
        self.host_args = host_args or []
        self.keep_temp = keep_temp
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self.proc = None
        self.tmp = None
        self.log_path = None
        self.http = None
        self.port = None

    # -- set-up ----------------------------------------------------------------------------------
    def _cli_options(self) -> str:
        try:
            return (self.comfyui / "comfy" / "cli_args.py").read_text(errors="replace")
        except OSError:
            return ""

    def _prepare(self) -> list[str]:
        main_py = self.comfyui / "main.py"
        if not main_py.is_file():
            raise RunnerError(f"{self.comfyui} is not a ComfyUI folder (no main.py); pass --comfyui or set COMFYUI_PATH")
        self.tmp = Path(tempfile.mkdtemp(prefix="ipadapter-fused-run-"))
        for sub in ("custom_nodes", "input", "output", "user"):
            (self.tmp / sub).mkdir()
        self.log_path = self.tmp / "host.log"

        installed, others = _installed_copy([self.comfyui / "custom_nodes"])
        if installed:
            name = installed
            log(f"using the pack installed in the host: custom_nodes/{installed}")
        else:
            name = LINK_NAME
            if any(o.name == name for o in others):
                name = LINK_NAME + "-under-test"
            os.symlink(PACK_ROOT, self.tmp / "custom_nodes" / name, target_is_directory=True)
            if others and self.all_custom_nodes:
                log("warning: another copy of this pack is installed in the host and will load too: "
                    + ", ".join(str(o) for o in others))
        self.pack_folder_name = name

        lines = ["ipadapter_fused_runner:", f"    base_path: {_yaml_str(self.tmp)}",
                 f"    custom_nodes: {_yaml_str(self.tmp / 'custom_nodes')}"]
        for folder, path in self.model_dirs.items():
            lines.append(f"    {folder}: {_yaml_str(path)}")
        yaml_path = self.tmp / "extra_model_paths.yaml"
        yaml_path.write_text("\n".join(lines) + "\n")

        self.port = free_port()
        opts = self._cli_options()
        args = ["--listen", "127.0.0.1", "--port", str(self.port),
                "--extra-model-paths-config", str(yaml_path),
                "--output-directory", str(self.tmp / "output"),
                "--input-directory", str(self.tmp / "input"),
                "--temp-directory", str(self.tmp)]
        if '"--user-directory"' in opts:
            args += ["--user-directory", str(self.tmp / "user")]
        if '"--database-url"' in opts:
            args += ["--database-url", "sqlite:///:memory:"]
        if not self.all_custom_nodes:
            args += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", name]
            if '"--disable-api-nodes"' in opts:
                args += ["--disable-api-nodes"]
        if self.cpu:
            args.append("--cpu")
        args += self.host_args
        return [self.python, str(Path(__file__).resolve()), "--_boot-host", str(main_py)] + args

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        cmd = self._prepare()
        if self.verbose:
            log("host command: " + " ".join(cmd))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfyui), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.http = HostHTTP("127.0.0.1", self.port)
        log(f"starting ComfyUI from {self.comfyui} on 127.0.0.1:{self.port} (log: {self.log_path})")
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RunnerError(f"ComfyUI exited during start-up (exit code {self.proc.returncode}).\n"
                                  + self.log_tail())
            if time.time() - t0 > self.startup_timeout:
                raise RunnerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s.\n" + self.log_tail())
            try:
                status, _ = self.http.request("GET", "/system_stats", timeout=2)
                if status == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        log(f"ComfyUI is up after {time.time() - t0:.1f} s")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().rstrip().splitlines()
        return "---- host log (last %d lines) ----\n%s\n---- end of host log ----" % (
            min(lines, len(text)), "\n".join(text[-lines:]))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            except ProcessLookupError:
                pass
        if getattr(self, "_log_file", None):
            self._log_file.close()
        if self.tmp is not None:
            if self.keep_temp:
                log(f"kept the temp folder: {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------
def format_node_errors(payload: dict, prompt: dict) -> str:
    out = []
    err = payload.get("error")
    if isinstance(err, dict):
        out.append(f"{err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        out.append(str(err))
    for nid, info in (payload.get("node_errors") or {}).items():
        ctype = info.get("class_type") or prompt.get(nid, {}).get("class_type", "?")
        for e in info.get("errors", []):
            detail = e.get("details") or ""
            extra = e.get("extra_info") or {}
            name = extra.get("input_name")
            out.append(f"  node #{nid} {ctype}: {e.get('message', '')}"
                       + (f" [{name}]" if name else "") + (f": {detail}" if detail else ""))
    return "\n".join(out) or json.dumps(payload)[:2000]


def upload_images(host: Host, prompt: dict, images: list[str]) -> None:
    """Give each LoadImage node its picture: --image [NODE=]PATH, else the file the workflow names,
    looked up in the host's usual input folder (copied to the run's own input folder)."""
    load_nodes = [nid for nid, n in prompt.items() if n["class_type"] in ("LoadImage", "LoadImageMask")]
    explicit = {}
    default_path = None
    for item in images or []:
        ref, sep, path = item.partition("=")
        if sep and not Path(item).exists():
            for nid in find_nodes(prompt, ref) or [ref]:
                explicit[nid] = Path(path)
        else:
            default_path = Path(item)
    for nid in load_nodes:
        path = explicit.get(nid) or default_path
        if path is None:
            name = str(prompt[nid]["inputs"].get("image") or "")
            for tag in (" [input]", " [output]", " [temp]"):
                name = name[: -len(tag)] if name.endswith(tag) else name
            candidates = [host.comfyui / "input" / name] if name else []
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise RunnerError(f"LoadImage node #{nid} wants {name!r}, which is not in {host.comfyui / 'input'}; "
                                  f"pass --image PATH (or --image {nid}=PATH)")
        if not path.is_file():
            raise RunnerError(f"--image: no such file: {path}")
        prompt[nid]["inputs"]["image"] = host.http.upload_image(path)


def run_prompt(host: Host, prompt: dict, out_dir: Path, timeout: float = 3600.0) -> list[Path]:
    """Queue the prompt, print progress until it ends, download its images. Returns their paths."""
    client_id = uuid.uuid4().hex
    ws = None
    try:
        ws = WebSocket("127.0.0.1", host.port, f"/ws?clientId={client_id}")
    except OSError as exc:
        log(f"(no websocket: {exc}; polling the history instead)")
    status, payload = host.http.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
    if status != 200 or payload.get("error"):
        if ws:
            ws.close()
        raise RunnerError("the host rejected the prompt:\n" + format_node_errors(payload, prompt), code=2)
    prompt_id = payload["prompt_id"]
    log(f"queued prompt {prompt_id} ({len(prompt)} nodes)")

    def title(nid):
        n = prompt.get(str(nid), {})
        return f"#{nid} {n.get('_meta', {}).get('title') or n.get('class_type', '?')}"

    t0 = time.time()
    done = False
    error = None
    last_progress = None
    while not done:
        if time.time() - t0 > timeout:
            raise RunnerError(f"the prompt did not finish within {timeout:.0f} s")
        if not host.alive():
            raise RunnerError("ComfyUI exited while running the prompt.\n" + host.log_tail())
        if ws is not None:
            try:
                text = ws.recv(timeout=1.0)
            except (ConnectionError, OSError) as exc:
                log(f"(websocket lost: {exc}; polling the history instead)")
                ws = None
                continue
            if text is None:
                continue
            try:
                msg = json.loads(text)
            except json.JSONDecodeError:
                continue
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_start":
                log("execution started")
            elif kind == "execution_cached" and data.get("nodes"):
                log("cached: " + ", ".join(title(n) for n in data["nodes"]))
            elif kind == "executing":
                if data.get("node") is None:
                    done = True
                else:
                    log(f"[{time.time() - t0:6.1f}s] running {title(data['node'])}")
            elif kind == "progress":
                cur = (data.get("node"), data.get("value"), data.get("max"))
                if cur != last_progress:
                    last_progress = cur
                    log(f"[{time.time() - t0:6.1f}s]   {title(data.get('node'))}: {data.get('value')}/{data.get('max')}")
            elif kind == "execution_error":
                error = data
                done = True
            elif kind == "execution_interrupted":
                error = {"exception_message": "interrupted", "node_id": data.get("node_id")}
                done = True
            elif kind == "execution_success":
                done = True
        else:
            time.sleep(1.0)
            hist = host.http.get_json(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                st = entry.get("status") or {}
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    done = True
                    if st.get("status_str") == "error":
                        for m in st.get("messages", []):
                            if m and m[0] == "execution_error":
                                error = m[1]
                        error = error or {"exception_message": "execution failed"}
    if ws is not None:
        ws.close()

    # the history entry is written right after the last message; wait for it
    entry = None
    for _ in range(100):
        hist = host.http.get_json(f"/history/{prompt_id}")
        if prompt_id in hist:
            entry = hist[prompt_id]
            break
        time.sleep(0.1)
    if error is None and entry is not None and (entry.get("status") or {}).get("status_str") == "error":
        for m in entry["status"].get("messages", []):
            if m and m[0] == "execution_error":
                error = m[1]
        error = error or {"exception_message": "execution failed"}
    if error is not None:
        tb = "".join(error.get("traceback") or [])
        raise RunnerError(f"the prompt failed in node {title(error.get('node_id', '?'))} "
                          f"({error.get('exception_type', '')}): {error.get('exception_message', '')}\n{tb}".rstrip(),
                          code=3)
    log(f"finished in {time.time() - t0:.1f} s")
    if entry is None:
        raise RunnerError("the host has no history for the prompt")

    out_dir.mkdir(parents=True, exist_ok=True)
    images = [(nid, img) for nid, outputs in (entry.get("outputs") or {}).items()
              for img in outputs.get("images") or []]
    # saved pictures; previews (type "temp") only when nothing was saved
    wanted = [x for x in images if x[1].get("type", "output") == "output"] or images
    saved = []
    for nid, img in wanted:
        query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                        "type": img.get("type", "output")})
        status, data = host.http.request("GET", f"/view?{query}")
        if status != 200:
            raise RunnerError(f"could not download {img['filename']}: HTTP {status}")
        dest = out_dir / img["filename"]
        k = 1
        while dest.exists():
            dest = out_dir / f"{Path(img['filename']).stem}_{k}{Path(img['filename']).suffix}"
            k += 1
        dest.write_bytes(data)
        saved.append(dest)
        log(f"saved {dest}  (from {title(nid)})")
    return saved


# --------------------------------------------------------------------------------------------------
# Selfcheck: tiny random-weight models with the real layouts
# --------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ipadapter_fused"


def _import_pack_module(name: str):
    """Import a submodule of this pack (e.g. 'models.synthetic') without running the pack's __init__
    (which imports the node classes)."""
    pkg = "ipadapter_fused_tools_pkg"
    if pkg not in sys.modules:
        module = types.ModuleType(pkg)
        module.__path__ = [str(PACK_ROOT)]
        module.__package__ = pkg
        sys.modules[pkg] = module
    return importlib.import_module(f"{pkg}.{name}")


def _gen(shape, fan_in, gen, scale=1.0):
    import torch
    return torch.randn(*shape, generator=gen) * (scale / max(1, fan_in) ** 0.5)


def sd15_unet_state(model_channels=320, channel_mult=(1, 1, 1, 1), num_res_blocks=2, attn_levels=(0, 1, 2),
                    context_dim=768, in_channels=4, seed=0, prefix="model.diffusion_model."):
    """An LDM-layout UNet state dict (SD1.x key names; 1x1-conv proj_in/out; GEGLU feed-forward).

    The host takes the structure from the keys: model_channels from input_blocks.0.0, the channel
    multipliers from each ResBlock's out_layers.3, the attention depth from transformer_blocks.N, and
    picks SD1.5 by context_dim 768 + model_channels 320 + conv proj_in + no label_emb."""
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = {}
    C = model_channels
    T = 4 * C

    def lin(name, out_f, in_f, bias=True, scale=1.0):
        sd[prefix + name + ".weight"] = _gen((out_f, in_f), in_f, g, scale)
        if bias:
            sd[prefix + name + ".bias"] = torch.zeros(out_f)

    def conv(name, out_c, in_c, k, bias=True, scale=1.0):
        sd[prefix + name + ".weight"] = _gen((out_c, in_c, k, k), in_c * k * k, g, scale)
        if bias:
            sd[prefix + name + ".bias"] = torch.zeros(out_c)

    def norm(name, c):
        sd[prefix + name + ".weight"] = torch.ones(c)
        sd[prefix + name + ".bias"] = torch.zeros(c)

    def resblock(name, cin, cout):
        norm(f"{name}.in_layers.0", cin)
        conv(f"{name}.in_layers.2", cout, cin, 3)
        lin(f"{name}.emb_layers.1", cout, T)
        norm(f"{name}.out_layers.0", cout)
        conv(f"{name}.out_layers.3", cout, cout, 3, scale=0.5)
        if cin != cout:
            conv(f"{name}.skip_connection", cout, cin, 1)

    def transformer(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.proj_in", c, c, 1)
        b = f"{name}.transformer_blocks.0"
        for attn, kv_dim in (("attn1", c), ("attn2", context_dim)):
            lin(f"{b}.{attn}.to_q", c, c, bias=False)
            lin(f"{b}.{attn}.to_k", c, kv_dim, bias=False)
            lin(f"{b}.{attn}.to_v", c, kv_dim, bias=False)
            lin(f"{b}.{attn}.to_out.0", c, c)
        lin(f"{b}.ff.net.0.proj", 8 * c, c)
        lin(f"{b}.ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{b}.{n}", c)
        conv(f"{name}.proj_out", c, c, 1, scale=0.5)

    lin("time_embed.0", T, C)
    lin("time_embed.2", T, T)
    conv("input_blocks.0.0", C, in_channels, 3)
    skips = [C]
    ch = C
    idx = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out_c = C * mult
            resblock(f"input_blocks.{idx}.0", ch, out_c)
            ch = out_c
            if level in attn_levels:
                transformer(f"input_blocks.{idx}.1", ch)
            skips.append(ch)
            idx += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level in reversed(range(len(channel_mult))):
        mult = channel_mult[level]
        for i in range(num_res_blocks + 1):
            skip = skips.pop()
            out_c = C * mult
            resblock(f"output_blocks.{idx}.0", ch + skip, out_c)
            ch = out_c
            sub = 1
            if level in attn_levels:
                transformer(f"output_blocks.{idx}.1", ch)
                sub = 2
            if level != 0 and i == num_res_blocks:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    norm("out.0", ch)
    conv("out.2", 4, ch, 3, scale=0.5)
    return sd


def clip_text_state(prefix="cond_stage_model.transformer.text_model.", width=768, layers=12, heads=12,
                    intermediate=3072, vocab=49408, positions=77, seed=1):
    """HF-layout CLIP text encoder (the host's SD1 text encoder config is fixed: ViT-L/14 text tower)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = {prefix + "embeddings.token_embedding.weight": torch.randn(vocab, width, generator=g) * 0.02,
          prefix + "embeddings.position_embedding.weight": torch.randn(positions, width, generator=g) * 0.01}
    _encoder_layers(sd, prefix, layers, width, intermediate, g)
    sd[prefix + "final_layer_norm.weight"] = torch.ones(width)
    sd[prefix + "final_layer_norm.bias"] = torch.zeros(width)
    return sd


def _encoder_layers(sd, prefix, layers, width, intermediate, g):
    """The HF CLIP encoder layers shared by the text and the vision tower."""
    import torch
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{n}.weight"] = _gen((width, width), width, g)
            sd[p + f"self_attn.{n}.bias"] = torch.zeros(width)
        sd[p + "mlp.fc1.weight"] = _gen((intermediate, width), width, g)
        sd[p + "mlp.fc1.bias"] = torch.zeros(intermediate)
        sd[p + "mlp.fc2.weight"] = _gen((width, intermediate), intermediate, g, 0.5)
        sd[p + "mlp.fc2.bias"] = torch.zeros(width)
        for n in ("layer_norm1", "layer_norm2"):
            sd[p + n + ".weight"] = torch.ones(width)
            sd[p + n + ".bias"] = torch.zeros(width)


def clip_vision_state(width=1024, layers=24, intermediate=4096, patch=14, image_size=224, projection=768, seed=2):
    """HF-layout CLIP vision tower. The host picks its config by keys: 23+ layers and 257 positions
    select ViT-L/14 (width 1024, 24 layers, projection 768), the smallest it accepts."""
    import torch
    g = torch.Generator().manual_seed(seed)
    p = "vision_model."
    positions = (image_size // patch) ** 2 + 1
    sd = {p + "embeddings.class_embedding": torch.randn(width, generator=g) * 0.02,
          p + "embeddings.patch_embedding.weight": _gen((width, 3, patch, patch), 3 * patch * patch, g),
          p + "embeddings.position_embedding.weight": torch.randn(positions, width, generator=g) * 0.02}
    for n in ("pre_layrnorm", "post_layernorm"):
        sd[p + n + ".weight"] = torch.ones(width)
        sd[p + n + ".bias"] = torch.zeros(width)
    _encoder_layers(sd, p, layers, width, intermediate, g)
    sd["visual_projection.weight"] = _gen((projection, width), width, g)
    return sd


def taesd_state(latent_channels=4, seed=3):
    """Tiny AutoEncoder (TAESD) layout: taesd_encoder.* / taesd_decoder.* Sequential indices."""
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, out_c, in_c, k=3, bias=True, scale=1.0):
        sd[name + ".weight"] = _gen((out_c, in_c, k, k), in_c * k * k, g, scale)
        if bias:
            sd[name + ".bias"] = torch.zeros(out_c)

    def block(name):
        for j in (0, 2, 4):
            conv(f"{name}.conv.{j}", 64, 64, scale=1.0 if j < 4 else 0.5)

    e = "taesd_encoder"
    conv(f"{e}.0", 64, 3)
    block(f"{e}.1")
    for start in (2, 6, 10):
        conv(f"{e}.{start}", 64, 64, bias=False)
        for k in range(1, 4):
            block(f"{e}.{start + k}")
    conv(f"{e}.14", latent_channels, 64)
    d = "taesd_decoder"
    conv(f"{d}.1", 64, latent_channels)
    for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):
        block(f"{d}.{i}")
    for i in (7, 12, 17):
        conv(f"{d}.{i}", 64, 64, bias=False)
    conv(f"{d}.19", 3, 64, scale=0.3)
    sd[f"{d}.19.bias"] = torch.full((3,), 0.5)
    sd["vae_scale"] = torch.tensor(0.18215)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def _save(sd: dict, path: Path, dtype="float16") -> None:
    import torch
    from safetensors.torch import save_file
    dt = getattr(torch, dtype)
    out = {k: (v.to(dt) if v.is_floating_point() and v.dim() > 0 else v.float()).contiguous() for k, v in sd.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    save_file(out, str(tmp), metadata={"generated_by": "ipadapter-fused selfcheck (random weights)"})
    os.replace(tmp, path)


def make_adapter(path: Path, layer_dims, context_dim: int, encoder_width: int, layout: str = "base") -> None:
    """IP-Adapter with random weights in the public key layout, made by the pack's models/synthetic."""
    import inspect
    try:
        synthetic = _import_pack_module("models.synthetic")
    except ImportError as exc:
        raise RunnerError(f"the pack's models/synthetic.py is not importable ({exc}); it makes the selfcheck adapter")
    kwargs = dict(layout=layout, layer_dims=list(layer_dims), context_dim=context_dim, encoder_width=encoder_width)
    save = getattr(synthetic, "save_synthetic_adapter", None)
    if save is not None:
        params = inspect.signature(save).parameters
        if all(k in params for k in kwargs) or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            save(str(path), **kwargs)
            return
    state = synthetic.synthetic_adapter_state(**kwargs)
    if all(isinstance(v, dict) for v in state.values()):  # grouped {group: {key: tensor}}
        state = {f"{group}.{k}": v for group, tensors in state.items() for k, v in tensors.items()}
    _save(state, path)


def make_selfcheck_models(cache_dir: Path, work_dir: Path) -> dict:
    """Host models (cached, keyed by SELFCHECK_MODELS_VERSION) and a fresh adapter + input image.
    Returns {folder name: path} for extra_model_paths.yaml, plus 'input_image'."""
    import torch
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root = cache_dir / f"selfcheck-models-v{SELFCHECK_MODELS_VERSION}"
    dirs = {"checkpoints": root / "checkpoints", "clip_vision": root / "clip_vision"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = dirs["checkpoints"] / SC_CHECKPOINT
    if not ckpt.exists():
        log(f"making {ckpt} (SD1.5-layout UNet with 320 channels at every level, CLIP-L text encoder, "
            "TAESD as its VAE) ...")
        sd = sd15_unet_state()
        sd.update(clip_text_state())
        sd.update({"first_stage_model." + k: v for k, v in taesd_state().items()})
        _save(sd, ckpt)
        del sd
    cv = dirs["clip_vision"] / SC_CLIP_VISION
    if not cv.exists():
        log(f"making {cv} (CLIP ViT-L/14 vision layout) ...")
        _save(clip_vision_state(), cv)
    if time.time() - t0 > 1:
        log(f"host models ready in {time.time() - t0:.1f} s (cached in {root})")

    adapter_dir = work_dir / "ipadapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    # SD1.5 attn2 sites of the selfcheck UNet: 16 layers, all 320 wide (channel_mult 1,1,1,1);
    # ViT-L/14 image_embeds are 768 wide.
    make_adapter(adapter_dir / SC_ADAPTER, [320] * 16, 768, 768, "base")

    from PIL import Image
    import numpy as np
    yy, xx = np.mgrid[0:96, 0:96]
    img = np.stack([xx * 2.6, yy * 2.6, (xx + yy) * 1.3], -1)
    img[32:64, 32:64] = [250, 40, 40]
    image_path = work_dir / SC_IMAGE
    Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(image_path)
    return {**{k: str(v) for k, v in dirs.items()}, "ipadapter": str(adapter_dir), "input_image": str(image_path)}


def image_stats(paths: list[str]) -> list[dict]:
    from PIL import Image
    import numpy as np
    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
        out.append({"path": p, "shape": list(a.shape), "min": float(a.min()), "max": float(a.max()),
                    "std": float(a.std()), "sha1": hashlib.sha1(a.tobytes()).hexdigest()})
    return out


def _helper(python: str, *args: str) -> dict:
    """Run this file in the host's Python for the heavy helpers; returns its JSON answer."""
    proc = subprocess.run([python, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RunnerError(f"helper {args[0]} failed (exit {proc.returncode}) in {python}")
    last = proc.stdout.strip().splitlines()[-1]
    for line in proc.stdout.strip().splitlines()[:-1]:
        log(line)
    return json.loads(last)


MISSING_WEIGHT_MARKERS = ("unet missing", "unet unexpected", "clip missing", "missing clip vision",
                          "Missing VAE keys", "No VAE weights", "Could not detect model type",
                          "Warning, This is not a checkpoint file")


def run_selfcheck(args) -> int:
    t_start = time.time()
    comfyui = _comfyui_dir(args)
    work = Path(tempfile.mkdtemp(prefix="ipadapter-fused-selfcheck-"))
    try:
        made = _helper(args.python, "--_make-selfcheck-models", str(args.cache_dir), str(work))
        image = made.pop("input_image")
        workflow = load_workflow(args.workflow or SELFCHECK_WORKFLOW)
        out_dir = Path(args.out) if args.out else work / "out"
        with Host(comfyui, args.python, cpu=args.cpu, all_custom_nodes=args.all_custom_nodes, model_dirs=made,
                  host_args=args.host_arg, keep_temp=args.keep_temp, startup_timeout=args.startup_timeout,
                  verbose=args.verbose) as host:
            host.start()
            object_info = host.http.get_json("/object_info", timeout=120)
            if PROBE_NODE not in object_info:
                raise RunnerError(f"the pack did not load in the host ({PROBE_NODE} missing).\n" + host.log_tail())
            prompt = workflow_to_prompt(workflow, object_info)
            apply_overrides(prompt, args.set)
            upload_images(host, prompt, [image])
            saved = run_prompt(host, prompt, out_dir, timeout=args.timeout)
            problems = [line.strip() for line in host.log_text().splitlines()
                        if any(m in line for m in MISSING_WEIGHT_MARKERS)]
        ip = [str(p) for p in saved if p.name.startswith(SC_PREFIX_IP)]
        plain = [str(p) for p in saved if p.name.startswith(SC_PREFIX_PLAIN)]
        failures = []
        if problems:
            failures.append("the host reported missing/unexpected weights:\n  " + "\n  ".join(problems[:10]))
        if len(ip) != 1 or len(plain) != 1:
            failures.append(f"expected one picture with and one without the image prompt, got {saved}")
        else:
            stats = _helper(args.python, "--_image-stats", ip[0], plain[0])
            for s in stats:
                log(f"  {Path(s['path']).name}: {s['shape']} min {s['min']:.0f} max {s['max']:.0f} std {s['std']:.2f}")
            if stats[0]["max"] == stats[0]["min"]:
                failures.append("the picture made with the image prompt is constant")
            if stats[0]["sha1"] == stats[1]["sha1"]:
                failures.append("the image prompt did not change the picture: the patch was not applied")
        if failures:
            log("SELFCHECK FAILED:\n- " + "\n- ".join(failures))
            return 1
        log(f"SELFCHECK PASSED in {time.time() - t_start:.1f} s: the pack loads, patches and samples in ComfyUI.")
        return 0
    finally:
        if args.keep_temp:
            log(f"kept the selfcheck folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _comfyui_dir(args) -> Path:
    if not args.comfyui:
        raise RunnerError("where is ComfyUI? pass --comfyui DIR or set COMFYUI_PATH")
    return Path(args.comfyui).expanduser().resolve()


def run_workflow(args) -> int:
    comfyui = _comfyui_dir(args)
    workflow = load_workflow(args.workflow)
    out_dir = Path(args.out or "ipadapter_fused_outputs")
    with Host(comfyui, args.python, cpu=args.cpu, all_custom_nodes=args.all_custom_nodes,
              host_args=args.host_arg, keep_temp=args.keep_temp, startup_timeout=args.startup_timeout,
              verbose=args.verbose) as host:
        host.start()
        object_info = host.http.get_json("/object_info", timeout=120)
        if PROBE_NODE not in object_info:
            log(f"warning: the pack's nodes are not in the host ({PROBE_NODE} missing):\n" + host.log_tail(30))
        prompt = workflow_to_prompt(workflow, object_info)
        apply_overrides(prompt, args.set)
        upload_images(host, prompt, args.image)
        if args.dump_prompt:
            Path(args.dump_prompt).write_text(json.dumps(prompt, indent=2))
            log(f"wrote the API prompt to {args.dump_prompt}")
        saved = run_prompt(host, prompt, out_dir, timeout=args.timeout)
    if not saved:
        log("the workflow produced no images")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 ok, 1 error/selfcheck failed, 2 prompt rejected, 3 execution error.")
    p.add_argument("workflow", nargs="?", help="workflow .json (front-end or API format), e.g. workflows/sd15_basic.json")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (default: $COMFYUI_PATH)")
    p.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI (default: this one)")
    p.add_argument("--cpu", action="store_true", help="pass --cpu to ComfyUI")
    p.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                   help="picture for the LoadImage nodes (all, or NODE = id/title); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input of the API prompt (NODE = id, title or class type; VALUE = JSON or text)")
    p.add_argument("--out", help="folder for the output pictures (default: ./ipadapter_fused_outputs)")
    p.add_argument("--selfcheck", action="store_true", help="make tiny random models and run workflows/selfcheck_sd15.json")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="cache for the selfcheck models")
    p.add_argument("--all-custom-nodes", action="store_true", help="load all the host's custom nodes, not only this pack")
    p.add_argument("--host-arg", action="append", default=[], metavar="ARG", help="extra argument for ComfyUI's main.py")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for the prompt")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds allowed for ComfyUI to start")
    p.add_argument("--dump-prompt", metavar="PATH", help="write the converted API prompt here")
    p.add_argument("--convert-only", action="store_true",
                   help="only convert: needs --object-info FILE (a saved /object_info); prints the API prompt")
    p.add_argument("--object-info", help="saved /object_info JSON, for --convert-only")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp folders (host log, yaml, outputs)")
    p.add_argument("--install-torchvision-fix", action="store_true",
                   help="install the torchvision import hook as a .pth into this Python's site-packages and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # internal entry points (run in the host's Python)
    if argv[:1] == ["--_boot-host"]:
        boot_host(argv[1], argv[2:])
        return 0
    if argv[:1] == ["--_make-selfcheck-models"]:
        print(json.dumps(make_selfcheck_models(Path(argv[1]), Path(argv[2]))), flush=True)
        return 0
    if argv[:1] == ["--_image-stats"]:
        print(json.dumps(image_stats(argv[1:])), flush=True)
        return 0

    args = build_parser().parse_args(argv)
    try:
        if args.install_torchvision_fix:
            for f in write_torchvision_fix_pth():
                log(f"wrote {f}")
            return 0
        if args.convert_only:
            if not (args.workflow and args.object_info):
                raise RunnerError("--convert-only needs a workflow and --object-info FILE")
            with open(args.object_info, encoding="utf-8") as f:
                object_info = json.load(f)
            prompt = workflow_to_prompt(load_workflow(args.workflow), object_info)
            apply_overrides(prompt, args.set)
            print(json.dumps(prompt, indent=2))
            return 0
        if args.selfcheck:
            return run_selfcheck(args)
        if not args.workflow:
            build_parser().print_usage()
            raise RunnerError("give a workflow file, or --selfcheck")
        return run_workflow(args)
    except RunnerError as exc:
        log(f"error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
