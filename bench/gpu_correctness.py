"""The fused kernel against the torch reference on a real GPU (no interpreter): the dtypes
and tensor-core paths the CPU tests cannot reach. Prints a table, writes JSON, exits 1 on
any case over its tolerance.

    python bench/gpu_correctness.py [--out bench/results/gpu_correctness.json]"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ipadapter_fused", ROOT / "__init__.py",
                                              submodule_search_locations=[str(ROOT)])
pkg = importlib.util.module_from_spec(spec)
sys.modules["ipadapter_fused"] = pkg
spec.loader.exec_module(pkg)

from ipadapter_fused.attention import ImageContext, decoupled_attention_torch  # noqa: E402
from ipadapter_fused.attention.fused_triton import fused_decoupled_attention  # noqa: E402
from ipadapter_fused.attention.packing import pack_image_contexts  # noqa: E402

TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max abs error, O(1) outputs
CASES = [  # layout, B, H, D, Lq, Lt, image tokens per context
    ("blc", 2, 8, 40, 4096, 77, [4]),
    ("blc", 2, 8, 80, 1024, 77, [16, 16]),
    ("blc", 2, 8, 160, 256, 77, [257]),
    ("blc", 2, 10, 64, 4096, 77, [16, 4, 16, 4]),
    ("blc", 4, 20, 64, 1031, 154, [16]),
    ("bhld", 2, 24, 128, 4096, 512, [128]),
]


def make(layout, b, h, d, lq, lt, tokens, dtype, g):
    def t(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    if layout == "blc":
        q, kt, vt = t(b, lq, h * d), t(b, lt, h * d), t(b, lt, h * d)
        ctxs = [ImageContext(t(2, n, h * d), t(2, n, h * d), weight=0.5 + 0.25 * i,
                             mask=torch.rand(b, lq, generator=g, device="cuda") if i % 2 == 0 else None,
                             batch_index=torch.tensor([1, 0] * (b // 2), device="cuda"))
                for i, n in enumerate(tokens)]
    else:
        q, kt, vt = t(b, h, lq, d), t(b, h, lt, d), t(b, h, lt, d)
        ctxs = [ImageContext(t(b, h, n, d), t(b, h, n, d), weight=0.7) for n in tokens]
    return q, kt, vt, ctxs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_correctness.json"))
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, failed = [], 0
    print(f"{torch.cuda.get_device_name()}\n{'case':<48}{'dtype':>10}{'max err':>12}{'tol':>9}")
    for layout, b, h, d, lq, lt, tokens in CASES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q, kt, vt, ctxs = make(layout, b, h, d, lq, lt, tokens, dtype, g)
            up = lambda x: x.float()
            ref_ctx = [ImageContext(up(c.k), up(c.v), c.weight, c.mask, c.batch_index) for c in ctxs]
            ref = decoupled_attention_torch(up(q), up(kt), up(vt), ref_ctx, h, layout)
            got = fused_decoupled_attention(q, kt, vt, pack_image_contexts(ctxs, b, h, layout), h, layout)
            err = (got.float() - ref).abs().max().item()
            ok = err <= TOL[dtype]
            failed += not ok
            name = f"{layout} B{b} H{h} D{d} Lq{lq} Lt{lt} img{tokens}"
            print(f"{name:<48}{str(dtype)[6:]:>10}{err:>12.2e}{TOL[dtype]:>9.0e}{'' if ok else '  FAIL'}")
            rows.append({"case": name, "dtype": str(dtype), "max_abs_err": err, "tol": TOL[dtype], "ok": ok})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "cases": rows}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
