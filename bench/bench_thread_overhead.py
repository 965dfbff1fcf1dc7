"""The cost of one small torch op against a large one, with 1 and with N threads, interleaved.

    python bench/bench_thread_overhead.py [--threads 2] [--reps 30]

On a quiet machine a small op (the image term of an attn2 layer: a few thousand to a few hundred
thousand multiply-adds) costs microseconds with any thread count. When the cores are shared with
other busy processes, every op that opens an OpenMP parallel region waits at its closing barrier
for a worker thread the OS has descheduled, so a small op can cost milliseconds with 2+ threads
while a large op hardly notices. A patch made of many small ops then looks expensive in wall time
(bench_apply.py, bench_server.py) although it does little work. Measures, per thread count:
  small: the image term of one SD1.5 level-0 attn2 call as ComfyUI_IPAdapter_plus computes it
         (4 image tokens: two K and two V projections, repeat, cat, attention, scale, add)
  text:  the text attention of that call (q 2x1024x320 against 77 tokens)
  large: one 3x3 convolution 320->320 over a 2x320x32x32 latent (the UNet's bulk work)
Prints a table and writes JSON to bench/out/thread_overhead.json (or --out)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _attention(q, k, v, heads):
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, c)


def workloads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1024, 320, generator=g)
    text = torch.randn(2, 77, 320, generator=g)
    cond, uncond = torch.randn(1, 4, 768, generator=g), torch.zeros(1, 4, 768)
    wk, wv = torch.randn(320, 768, generator=g) / 28, torch.randn(320, 768, generator=g) / 28
    x = torch.randn(2, 320, 32, 32, generator=g)
    w = torch.randn(320, 320, 3, 3, generator=g) / 54

    def small():
        k_c, k_u = F.linear(cond, wk).repeat(1, 1, 1), F.linear(uncond, wk).repeat(1, 1, 1)
        v_c, v_u = F.linear(cond, wv).repeat(1, 1, 1), F.linear(uncond, wv).repeat(1, 1, 1)
        k, v = torch.cat([k_c, k_u]), torch.cat([v_c, v_u])
        return q + _attention(q, k, v, 8) * 0.8

    return {"small": small, "text": lambda: _attention(q, text, text, 8),
            "large": lambda: F.conv2d(x, w, padding=1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="the thread count compared with 1")
    ap.add_argument("--reps", type=int, default=30, help="calls per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "thread_overhead.json")
    args = ap.parse_args(argv)
    work = workloads()
    counts = [1, args.threads]
    times = {(t, name): [] for t in counts for name in work}
    with torch.inference_mode():
        for fn in work.values():
            fn()
        for r in range(args.rounds):
            for t in (counts if r % 2 == 0 else counts[::-1]):
                torch.set_num_threads(t)
                for name, fn in work.items():
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        fn()
                    times[(t, name)].append((time.perf_counter() - t0) / args.reps * 1e3)
    result = {"torch": torch.__version__, "cores": os.cpu_count(), "loadavg": list(os.getloadavg()),
              "ms_per_call": {f"{name}@{t}": statistics.median(v) for (t, name), v in times.items()},
              "ms_per_call_range": {f"{name}@{t}": [min(v), max(v)] for (t, name), v in times.items()}}
    print(f"ms per call (median of {args.rounds} rounds of {args.reps}; load average {result['loadavg'][0]:.1f} "
          f"on {result['cores']} cores)")
    print(f"{'workload':<8}" + "".join(f"{f'{t} thread(s)':>14}" for t in counts) + f"{'ratio':>8}")
    for name in work:
        a, b = (result["ms_per_call"][f"{name}@{t}"] for t in counts)
        print(f"{name:<8}{a:>14.3f}{b:>14.3f}{b / a:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
