"""Where a server run's time goes: start ComfyUI (the bench_server.py set-up), warm it up, then
record a py-spy sampling profile of the server process while it runs one graph N times.

    python bench/profile_server.py --variant fused --layout base --runs 3
    python bench/profile_server.py --variant ipaplus --native          # native frames too (slower)
    python bench/profile_server.py --variant none --idle               # idle samples kept

Writes to --out-dir (default bench/out/profile_<variant>_<layout>/):
  profile.txt   py-spy's raw collapsed stacks ("frame;frame;... count", one thread per line prefix);
                open it in https://www.speedscope.app or feed it to flamegraph.pl
  summary.json  the table below, the run times and the py-spy command

and prints the share of the sampler thread's samples in: the UNet forward, self-attention (attn1),
cross-attention (attn2: its q/k/v/out projections plus the attention or the replacing patch), the
packs' attn2 patch objects (IPAdapter Fused `Attn2Patch.__call__`, ComfyUI_IPAdapter_plus
`Attn2Replace.__call__`), and the feed-forward. It also prints how many samples py-spy took in
the sampler thread against how many the sampler's wall time allows (rate x seconds): samples
py-spy counts as idle (a thread blocked in a wait) are dropped unless --idle, and a low coverage
says the percentages leave that time out. The analysis reads only the profile; see bench/README.md
for how to read it."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_server as bs  # noqa: E402  (also puts tools/ on sys.path)

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Which frames mark what; matched on "function (file" of py-spy's frames.
SAMPLER = "common_ksampler (nodes.py"
UNET = "UNetModel._forward ("
TRANSFORMER_BLOCK = re.compile(r"^BasicTransformerBlock\._?forward \(")  # forward in 0.3.64, _forward in some
PATCHES = {"IPAdapter Fused attn2 patch": "Attn2Patch.__call__ (",
           "ComfyUI_IPAdapter_plus attn2 patch": "Attn2Replace.__call__ ("}


def transformer_block_lines(comfyui: Path) -> dict:
    """Line numbers of BasicTransformerBlock's forward that call attn1, attn2 (its projections, the
    replacing patch or the module) and the feed-forward, from the host's comfy/ldm/modules/attention.py.
    py-spy's frame of the forward carries the line it is executing, which tells these apart."""
    text = (comfyui / "comfy" / "ldm" / "modules" / "attention.py").read_text().splitlines()
    start = next(i for i, line in enumerate(text) if "class BasicTransformerBlock" in line)
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("class ")), len(text))
    kinds = {"attn1": [], "attn2": [], "ff": []}
    for i in range(start, end):
        line = text[i]
        if "self.attn1(" in line or "attn1_replace_patch[" in line:
            kinds["attn1"].append(i + 1)
        elif "self.attn2(" in line or "attn2_replace_patch[" in line or "self.attn2.to_" in line:
            kinds["attn2"].append(i + 1)
        elif "self.ff(" in line:
            kinds["ff"].append(i + 1)
    return kinds


def parse_raw(path: Path):
    """py-spy raw output -> [(thread label, [frames root first], count)]."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith("thread (") else ""
        out.append((thread, frames[1:] if thread else frames, int(count)))
    return out


def _frame_line(frame: str):
    m = FRAME.match(frame)
    return int(m.group("line")) if m and m.group("line") else None


def classify(stacks, block_lines: dict) -> dict:
    """Sample counts: all threads, the sampler's thread(s), and the parts of the sampler named above.
    A sample counts once in every part whose frame is on its stack (parts nest: a patch is in attn2)."""
    counts = Counter()
    sampler_threads = set()
    for thread, frames, n in stacks:
        counts["all threads"] += n
        if not any(SAMPLER in f for f in frames):
            continue
        sampler_threads.add(thread)
        counts["sampler"] += n
        if any(UNET in f for f in frames):
            counts["UNet forward"] += n
        tb = [f for f in frames if TRANSFORMER_BLOCK.match(f)]
        if tb:
            line = _frame_line(tb[-1])
            for kind in ("attn1", "attn2", "ff"):
                if line in block_lines[kind]:
                    counts[kind] += n
        for name, mark in PATCHES.items():
            if any(mark in f for f in frames):
                counts[name] += n
    for thread, frames, n in stacks:
        if thread in sampler_threads:
            counts["sampler thread"] += n
    return dict(counts)


def summarize_profile(counts: dict, sampler_seconds: float, rate: int) -> dict:
    sampler = counts.get("sampler", 0)
    parts = ["UNet forward", "attn1", "attn2", *PATCHES, "ff"]
    return {
        "samples": counts,
        "share_of_sampler": {p: counts.get(p, 0) / sampler if sampler else None for p in parts},
        "share_of_all_threads": {p: counts.get(p, 0) / counts["all threads"] if counts.get("all threads") else None
                                 for p in ["sampler", *parts]},
        "coverage": sampler / (rate * sampler_seconds) if sampler_seconds else None,
    }


def format_summary(summary: dict, title: str) -> str:
    lines = [title, f"{'part':<38}{'% of sampler':>14}{'% of all samples':>18}"]
    for part, share in summary["share_of_sampler"].items():
        other = summary["share_of_all_threads"].get(part)
        lines.append(f"{part:<38}{100 * (share or 0):>13.1f}%{100 * (other or 0):>17.1f}%")
    s = summary["samples"]
    lines.append(f"samples: {s.get('sampler', 0)} in the sampler, {s.get('sampler thread', 0)} in its thread, "
                 f"{s.get('all threads', 0)} in all threads; coverage of the sampler's wall time: "
                 f"{100 * (summary['coverage'] or 0):.0f}%")
    return "\n".join(lines)


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", type=Path, default=bs.default_host("COMFYUI_PATH", "ComfyUI"))
    ap.add_argument("--ipadapter-plus", type=Path, default=bs.default_host("IPADAPTER_PLUS_PATH", "ComfyUI_IPAdapter_plus"))
    ap.add_argument("--variant", choices=["none", "fused", "ipaplus"], default="fused")
    ap.add_argument("--layout", choices=bs.LAYOUTS, default="base")
    ap.add_argument("--runs", type=int, default=3, help="runs recorded (after one warm-up run)")
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="py-spy --native: C/C++ frames too")
    ap.add_argument("--idle", action="store_true", help="py-spy --idle: keep samples of waiting threads")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        ap.error("no ComfyUI folder: pass --comfyui or set COMFYUI_PATH")
    ipaplus = args.ipadapter_plus if args.variant == "ipaplus" else None
    if args.variant == "ipaplus" and (ipaplus is None or not (ipaplus / "IPAdapterPlus.py").is_file()):
        ap.error("--variant ipaplus needs ComfyUI_IPAdapter_plus: pass --ipadapter-plus or set IPADAPTER_PLUS_PATH")
    layout = args.layout if args.variant != "none" else None
    out_dir = args.out_dir or BENCH / "out" / f"profile_{args.variant}{'_' + layout if layout else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = py_spy()

    from ipaf_runner import tiny_models as tm
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    models = bs.make_models(args.cache_dir or tm.default_cache_dir(), args.channels, [args.layout])
    names = {"checkpoint": models["checkpoints"][0].name, "clip_vision": models["clip_vision"][0].name,
             args.layout: models["ipadapter"][0].name}
    raw = out_dir / "profile.txt"
    cmd = None
    runs = []
    with bs.bench_server(args.comfyui, ipaplus, models, ["--cache-lru", "32"]) as server:
        server.start()
        print("warm-up run (loads and applies; not recorded)", flush=True)
        bs.timed_run(server.client, bs.graph(names, args.variant, layout, seed=0, steps=args.steps, latent=args.latent))
        cmd = [exe, "record", "--pid", str(server.pid), "--rate", str(args.rate), "--format", "raw",
               "--threads", "--output", str(raw)] + (["--native"] if args.native else []) + (["--idle"] if args.idle else [])
        spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)  # py-spy attaches
        try:
            for i in range(args.runs):
                run = bs.timed_run(server.client, bs.graph(names, args.variant, layout, seed=100 + i, steps=args.steps,
                                                           latent=args.latent))
                runs.append({"sampler_s": run["node_s"]["5"], "steps_s": bs.step_times(run, "5"),
                             "executed": run["executed"]})
                print(f"run {i + 1}/{args.runs}: sampler {run['node_s']['5']:.2f} s", flush=True)
        finally:
            spy.send_signal(signal.SIGINT)
            spy_out, _ = spy.communicate(timeout=120)
    if not raw.is_file():
        raise SystemExit(f"py-spy wrote no profile:\n{spy_out}")
    counts = classify(parse_raw(raw), transformer_block_lines(args.comfyui))
    sampler_seconds = sum(r["sampler_s"] for r in runs)
    summary = summarize_profile(counts, sampler_seconds, args.rate)
    title = (f"{bs.variant_name(args.variant, layout)}: {args.runs} runs of {args.steps} steps, SD1.5 c{args.channels}, "
             f"latent {args.latent}; py-spy {args.rate} Hz{' --native' if args.native else ''}"
             f"{' --idle' if args.idle else ''}; sampler {sampler_seconds:.1f} s in all")
    print()
    print(format_summary(summary, title))
    (out_dir / "summary.json").write_text(json.dumps({
        "variant": args.variant, "layout": layout, "channels": args.channels, "latent": args.latent,
        "steps": args.steps, "threads": args.threads, "py_spy": cmd, "runs": runs,
        "sampler_s_median": statistics.median(r["sampler_s"] for r in runs), **summary,
        "py_spy_output": spy_out[-2000:]}, indent=2))
    print(f"wrote {raw} and {out_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
