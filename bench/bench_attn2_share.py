"""How much of a sampling step each pack's attn2 patch takes, measured exactly (in-process, inside
the real host on CPU), beside the step time itself. Written to settle why bench_apply.py and a
py-spy profile disagreed (bench/README.md, "Per step: why the figures disagreed").

    COMFYUI_PATH=... IPADAPTER_PLUS_PATH=... python bench/bench_attn2_share.py --threads 2

Every attn2 call goes through a timing wrapper: the packs' own patch objects for this pack and
ComfyUI_IPAdapter_plus, and for the model without an adapter a patch that runs the host's plain
attention (what the unpatched layer runs between its projections), so the three time the same
span: q/k/v in, attention output out. The variants are interleaved (the order rotates each
round) and sampled with a new seed per round. Reported per variant: seconds per step, seconds
per step inside attn2, their ratio, and the extra over no adapter; plus the aten operations per
step (all of them, and inside attn2) counted in the steady state (after the first step, which
projects this pack's image K/V once per run). Prints a table and writes JSON."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

# aten ops that only make a new view or read metadata: no kernel over the data
VIEW_OPS = {"reshape", "view", "unsqueeze", "squeeze", "permute", "transpose", "unflatten", "flatten", "select",
            "slice", "expand", "detach", "detach_", "alias", "t", "unbind", "lift_fresh", "_unsafe_view", "split",
            "chunk", "narrow", "as_strided", "item", "_local_scalar_dense", "empty", "to", "_to_copy", "contiguous"}


class Timed:
    """Wraps one attn2 callable: adds its wall time to `acc` and, while `ops.on`, records its aten ops."""

    def __init__(self, inner, acc, ops):
        self.inner, self.acc, self.ops = inner, acc, ops

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone(); keep one wrapper
        return self

    def __call__(self, q, k, v, extra):
        self.ops.inside = True
        t0 = time.perf_counter()
        try:
            return self.inner(q, k, v, extra)
        finally:
            self.acc[0] += time.perf_counter() - t0
            self.acc[1] += 1
            self.ops.inside = False


def op_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.inside = False
            self.all, self.attn2 = Counter(), Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.all[name] += 1
            if self.inside:
                self.attn2[name] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


class _Flag:
    inside = False


def with_timing(model, sites, plain, acc, ops):
    """A clone of `model` whose every attn2 patch (or, where none, plain attention) is timed."""
    m = model.clone()
    to = dict(m.model_options["transformer_options"])
    replace = dict(to.get("patches_replace", {}))
    attn2 = dict(replace.get("attn2", {}))
    if not attn2:
        attn2 = {key: plain for key in sites}
    for key in list(attn2):
        attn2[key] = Timed(attn2[key], acc, ops)
    replace["attn2"] = attn2
    to["patches_replace"] = replace
    m.model_options["transformer_options"] = to
    return m


def _ops_split(counter: Counter, per: float) -> dict:
    total = sum(counter.values()) / per
    compute = sum(n for k, n in counter.items() if k not in VIEW_OPS) / per
    return {"all": total, "compute": compute}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=320, help="UNet model_channels (320 = full size)")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--layout", choices=["base", "plus"], default="base")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-ops", action="store_true", help="skip counting aten ops (it costs 4 extra runs per variant)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None, help="default bench/out/attn2_share_<layout>_t<threads>.json")
    args = ap.parse_args(argv)

    import bench_apply
    import util  # tests/host/util.py: host import on CPU, host-config UNets, tiny CLIP vision
    host = util.prepare_host()
    bench_apply._load_pack()
    torch = host.torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from test_ipadapter_host import CLIP, _adapter, _image

    from ipadapter_fused.models import load_adapter_state
    from ipadapter_fused.nodes.apply import apply_adapter

    tmp = Path(tempfile.mkdtemp())
    model = util.build_unet("sd15", args.channels)
    sites = util.attn2_sites(model)
    cv = util.make_clip_vision(tmp, **CLIP)
    adapter, path = _adapter(host, model, args.layout, tmp)
    image = _image(torch)
    pos, neg = util.make_cond("sd15", seed=1), util.make_cond("sd15", seed=2)
    variants = {"no adapter": model, "IPAdapter Fused": apply_adapter(model, adapter, cv, image, weight=0.8)}
    if util.ipadapter_plus_path() is not None:
        ipa = util.load_ipadapter_plus()
        variants["ComfyUI_IPAdapter_plus"], _ = ipa.IPAdapterPlus.ipadapter_execute(
            model.clone(), load_adapter_state(path), cv, image=image, weight=0.8)

    def plain(q, k, v, extra):
        return host.attention.optimized_attention(q, k, v, extra["n_heads"])

    def sample(m, steps, seed):
        return util.sample(m, pos, neg, steps=steps, latent_size=args.latent, seed=seed)

    # aten operations per step in the steady state: a 1-step run and a 3-step run, the difference / 2
    ops = {name: None for name in variants}
    for name, m in ([] if args.no_ops else variants.items()):
        counts = []
        for steps in (1, 3):
            flag = op_counter()
            with flag:
                sample(with_timing(m, sites, plain, [0.0, 0], flag), steps, seed=0)
            counts.append((flag.all, flag.attn2))
        ops[name] = {"per_step": _ops_split(counts[1][0] - counts[0][0], 2),
                     "attn2_per_step": _ops_split(counts[1][1] - counts[0][1], 2),
                     "attn2_first_step": _ops_split(counts[0][1], 1),
                     "attn2_top": dict(((counts[1][1] - counts[0][1]) + Counter()).most_common(16))}

    timed = {}
    for name, m in variants.items():
        acc = [0.0, 0]
        timed[name] = (with_timing(m, sites, plain, acc, _Flag()), acc)
        sample(timed[name][0], 1, seed=0)  # warm-up (and this pack's K/V of that run)
    rows = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            m, acc = timed[name]
            acc[0], acc[1] = 0.0, 0
            t0 = time.perf_counter()
            sample(m, args.steps, seed=100 + r)
            wall = time.perf_counter() - t0
            rows[name].append({"step_s": wall / args.steps, "attn2_s": acc[0] / args.steps,
                               "calls": acc[1] / args.steps})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {rows[n][-1]['step_s']:.2f} s/step ({rows[n][-1]['attn2_s']:.2f} in attn2)" for n in names), flush=True)

    from bench_server import cpu_model  # the machine's name, as every server-level result records it

    base = "no adapter"
    result = {"arch": "sd15", "model_channels": args.channels, "latent": args.latent, "steps": args.steps,
              "layout": args.layout, "rounds_n": args.rounds, "device": "cpu",
              "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "loadavg_end": list(os.getloadavg()),
              "note": args.note, "variants": {}}
    for name in names:
        rr = rows[name]
        share = [x["attn2_s"] / x["step_s"] for x in rr]
        extra = [(x["attn2_s"] - b["attn2_s"]) / b["step_s"] for x, b in zip(rr, rows[base])]
        ratio = [x["step_s"] / b["step_s"] for x, b in zip(rr, rows[base])]
        result["variants"][name] = {
            "step_s": statistics.median(x["step_s"] for x in rr),
            "attn2_s_per_step": statistics.median(x["attn2_s"] for x in rr),
            "attn2_share": statistics.median(share),
            "attn2_extra_vs_none": statistics.median(extra),
            "attn2_extra_vs_none_range": [min(extra), max(extra)],
            "step_ratio_to_none": statistics.median(ratio),
            "step_ratio_range": [min(ratio), max(ratio)],
            "attn2_calls_per_step": rr[0]["calls"],
            "ops": ops[name],
            "rounds": rr,
        }
    print(f"\nSD1.5 UNet (model_channels {args.channels}), latent {args.latent}, {args.layout} adapter, "
          f"{result['threads']} threads, {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'variant':<26}{'s/step':>8}{'attn2 s':>9}{'attn2 %':>9}{'extra %':>9}{'step x':>8}"
          f"{'ops/step':>10}{'attn2 ops':>11}{'compute':>9}")
    for name, v in result["variants"].items():
        o = v["ops"]
        counts = (f"{o['per_step']['all']:>10.0f}{o['attn2_per_step']['all']:>11.0f}{o['attn2_per_step']['compute']:>9.0f}"
                  if o else "")
        print(f"{name:<26}{v['step_s']:>8.2f}{v['attn2_s_per_step']:>9.3f}{100 * v['attn2_share']:>8.1f}%"
              f"{100 * v['attn2_extra_vs_none']:>8.1f}%{v['step_ratio_to_none']:>8.3f}{counts}")
    print("attn2 %: share of the step inside attn2 (text attention included); extra %: attn2 time over "
          "no adapter's, as a share of no adapter's step; ops: aten ops per step, steady state (compute: "
          "not views/metadata)")
    out = Path(args.out or ROOT / "bench" / "out" / f"attn2_share_{args.layout}_t{result['threads']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
