#!/usr/bin/env python
"""Unfused torch path vs the fused Triton kernel, side by side, on the shapes the pack meets.

    python bench/bench_attention.py                 # GPU: full table, JSON to bench/results/<device>.json
    python bench/bench_attention.py --quick         # two tiny shapes; runs on CPU too (torch only,
                                                    # or the kernel under TRITON_INTERPRET=1)

Per shape it reports the unfused time (decoupled_attention_torch: one SDPA per context, the
batch_index gather, the mask multiply, the add), the fused time with contexts packed once (the
patcher's steady state), the fused time with a plain context list (packed on every call), the
speedup, the bytes the ideal kernel moves (Q read once, text and image K/V read once, masks read
once, O written once) and the bandwidth that implies, as a fraction of the device's peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Peak HBM bandwidth (GB/s) by device-name fragment, first match wins. Vendor figures.
KNOWN_PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("4090", 1008.0),
    ("3090", 936.0),
)
DEFAULT_PEAK_GBPS = 3350.0  # H100 SXM


def load_attention():
    """The pack's attention package, without importing the ComfyUI glue beside it."""
    for name in ("ipadapter_fused.attention", "ipadapter_fused_bench.attention"):
        if name in sys.modules:
            return sys.modules[name]
    name = "ipadapter_fused_bench_attention"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "attention" / "__init__.py", submodule_search_locations=[str(ROOT / "attention")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Shape:
    name: str
    model: str
    layout: str
    batch: int
    heads: int
    head_dim: int
    lq: int
    lt: int
    n_ctx: int
    ctx_tokens: int


def full_shapes() -> list[Shape]:
    shapes = []
    for n in (1, 2, 4):
        for lq, d in ((4096, 40), (1024, 80), (256, 160)):
            shapes.append(Shape(f"sd15_q{lq}_d{d}_c{n}x16", "SD1.5 512^2", "blc", 2, 8, d, lq, 77, n, 16))
        for lq, h in ((16384, 10), (4096, 20)):
            shapes.append(Shape(f"sdxl_q{lq}_h{h}_c{n}x16", "SDXL 1024^2", "blc", 2, h, 64, lq, 77, n, 16))
        shapes.append(Shape(f"flux_q4096_h24_c{n}x16", "Flux 1024^2", "bhld", 2, 24, 128, 4096, 512, n, 16))
    # Full-face adapters: 257 image tokens.
    shapes.append(Shape("sd15_q4096_d40_c1x257", "SD1.5 512^2", "blc", 2, 8, 40, 4096, 77, 1, 257))
    shapes.append(Shape("sdxl_q4096_h20_c1x257", "SDXL 1024^2", "blc", 2, 20, 64, 4096, 77, 1, 257))
    return shapes


def quick_shapes() -> list[Shape]:
    return [
        Shape("tiny_blc_d40_c2x16", "tiny", "blc", 2, 2, 40, 64, 77, 2, 16),
        Shape("tiny_bhld_d64_c1x5", "tiny", "bhld", 2, 2, 64, 48, 20, 1, 5),
    ]


def make_inputs(att, s: Shape, dtype, device, masks: str, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype)

    def seq(rows, length):
        if s.layout == "blc":
            return rnd(rows, length, s.heads * s.head_dim)
        return rnd(rows, s.heads, length, s.head_dim)

    q = seq(s.batch, s.lq)
    kt, vt = seq(s.batch, s.lt), seq(s.batch, s.lt)
    # Cond and uncond rows read the positive and negative image tokens: two context rows
    # routed by batch_index, as the patcher does.
    bidx = torch.tensor([i % 2 for i in range(s.batch)], dtype=torch.int64, device=device)
    ctxs = []
    for j in range(s.n_ctx):
        mask = None
        if masks == "all" or (masks == "first" and j == 0):
            mask = torch.rand(s.batch, s.lq, generator=gen).to(device)
        ctxs.append(
            att.ImageContext(
                k=seq(2, s.ctx_tokens), v=seq(2, s.ctx_tokens), weight=0.8, mask=mask, batch_index=bidx
            )
        )
    return q, kt, vt, ctxs


def ideal_bytes(s: Shape, elt: int, ctxs) -> int:
    row = s.heads * s.head_dim * elt
    n = 2 * s.batch * s.lq * row  # Q in, O out
    n += 2 * s.batch * s.lt * row  # text K, V
    n += sum(2 * c.k.shape[0] * s.ctx_tokens * row for c in ctxs)  # image K, V (each row once)
    n += sum(c.mask.numel() * 4 for c in ctxs if c.mask is not None)
    return n


def time_ms(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_for(name: str, override: Optional[float]) -> tuple[float, str]:
    if override is not None:
        return override, "--peak-gbps"
    for frag, gbps in KNOWN_PEAK_GBPS:
        if frag.lower() in name.lower():
            return gbps, f"known peak for '{frag}'"
    return DEFAULT_PEAK_GBPS, "default (H100 SXM)"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def git_commit() -> Optional[str]:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except Exception:
        return None


def run(args) -> dict:
    att = load_attention()
    ft = att.fused_triton
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and dtype != torch.float32 and args.quick:
        dtype = torch.float32  # half-precision SDPA on CPU is slow and beside the point of a smoke run
    name = device_name(device)
    peak, peak_src = peak_for(name, args.peak_gbps)
    shapes = quick_shapes() if args.quick else full_shapes()
    if args.only:
        shapes = [s for s in shapes if re.search(args.only, s.name)]
    fused_ok = ft.HAS_TRITON and (device.type == "cuda" or ft.interpreting())
    fused_kind = None if not fused_ok else ("triton-interpreter" if ft.interpreting() else "triton")
    warmup, iters = (args.warmup, args.iters)
    if device.type == "cpu":
        warmup, iters = min(warmup, 1), min(iters, 2)
    gen = torch.Generator().manual_seed(0)
    elt = torch.empty((), dtype=dtype).element_size()

    rows = []
    for s in shapes:
        q, kt, vt, ctxs = make_inputs(att, s, dtype, device, args.masks, gen)
        unfused = lambda: att.decoupled_attention_torch(q, kt, vt, ctxs, s.heads, s.layout)  # noqa: E731
        row = dataclasses.asdict(s)
        row.update(dtype=args.dtype if dtype != torch.float32 else "fp32", masks=args.masks)
        row["unfused_ms"] = time_ms(unfused, device, warmup, iters)
        nbytes = ideal_bytes(s, elt, ctxs)
        row["ideal_bytes"] = nbytes
        row.update(fused_backend=fused_kind, fused_ms=None, fused_unpacked_ms=None, speedup=None,
                   fused_gbps=None, fused_peak_fraction=None, max_abs_diff=None)
        row["unfused_gbps"] = nbytes / row["unfused_ms"] / 1e6
        reason = ft.fused_unsupported_reason(q, kt, vt, ctxs, s.heads, s.layout) if fused_ok else "no kernel"
        if fused_ok and reason is None:
            packed = att.pack_image_contexts(ctxs, s.batch, s.heads, s.layout, dtype=dtype)
            fused = lambda: ft.fused_decoupled_attention(q, kt, vt, packed, s.heads, s.layout)  # noqa: E731
            fused_list = lambda: ft.fused_decoupled_attention(q, kt, vt, ctxs, s.heads, s.layout)  # noqa: E731
            row["max_abs_diff"] = (fused().float() - unfused().float()).abs().max().item()
            row["fused_ms"] = time_ms(fused, device, warmup, iters)
            row["fused_unpacked_ms"] = time_ms(fused_list, device, warmup, iters)
            row["speedup"] = row["unfused_ms"] / row["fused_ms"]
            row["fused_gbps"] = nbytes / row["fused_ms"] / 1e6
            if device.type == "cuda":
                row["fused_peak_fraction"] = row["fused_gbps"] / peak
        elif fused_ok:
            row["fused_skipped"] = reason
        row["unfused_peak_fraction"] = row["unfused_gbps"] / peak if device.type == "cuda" else None
        rows.append(row)
        print_row(row, header=len(rows) == 1)

    return {
        "device": name,
        "device_type": device.type,
        "peak_gbps": peak if device.type == "cuda" else None,
        "peak_source": peak_src if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": getattr(getattr(ft, "triton", None), "__version__", None),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "quick": bool(args.quick),
        "warmup": warmup,
        "iters": iters,
        "timing": "cuda events over back-to-back calls" if device.type == "cuda" else "perf_counter",
        "results": rows,
    }


def _fmt(x, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'shape':28} {'unfused ms':>10} {'fused ms':>9} {'unpacked':>9} {'speedup':>8} "
              f"{'ideal MB':>9} {'GB/s':>8} {'%peak':>6} {'max diff':>9}")
    pf = r.get("fused_peak_fraction")
    print(f"{r['name']:28} {_fmt(r['unfused_ms'], '10.4f')} {_fmt(r['fused_ms'], '9.4f')} "
          f"{_fmt(r['fused_unpacked_ms'], '9.4f')} {_fmt(r['speedup'], '8.2f')} {r['ideal_bytes'] / 1e6:9.2f} "
          f"{_fmt(r['fused_gbps'], '8.1f')} {_fmt(None if pf is None else 100 * pf, '6.1f')} "
          f"{_fmt(r['max_abs_diff'], '9.2e')}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two tiny shapes; works on CPU")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="JSON path (default bench/results/<device-name>[-quick].json)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help=f"device peak bandwidth; default: known value for the detected GPU, else {DEFAULT_PEAK_GBPS} (H100 SXM)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--masks", choices=("all", "first", "none"), default="all",
                   help="which image contexts carry a (B, Lq) region mask")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--only", default=None, help="regex on shape names")
    p.add_argument("--device", default=None, help="torch device (default cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    out = args.out
    if out is None:
        out = ROOT / "bench" / "results" / f"{slug(report['device'])}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
