"""The runner's command line: run a workflow headless, the selfcheck, or only convert.

Every mistake in the runner's own arguments that can be found from the workflow file is reported
before ComfyUI starts (unknown node in --set / --image, missing picture files, image loaders left
without a picture); input names of --set are checked against the host's declarations right after
/object_info, before anything is uploaded or queued."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import convert, tiny_models
from .errors import RunnerError, UsageError, log
from .run import download_images, run_prompt
from .server import PROBE_NODE, ComfyServer

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
# Kept beside the runner, out of workflows/ (the host lists that folder in its template browser,
# and the selfcheck only runs through the runner, on the tiny models it makes).
SELFCHECK_WORKFLOW = Path(__file__).resolve().parent / "selfcheck_sd15.json"
MISSING_WEIGHT_MARKERS = ("unet missing", "unet unexpected", "clip missing", "missing clip vision",
                          "Missing VAE keys", "No VAE weights", "Could not detect model type",
                          "Warning, This is not a checkpoint file")

DESCRIPTION = """Run a ComfyUI workflow headless, with this pack loaded, and fetch its images.

    python tools/run_workflow.py --comfyui /path/to/ComfyUI workflows/sd15_basic.json --image me.png --cpu
    python tools/run_workflow.py --comfyui /path/to/ComfyUI --selfcheck --cpu

ComfyUI runs from its own folder with a temp --base-directory (its models/ linked in), so the install
is not written to; only this pack is loaded unless --all-custom-nodes. Run it with ComfyUI's Python.
"""


def _comfyui_dir(args) -> Path:
    if not args.comfyui:
        raise UsageError("where is ComfyUI? pass --comfyui DIR or set COMFYUI_PATH")
    path = Path(args.comfyui).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise UsageError(f"{path} is not a ComfyUI folder (no main.py); pass --comfyui or set COMFYUI_PATH")
    return path


def prepare(workflow: dict, args, comfyui: Path) -> dict:
    """Every check that needs no host; returns the picture plan {LoadImage node id: file}."""
    nodes = convert.sent_nodes(workflow)
    convert.check_override_nodes(nodes, args.set)
    images = convert.plan_images(nodes, args.image, comfyui / "input" if args.example_image else None)
    convert.check_pictures(nodes, images)
    return images


def to_prompt(workflow: dict, object_info: dict, args) -> dict:
    prompt = convert.workflow_to_prompt(workflow, object_info)
    convert.apply_overrides(prompt, args.set, object_info)
    return prompt


def _server(args, comfyui: Path, **kw) -> ComfyServer:
    return ComfyServer(comfyui, python=args.python, cpu=args.cpu, all_custom_nodes=args.all_custom_nodes,
                       host_args=args.host_arg, keep_temp=args.keep_temp, startup_timeout=args.startup_timeout,
                       verbose=args.verbose, **kw)


def _run(server: ComfyServer, prompt: dict, images: dict, args, out_dir: Path) -> list[Path]:
    for nid, path in images.items():
        prompt[nid]["inputs"]["image"] = server.client.upload_image(path)
    if args.dump_prompt:
        Path(args.dump_prompt).write_text(json.dumps(prompt, indent=2))
        log(f"wrote the API prompt to {args.dump_prompt}")
    result = run_prompt(server.client, prompt, timeout=args.timeout, progress=log, alive=server.alive)
    if result.status != "success" and args.verbose:
        log("".join((result.error or {}).get("traceback") or []).rstrip())
    result.raise_for_error()
    log(f"finished in {result.seconds:.1f} s")
    return download_images(server.client, result, out_dir)


def run_workflow(args) -> int:
    comfyui = _comfyui_dir(args)
    workflow = convert.load_workflow(args.workflow)
    images = prepare(workflow, args, comfyui)
    out_dir = Path(args.out or "ipadapter_fused_outputs")
    with _server(args, comfyui, host_models=True) as server:
        server.start()
        object_info = server.client.object_info()
        if PROBE_NODE not in object_info:
            log(f"warning: the pack's nodes are not in the host ({PROBE_NODE} missing):\n" + server.log_tail(30))
        prompt = to_prompt(workflow, object_info, args)
        saved = _run(server, prompt, images, args, out_dir)
    if not saved:
        log("the workflow produced no images")
    return 0


def run_selfcheck(args) -> int:
    t_start = time.time()
    comfyui = _comfyui_dir(args)
    work = Path(tempfile.mkdtemp(prefix="ipadapter-fused-selfcheck-"))
    try:
        workflow = convert.load_workflow(args.workflow or SELFCHECK_WORKFLOW)
        image = tiny_models.make_input_image(work / tiny_models.SC_IMAGE)
        args.image = [str(image)]
        images = prepare(workflow, args, comfyui)
        models = tiny_models.host_models(work, args.cache_dir)
        out_dir = Path(args.out) if args.out else work / "out"
        with _server(args, comfyui, models=models) as server:
            server.start()
            object_info = server.client.object_info()
            if PROBE_NODE not in object_info:
                raise RunnerError(f"the pack did not load in the host ({PROBE_NODE} missing).\n" + server.log_tail())
            prompt = to_prompt(workflow, object_info, args)
            saved = _run(server, prompt, images, args, out_dir)
            problems = [line.strip() for line in server.log_text().splitlines()
                        if any(m in line for m in MISSING_WEIGHT_MARKERS)]
        ip = [p for p in saved if p.name.startswith(tiny_models.SC_PREFIX_IP)]
        plain = [p for p in saved if p.name.startswith(tiny_models.SC_PREFIX_PLAIN)]
        failures = []
        if problems:
            failures.append("the host reported missing/unexpected weights:\n  " + "\n  ".join(problems[:10]))
        if len(ip) != 1 or len(plain) != 1:
            failures.append(f"expected one picture with and one without the image prompt, got {saved}")
        else:
            stats = tiny_models.image_stats([ip[0], plain[0]])
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


def convert_only(args) -> int:
    if not (args.workflow and args.object_info):
        raise UsageError("--convert-only needs a workflow and --object-info FILE")
    workflow = convert.load_workflow(args.workflow)
    convert.check_override_nodes(convert.sent_nodes(workflow), args.set)
    with open(args.object_info, encoding="utf-8") as f:
        object_info = json.load(f)
    print(json.dumps(to_prompt(workflow, object_info, args), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 ok, 1 error/selfcheck failed, 2 prompt rejected, 3 a node failed.")
    p.add_argument("workflow", nargs="?", help="workflow .json (front-end or API format), e.g. workflows/sd15_basic.json")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (default: $COMFYUI_PATH)")
    p.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI (default: this one)")
    p.add_argument("--cpu", action="store_true", help="pass --cpu to ComfyUI")
    p.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                   help="picture for the LoadImage nodes (all, or NODE = id/title); repeatable. Every LoadImage "
                        "node needs one, unless --example-image")
    p.add_argument("--example-image", action="store_true",
                   help="LoadImage nodes without --image load the file their workflow names (e.g. example.png) "
                        "from ComfyUI's input folder")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input (NODE = id, title or class type; VALUE = JSON or text); "
                        "the node must exist and declare the input")
    p.add_argument("--out", help="folder for the output pictures (default: ./ipadapter_fused_outputs)")
    p.add_argument("--selfcheck", action="store_true", help="make tiny random models and run tools/ipaf_runner/selfcheck_sd15.json")
    p.add_argument("--cache-dir", type=Path, default=tiny_models.default_cache_dir(),
                   help="cache for the selfcheck models")
    p.add_argument("--all-custom-nodes", action="store_true", help="load all the host's custom nodes, not only this pack")
    p.add_argument("--host-arg", action="append", default=[], metavar="ARG", help="extra argument for ComfyUI's main.py")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for the prompt")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds allowed for ComfyUI to start")
    p.add_argument("--dump-prompt", metavar="PATH", help="write the converted API prompt here")
    p.add_argument("--convert-only", action="store_true",
                   help="only convert: needs --object-info FILE (a saved /object_info); prints the API prompt")
    p.add_argument("--object-info", help="saved /object_info JSON, for --convert-only")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp folders (host log, outputs)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the host command and a failing node's traceback")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.convert_only:
            return convert_only(args)
        if args.selfcheck:
            return run_selfcheck(args)
        if not args.workflow:
            build_parser().print_usage()
            raise UsageError("give a workflow file, or --selfcheck")
        return run_workflow(args)
    except RunnerError as exc:
        log(f"error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        return 130
