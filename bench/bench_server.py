"""What a user of the server sees: sampling time with no adapter, with this pack and with
ComfyUI_IPAdapter_plus, measured through a real ComfyUI server (loopback HTTP + WebSocket).

    python bench/bench_server.py                       # full-size SD1.5, latent 32, 6 steps, base + plus
    python bench/bench_server.py --threads 1 --rounds 5 --note "2 shared cores"

Set-up: the host's SD1.5 structure at full size (model_channels 320, channel_mult 1,2,4,4, random
weights) saved as a checkpoint with a random CLIP-L text encoder and a TAESD-layout VAE; a
random CLIP ViT-L/14 vision tower (the smallest layout the host's CLIPVisionLoader accepts);
random base and Plus adapters shaped for that UNet and encoder (the pack's models/synthetic.py).
Both packs load the same adapter files. Files are made once and cached (--cache-dir).

One server runs with `--cache-lru N`, this pack and ComfyUI_IPAdapter_plus in its custom_nodes. A
warm-up pass runs every graph once (1 step). Then each round runs every variant once, in an order that
rotates from round to round, with a new seed per run: only KSampler (and the latent's SaveLatent)
re-execute, every other node comes from the cache. A variant's time is KSampler's execution time,
taken from the WebSocket messages (`executing` KSampler -> `executing` next node); the per-step
time from its `progress` messages. The ratio to no adapter is taken within each round (variants
of one round ran back to back) and its median over the rounds is reported, with the spread.

The apply node's time is measured apart: a graph that ends in the apply node (PreviewAny
consumes the model), re-executed each round by a changed weight. It includes encoding the
reference image with the CLIP vision model (both packs do that inside the apply node).

Prints a table and writes JSON (default bench/results/server_cpu_sd15.json)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

BENCH_MODELS_VERSION = 1
SD15_CHANNEL_MULT = (1, 2, 4, 4)
CONTEXT_DIM = 768
IPAPLUS_LINK = "ComfyUI_IPAdapter_plus"
REFERENCE_SIZE = 224          # the reference image; both packs resize to 224 anyway
LAYOUTS = ("base", "plus")
VARIANT_LABELS = {"none": "no adapter", "fused": "IPAdapter Fused", "ipaplus": "ComfyUI_IPAdapter_plus"}


def default_host(env: str, sibling: str) -> Path | None:
    """$env, else the host snapshot beside the checkout (../shared/host/<sibling>) when it exists."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser().resolve()
    p = ROOT.parent / "shared" / "host" / sibling
    return p.resolve() if p.is_dir() else None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def sd15_layer_dims(channels: int) -> list[int]:
    """attn2 widths of the SD1.5 structure in checkpoint order (input blocks, output blocks, middle)."""
    c = channels
    return [c, c, 2 * c, 2 * c, 4 * c, 4 * c] + [4 * c] * 3 + [2 * c] * 3 + [c] * 3 + [4 * c]


def make_models(cache_dir: Path, channels: int, layouts) -> dict:
    """{host folder: [files]} for the benchmark, made once into cache_dir."""
    from ipaf_runner import tiny_models as tm

    root = Path(cache_dir) / f"bench-models-v{BENCH_MODELS_VERSION}"

    def checkpoint(path):
        sd = tm.sd15_unet_state(model_channels=channels, channel_mult=SD15_CHANNEL_MULT, context_dim=CONTEXT_DIM)
        sd.update(tm.clip_text_state())
        sd.update({"first_stage_model." + k: v for k, v in tm.taesd_state().items()})
        tm._save(sd, path)

    t0 = time.time()
    out = {
        "checkpoints": [tm._cached(root / "checkpoints" / f"bench_sd15_c{channels}.safetensors",
                                   f"SD1.5 structure, model_channels {channels}, random weights", checkpoint)],
        "clip_vision": [tm._cached(root / "clip_vision" / "bench_clip_vision_vitl.safetensors",
                                   "CLIP ViT-L/14 vision layout, random weights",
                                   lambda p: tm._save(tm.clip_vision_state(), p))],
        "ipadapter": [tm._cached(root / "ipadapter" / f"bench_sd15_c{channels}_{layout}.safetensors",
                                 f"{layout} adapter for it",
                                 lambda p, layout=layout: tm.make_adapter(p, layout, sd15_layer_dims(channels),
                                                                          CONTEXT_DIM))
                      for layout in layouts],
    }
    if time.time() - t0 > 1:
        print(f"models ready in {time.time() - t0:.1f} s (cached in {root})", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Graphs (API format)
# --------------------------------------------------------------------------------------------------
def graph(names: dict, variant: str, layout: str | None, *, seed: int, steps: int, latent: int,
          weight: float = 1.0, apply_only: bool = False) -> dict:
    """The prompt of one variant: 'none', 'fused' or 'ipaplus' (with layout 'base' / 'plus').
    apply_only: stop at the apply node (PreviewAny takes the model) to time that node alone."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoint"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": latent * 8, "height": latent * 8, "batch_size": 1}},
    }
    model = ["1", 0]
    apply_id = None
    if variant != "none":
        g["10"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": names["clip_vision"]}}
        g["11"] = {"class_type": "EmptyImage", "inputs": {"width": REFERENCE_SIZE, "height": REFERENCE_SIZE,
                                                         "batch_size": 1, "color": 0x7F4020}}
        common = {"model": model, "image": ["11", 0], "weight": weight, "weight_type": "linear",
                  "start_at": 0.0, "end_at": 1.0, "combine_embeds": "concat", "embeds_scaling": "V only"}
        if variant == "fused":
            g["20"] = {"class_type": "IPAdapterFusedLoader", "inputs": {"ipadapter_file": names[layout]}}
            g["21"] = {"class_type": "IPAdapterFusedApply",
                       "inputs": {**common, "ipadapter": ["20", 0], "clip_vision": ["10", 0], "middle_block": "patch"}}
            apply_id = "21"
        elif variant == "ipaplus":
            g["30"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": names[layout]}}
            g["31"] = {"class_type": "IPAdapterAdvanced",
                       "inputs": {**common, "ipadapter": ["30", 0], "clip_vision": ["10", 0]}}
            apply_id = "31"
        else:
            raise ValueError(f"unknown variant {variant!r}")
        model = [apply_id, 0]
    if apply_only:
        if apply_id is None:
            raise ValueError("apply_only needs an adapter variant")
        for k in ("2", "3", "4"):
            del g[k]
        g["90"] = {"class_type": "PreviewAny", "inputs": {"source": model}}
        return g
    g["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    g["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "bench"}}
    return g


# --------------------------------------------------------------------------------------------------
# Timing one prompt from the WebSocket messages
# --------------------------------------------------------------------------------------------------
async def _timed_run(client, prompt: dict, timeout: float) -> dict:
    """Run a prompt; returns {node_s: {id: seconds}, steps_s: [..], executed, cached, wall_s}.
    A node's time runs from its `executing` message to the next `executing` (or the end)."""
    client_id = uuid.uuid4().hex
    events = client.events(client_id)
    marks, steps, cached = [], [], []
    prompt_id, status, error = None, None, None
    t0 = time.perf_counter()
    try:
        await events.__anext__()  # the socket is open (the host greets with a status message)
        code, body = await client.arequest("POST", "/prompt", json_body={"prompt": prompt, "client_id": client_id})
        answer = json.loads(body or b"{}")
        if code != 200 or "prompt_id" not in answer:
            raise RuntimeError(f"the host rejected the prompt: {json.dumps(answer)[:2000]}")
        prompt_id = answer["prompt_id"]
        async for msg in events:
            now = time.perf_counter()
            if now - t0 > timeout:
                raise RuntimeError(f"the prompt did not finish within {timeout:.0f} s")
            if msg is None:
                continue
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "executing":
                marks.append((data.get("node"), now))
                if data.get("node") is None:
                    break
            elif kind == "progress":
                steps.append((data.get("node"), data.get("value"), now))
            elif kind == "execution_cached":
                cached += [str(n) for n in data.get("nodes") or []]
            elif kind in ("execution_error", "execution_interrupted"):
                status, error = kind, data
                break
            elif kind == "execution_success":
                status = "success"
                marks.append((None, now))
                break
    finally:
        await events.aclose()
    if status != "success":
        raise RuntimeError(f"the prompt failed: {status}: {str(error.get('exception_message', error))[:2000]}"
                           if error else f"the prompt ended without success ({status})")
    node_s = {}
    for (nid, t), (_, t_next) in zip(marks, marks[1:]):
        if nid is not None:
            node_s[str(nid)] = node_s.get(str(nid), 0.0) + (t_next - t)
    return {"node_s": node_s, "executed": [str(n) for n, _ in marks if n is not None], "cached": cached,
            "progress": steps, "marks": marks, "wall_s": time.perf_counter() - t0}


def step_times(run: dict, node: str) -> list[float]:
    """Seconds of each sampling step of `node`, from its progress messages (the first step counts
    from the node's start, so it includes the sampler's set-up)."""
    start = next(t for n, t in run["marks"] if n is not None and str(n) == node)
    out, prev, seen = [], start, set()
    for n, value, t in run["progress"]:
        if str(n) != node or not value or value in seen:  # a bar may announce 0/N first
            continue
        seen.add(value)
        out.append(t - prev)
        prev = t
    return out


def timed_run(client, prompt: dict, timeout: float = 3600.0) -> dict:
    return asyncio.run(_timed_run(client, prompt, timeout))


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
def variants_for(layouts, with_ipaplus: bool) -> list[tuple[str, str | None]]:
    out = [("none", None)]
    for layout in layouts:
        out.append(("fused", layout))
        if with_ipaplus:
            out.append(("ipaplus", layout))
    return out


def variant_name(variant: str, layout: str | None) -> str:
    return VARIANT_LABELS[variant] + (f" ({layout})" if layout else "")


def bench_server(comfyui: Path, ipaplus: Path | None, models: dict, host_args: list):
    """The runner's ComfyServer, with ComfyUI_IPAdapter_plus linked into custom_nodes and allowed to load."""
    from ipaf_runner.server import LINK_NAME, ComfyServer

    class BenchServer(ComfyServer):
        def _prepare(self):
            cmd = super()._prepare()
            if ipaplus is not None:
                os.symlink(ipaplus, self.base / "custom_nodes" / IPAPLUS_LINK, target_is_directory=True)
                # a later --whitelist-custom-nodes replaces the earlier one (argparse 'store')
                cmd += ["--whitelist-custom-nodes", LINK_NAME, IPAPLUS_LINK]
            return cmd

    return BenchServer(comfyui, cpu=True, models=models, host_args=host_args)


def host_torch_info(python: str, env: dict) -> dict:
    code = "import torch, json; print(json.dumps({'torch': torch.__version__, 'threads': torch.get_num_threads()}))"
    out = subprocess.run([python, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"min": min(values), "max": max(values), "median": med,
            "rel_range": (max(values) - min(values)) / med if med else None, "n": len(values)}


def summarize(rounds: list[dict], apply_runs: dict, meta: dict) -> dict:
    """rounds: [{variant name: {"sampler_s": s, "steps_s": [..]}}] in round order (every round has
    'no adapter'); apply_runs: {variant name: [seconds]}. Returns the result dict written as JSON."""
    base = VARIANT_LABELS["none"]
    names = list(rounds[0])
    per_variant = {}
    for name in names:
        sampler = [r[name]["sampler_s"] for r in rounds]
        steps = [s for r in rounds for s in r[name]["steps_s"][1:]]  # the first step holds the set-up
        ratios = [r[name]["sampler_s"] / r[base]["sampler_s"] for r in rounds]
        per_variant[name] = {
            "sampler_s": _spread(sampler),
            "seconds_per_step": statistics.median(steps) if steps else statistics.median(sampler) / meta["steps"],
            "ratio_to_none": statistics.median(ratios),
            "ratio_to_none_per_round": ratios,
            "ratio_spread": _spread(ratios),
        }
    return {
        **meta,
        "seconds_per_step": {n: v["seconds_per_step"] for n, v in per_variant.items()},
        "ratio_to_none": {n: v["ratio_to_none"] for n, v in per_variant.items()},
        "variants": per_variant,
        "apply_s": {n: _spread(v) for n, v in apply_runs.items() if v},
        "rounds": rounds,
    }


def format_table(result: dict) -> str:
    lines = [f"SD1.5 UNet (model_channels {result['model_channels']}), latent {result['latent']}x{result['latent']}, "
             f"{result['steps']} steps euler cfg {result['cfg']}, {result['rounds_n']} rounds, "
             f"server --cache-lru {result['cache_lru']}, {result['device']} ({result['cpu']}, "
             f"{result['cores']} cores, {result['threads']} threads, torch {result['torch']})",
             f"{'variant':<36}{'sampler s':>10}{'s/step':>9}{'vs none':>9}{'ratio range':>16}{'time range':>14}"]
    for name, v in result["variants"].items():
        rs, ss = v["ratio_spread"], v["sampler_s"]
        lines.append(f"{name:<36}{ss['median']:>10.2f}{v['seconds_per_step']:>9.3f}{v['ratio_to_none']:>8.3f}x"
                     f"{rs['min']:>8.3f}-{rs['max']:.3f}{ss['rel_range'] * 100:>12.1f} %")
    if result["apply_s"]:
        lines.append("apply node (median of runs, includes the CLIP vision encoding):")
        for name, s in result["apply_s"].items():
            lines.append(f"  {name:<34}{s['median']:>10.3f} s  (range {s['min']:.3f}-{s['max']:.3f}, n {s['n']})")
    lines.append("ratio: within each round, then the median over rounds; 'time range': (max-min)/median of the "
                 "sampler time over rounds")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", type=Path, default=default_host("COMFYUI_PATH", "ComfyUI"))
    ap.add_argument("--ipadapter-plus", type=Path, default=default_host("IPADAPTER_PLUS_PATH", "ComfyUI_IPAdapter_plus"),
                    help="ComfyUI_IPAdapter_plus folder (compared when given; default $IPADAPTER_PLUS_PATH)")
    ap.add_argument("--no-ipadapter-plus", action="store_true", help="leave ComfyUI_IPAdapter_plus out")
    ap.add_argument("--channels", type=int, default=320, help="UNet model_channels (320 = SD1.5)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layouts", default="base,plus", help="comma-separated adapter layouts: base, plus")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in the server (OMP_NUM_THREADS); default: torch's own choice")
    ap.add_argument("--cache-lru", type=int, default=64, help="the server's --cache-lru N")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the generated models are cached")
    ap.add_argument("--note", default="", help="a note on the machine (shared, load ...) kept in the JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_cpu_sd15.json")
    ap.add_argument("--keep-server", action="store_true", help="print the server's pid and wait for Enter before "
                                                                 "stopping it (to attach a profiler)")
    args = ap.parse_args(argv)

    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        ap.error("no ComfyUI folder: pass --comfyui or set COMFYUI_PATH")
    ipaplus = None if args.no_ipadapter_plus else args.ipadapter_plus
    if ipaplus is not None and not (ipaplus / "IPAdapterPlus.py").is_file():
        ap.error(f"{ipaplus} is not ComfyUI_IPAdapter_plus (no IPAdapterPlus.py); pass --no-ipadapter-plus to leave it out")
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1 (the recorded figures use 3 rounds of 6 steps)")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or any(x not in LAYOUTS for x in layouts):
        ap.error(f"--layouts takes a comma-separated list of {', '.join(LAYOUTS)}")

    from ipaf_runner import tiny_models as tm

    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    info = host_torch_info(sys.executable, env)
    models = make_models(args.cache_dir or tm.default_cache_dir(), args.channels, layouts)
    names = {"checkpoint": models["checkpoints"][0].name, "clip_vision": models["clip_vision"][0].name,
             **{layout: p.name for layout, p in zip(layouts, models["ipadapter"])}}
    variants = variants_for(layouts, ipaplus is not None)
    load_start = os.getloadavg()

    os.environ.update(env)  # the server inherits it
    server = bench_server(args.comfyui, ipaplus, models, ["--cache-lru", str(args.cache_lru)])
    with server:
        server.start()
        info_nodes = server.client.object_info()
        missing = [n for n in ("IPAdapterFusedApply", "PreviewAny") + (("IPAdapterAdvanced",) if ipaplus else ())
                   if n not in info_nodes]
        if missing:
            raise SystemExit(f"nodes missing in the server: {missing}\n" + server.log_tail())
        first = {}
        print("warm-up: every graph once, 1 step (loads models, applies adapters, fills the cache)", flush=True)
        for i, (variant, layout) in enumerate(variants):
            run = timed_run(server.client, graph(names, variant, layout, seed=i, steps=1, latent=args.latent))
            first[variant_name(variant, layout)] = run["node_s"]
            print(f"  {variant_name(variant, layout):<36} {run['wall_s']:7.1f} s", flush=True)

        apply_runs = {variant_name(v, lay): [] for v, lay in variants if v != "none"}
        rounds = []
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            row = {}
            for j, (variant, layout) in enumerate(order):
                prompt = graph(names, variant, layout, seed=1000 + 100 * r + j, steps=args.steps, latent=args.latent)
                run = timed_run(server.client, prompt)
                if set(run["executed"]) != {"5", "6"}:
                    print(f"  warning: {variant_name(variant, layout)} re-ran {sorted(run['executed'])}, not only the "
                          "sampler: raise --cache-lru", flush=True)
                row[variant_name(variant, layout)] = {"sampler_s": run["node_s"]["5"], "steps_s": step_times(run, "5")}
            rounds.append({n: row[n] for n in (variant_name(v, lay) for v, lay in variants)})
            for variant, layout in order:
                if variant == "none":
                    continue
                run = timed_run(server.client, graph(names, variant, layout, seed=0, steps=args.steps,
                                                     latent=args.latent, weight=1.0 - 0.001 * (r + 1), apply_only=True))
                apply_id = "21" if variant == "fused" else "31"
                apply_runs[variant_name(variant, layout)].append(run["node_s"][apply_id])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {v['sampler_s']:.1f}s" for n, v in rounds[-1].items()), flush=True)
        if args.keep_server:
            input(f"server pid {server.pid}; press Enter to stop it ")

    meta = {
        "arch": "sd15", "model_channels": args.channels, "channel_mult": list(SD15_CHANNEL_MULT),
        "latent": args.latent, "steps": args.steps, "cfg": 5.0, "sampler": "euler", "layouts": layouts,
        "rounds_n": args.rounds, "cache_lru": args.cache_lru, "device": "cpu", "cpu": cpu_model(),
        "cores": os.cpu_count(), "threads": info["threads"], "torch": info["torch"], "python": platform.python_version(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()), "note": args.note,
        "first_run_node_s": first,
        "node_ids": {"sampler": "5", "apply (IPAdapter Fused)": "21", "apply (ComfyUI_IPAdapter_plus)": "31"},
    }
    result = summarize(rounds, apply_runs, meta)
    print()
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
