"""Time to apply an adapter node, and per-step sampling time with and without the adapter,
side by side in one run, inside the real host on CPU.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_apply.py [--arch sd15|sdxl] [--channels 320]
        [--latent 32] [--steps 4] [--threads N] [--out bench/out/apply_cpu.json]

The UNet is built by the host's own SD1.5 / SDXL config (real block structure; channel count
and latent size are arguments, so a full-size SD1.5 UNet is --channels 320). With
ComfyUI_IPAdapter_plus available ($IPADAPTER_PLUS_PATH) its per-step time is measured in the
same run for comparison. Prints a table and writes JSON."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))


def _load_pack():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ipadapter_fused", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ipadapter_fused"] = mod
    spec.loader.exec_module(mod)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (320 = full size)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layout", choices=["base", "plus"], default="plus")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (every variant once per round)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; on a machine shared with other jobs 1 is steadier)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "apply_cpu.json"))
    args = ap.parse_args(argv)

    import util  # tests/host/util.py: host import on CPU, host-config UNets, tiny CLIP vision
    host = util.prepare_host()
    _load_pack()
    torch = host.torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from test_ipadapter_host import CLIP, _adapter, _image  # the same synthetic adapters the tests use

    from ipadapter_fused.models import load_adapter_state
    from ipadapter_fused.nodes.apply import apply_adapter

    tmp = Path(tempfile.mkdtemp())
    model = util.build_unet(args.arch, args.channels)
    cv = util.make_clip_vision(tmp, **CLIP)
    adapter, path = _adapter(host, model, args.layout, tmp)
    image = _image(torch)
    pos, neg = util.make_cond(args.arch, seed=1), util.make_cond(args.arch, seed=2)

    t0 = time.perf_counter()
    patched = apply_adapter(model, adapter, cv, image, weight=0.8)
    apply_s = time.perf_counter() - t0
    apply_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        apply_adapter(model, adapter, cv, image, weight=0.8)
        apply_times.append(time.perf_counter() - t0)

    models = {"without adapter": model, "IPAdapter Fused": patched}
    theirs_apply = None
    if util.ipadapter_plus_path() is not None:
        ipa = util.load_ipadapter_plus()
        state = load_adapter_state(path)
        t0 = time.perf_counter()
        theirs, _ = ipa.IPAdapterPlus.ipadapter_execute(model.clone(), state, cv, image=image, weight=0.8)
        theirs_apply = time.perf_counter() - t0
        models["ComfyUI_IPAdapter_plus"] = theirs

    # Interleaved: each round samples every variant once, in an order that rotates, so a change in
    # machine load between the variants' turns does not land on one of them (on a shared machine the
    # variants measured one after the other differed by tens of percent: bench/README.md).
    for m in models.values():
        util.sample(m, pos, neg, steps=1, latent_size=args.latent)  # warm-up (and K/V of the run)
    names = list(models)
    per_round = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            util.sample(models[name], pos, neg, steps=args.steps, latent_size=args.latent, seed=r)
            per_round[name].append((time.perf_counter() - t0) / args.steps)
    rows = {name: statistics.median(v) for name, v in per_round.items()}
    ratios = {name: [x / b for x, b in zip(v, per_round["without adapter"])] for name, v in per_round.items()}

    print(f"\n{args.arch} UNet (model_channels {args.channels}), latent {args.latent}x{args.latent}, "
          f"{args.layout} adapter, batch cond+uncond, CPU ({torch.get_num_threads()} threads)")
    print(f"{'path':<26}{'s/step':>10}{'vs without':>12}{'range over rounds':>20}")
    for name, s in rows.items():
        lo, hi = min(ratios[name]), max(ratios[name])
        print(f"{name:<26}{s:>10.4f}{statistics.median(ratios[name]):>11.3f}x{lo:>12.3f}-{hi:.3f}")
    print(f"apply node: first {apply_s:.3f} s, then median {statistics.median(apply_times):.3f} s"
          + (f"; IPAdapter_plus apply {theirs_apply:.3f} s" if theirs_apply is not None else ""))

    result = {
        "arch": args.arch, "model_channels": args.channels, "latent": args.latent, "steps": args.steps,
        "layout": args.layout, "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds_per_step": rows, "ratio_to_without": {n: statistics.median(v) for n, v in ratios.items()},
        "ratio_per_round": ratios, "seconds_per_step_per_round": per_round, "interleaved": True,
        "apply_first_s": apply_s, "apply_median_s": statistics.median(apply_times),
        "ipadapter_plus_apply_s": theirs_apply,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
