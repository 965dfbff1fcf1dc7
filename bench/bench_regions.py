"""Per-step overhead of region masks and of multi-reference merging, inside the real host on CPU.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_regions.py [--arch sdxl|sd15] [--channels 64]
        [--latent 32] [--steps 5] [--rounds 3] [--threads N] [--note "..."] [--out x.json]
    python bench/bench_regions.py --quick --out x.json      # tiniest settings (the smoke test)

Variants, sampled side by side in one run on one tiny UNet built by the host's own config (real block
structure, `--channels` wide; tests/host/util.py), cond + uncond batch:

- without adapter;
- 1 adapter, no mask (the reference for the overheads below);
- 1 region: the same adapter with a mask (half the picture);
- 2 regions / 4 regions (--regions): 2 or 4 chained apply calls ('IPAdapter Region (Fused)' does exactly this), each
  with its own picture and a mask of its own vertical stripe (disjoint masks covering the picture);
- multi-reference 2 / 4 (--references; SDXL only): one 'IPAdapter Multi-Reference (Fused)' apply with 2 or 4 references,
  routing 'attention', a MIP-Adapter file (text_to_weight gate on every layer): every layer computes each
  object's term, each entity word's attention map and the gate, and merges per position.

All adapters are the same synthetic base layout (4 image tokens per picture) the host tests use. Seconds per
step are timed between the sampler's step callbacks with the first step left out (it holds the run's K/V
set-up); variants run in interleaved rounds with a rotating order, the ratios are taken within each round
(on a shared machine load moves between turns). Every time is also taken as the process's CPU time
(time.process_time), which leaves out waits for a core. Prints a table and writes JSON (default
bench/results/regions_cpu_<arch>_t<threads>.json) with the CPU name and the load average."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

BASELINE = "without adapter"
ONE = "1 adapter, no mask"
# load average (1 min) above which the machine does not count as quiet (2 cores here)
BUSY_LOAD = 1.5


def _load_pack():
    if "ipadapter_fused" in sys.modules:
        return
    import importlib.util
    spec = importlib.util.spec_from_file_location("ipadapter_fused", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ipadapter_fused"] = mod
    spec.loader.exec_module(mod)


def stripe_masks(n: int, size: int = 64):
    """n disjoint vertical stripes covering a size x size picture, each a (1, size, size) MASK."""
    import torch
    edges = [round(i * size / n) for i in range(n + 1)]
    out = []
    for a, b in zip(edges, edges[1:]):
        m = torch.zeros(1, size, size)
        m[..., a:b] = 1.0
        out.append(m)
    return out


def step_times(host, patcher, pos, neg, latent_size, steps, seed):
    """(wall, CPU) seconds of each sampling step after the first, from the sampler's step callbacks."""
    torch = host.torch
    latent = torch.zeros(1, 4, latent_size, latent_size)
    noise = host.sample.prepare_noise(latent, seed)
    stamps = []
    t0 = (time.perf_counter(), time.process_time())
    with torch.inference_mode():
        host.sample.sample(patcher, noise, steps, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True,
                           seed=seed, callback=lambda *a: stamps.append((time.perf_counter(), time.process_time())))
    edges = [t0] + stamps
    wall = [b[0] - a[0] for a, b in zip(edges, edges[1:])][1:]
    cpu = [b[1] - a[1] for a, b in zip(edges, edges[1:])][1:]
    return wall, cpu


def build_variants(host, args, tmp):
    """{name: (patched model, apply seconds)} and what they are made of."""
    import util
    from test_ipadapter_host import CLIP, _adapter, _image

    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.multi_ref_apply import apply_multi_reference

    torch = host.torch
    model = util.build_unet(args.arch, args.channels)
    cv = util.make_clip_vision(tmp, **CLIP)
    adapter, _ = _adapter(host, model, "base", tmp)
    images = [_image(torch, seed=i) for i in range(4)]
    variants = {BASELINE: (model, 0.0)}

    def timed(fn):
        t0 = time.perf_counter()
        m = fn()
        return m, time.perf_counter() - t0

    variants[ONE] = timed(lambda: apply_adapter(model, adapter, cv, images[0], weight=0.8))
    half = stripe_masks(2)[0]
    variants["1 region (masked)"] = timed(lambda: apply_adapter(model, adapter, cv, images[0], weight=0.8,
                                                                attn_mask=half))
    for n in args.regions:
        def chain(n=n):
            m = model
            for image, mask in zip(images[:n] * (n // len(images) + 1), stripe_masks(n)):
                m = apply_adapter(m, adapter, cv, image, weight=0.8, attn_mask=mask)
            return m
        variants[f"{n} regions"] = timed(chain)
    if args.arch == "sdxl" and args.references:
        from test_multi_ref_host import _adapter as mip_adapter, _entities
        mip, _ = mip_adapter(host, model, tmp, gate=True)
        assert mip.spec.mip_gate, "the MIP file was not read as a MIP-Adapter"
        for n in args.references:
            refs = [images[i % len(images)] for i in range(n)]
            words = _entities(torch, counts=tuple(1 + (i % 2) for i in range(n)))
            variants[f"multi-ref {n} (MIP gate)"] = timed(
                lambda refs=refs, words=words: apply_multi_reference(model, mip, cv, refs, "attention", entities=words,
                                                                     weight=0.8))
    return variants


def run(args):
    import util
    host = util.prepare_host()
    _load_pack()
    torch = host.torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_server import cpu_model

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-regions-"))
    variants = build_variants(host, args, tmp)
    pos, neg = util.make_cond(args.arch, seed=1), util.make_cond(args.arch, seed=2)
    names = list(variants)
    for name in names if not args.quick else ():  # warm-up: the run's K/V, the host's first-call costs
        step_times(host, variants[name][0], pos, neg, args.latent, 2, seed=0)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = step_times(host, variants[name][0], pos, neg, args.latent, args.steps, seed=r)
            wall[name].append(statistics.median(w))
            cpu[name].append(statistics.median(c))

    def ratios(times, ref):
        return {n: [x / b for x, b in zip(v, times[ref])] for n, v in times.items()}

    rows = []
    r_base, r_one = ratios(wall, BASELINE), ratios(wall, ONE)
    c_base, c_one = ratios(cpu, BASELINE), ratios(cpu, ONE)
    for n in names:
        rows.append({
            "variant": n, "apply_s": variants[n][1],
            "s_per_step": statistics.median(wall[n]), "cpu_s_per_step": statistics.median(cpu[n]),
            "vs_without": statistics.median(r_base[n]), "vs_without_range": [min(r_base[n]), max(r_base[n])],
            "vs_one_adapter": statistics.median(r_one[n]), "vs_one_adapter_range": [min(r_one[n]), max(r_one[n])],
            "cpu_vs_without": statistics.median(c_base[n]), "cpu_vs_one_adapter": statistics.median(c_one[n]),
            "s_per_step_per_round": wall[n], "cpu_s_per_step_per_round": cpu[n],
        })
    load_end = os.getloadavg()
    busy = max(load_start[0], load_end[0]) > BUSY_LOAD
    note = args.note
    if busy:
        note = (note + "; " if note else "") + (f"machine busy: load average {load_start[0]:.2f} -> {load_end[0]:.2f} "
                                                f"(> {BUSY_LOAD}); read the CPU-time columns")
    return {
        "device": "cpu", "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
        "arch": args.arch, "model_channels": args.channels, "latent": args.latent, "steps": args.steps,
        "rounds": args.rounds, "layout": "base", "batch": "cond+uncond", "interleaved": True,
        "loadavg_start": list(load_start), "loadavg_end": list(load_end), "busy": busy, "note": note,
        "rows": rows,
    }


def format_table(result) -> str:
    lines = [f"{result['arch']} UNet (model_channels {result['model_channels']}), latent {result['latent']}x"
             f"{result['latent']}, base adapters, cond+uncond, CPU {result['cpu']} ({result['threads']} threads); "
             f"median over {result['rounds']} interleaved rounds of steps 2..{result['steps']}",
             f"{'variant':<26}{'s/step':>9}{'vs without':>12}{'vs 1 adapter':>14}{'  range vs 1 adapter':>22}"
             f"{'CPU s/step':>12}{'CPU vs 1':>10}{'apply s':>9}"]
    for r in result["rows"]:
        lo, hi = r["vs_one_adapter_range"]
        lines.append(f"{r['variant']:<26}{r['s_per_step']:>9.4f}{r['vs_without']:>11.3f}x{r['vs_one_adapter']:>13.3f}x"
                     f"{lo:>14.3f}-{hi:.3f}{r['cpu_s_per_step']:>12.4f}{r['cpu_vs_one_adapter']:>9.3f}x"
                     f"{r['apply_s']:>9.3f}")
    lines.append(f"load average {result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}"
                 + (f"; note: {result['note']}" if result["note"] else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sdxl",
                    help="UNet (multi-reference merging with a MIP file: sdxl only)")
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (320 = full size)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--steps", type=int, default=5, help="sampling steps per run (the first is left out)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every variant once per round)")
    ap.add_argument("--regions", default="2,4", help="region counts to chain")
    ap.add_argument("--references", default="2,4", help="reference counts to merge (sdxl; empty: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiniest settings (smoke test)")
    ap.add_argument("--note", default="", help="what the machine was doing")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/regions_cpu_<arch>_t<threads>.json)")
    args = ap.parse_args(argv)
    if args.quick:  # one of each kind, no warm-up: the smoke test checks the rows, not the timings
        args.channels, args.latent, args.steps, args.rounds = 32, 8, 2, 1
        args.regions, args.references = "2", "2"
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is left out)")
    args.regions = [int(x) for x in str(args.regions).split(",") if x.strip()]
    args.references = [int(x) for x in str(args.references).split(",") if x.strip()]
    result = run(args)
    print(format_table(result))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"regions_cpu_{args.arch}_t{result['threads']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
