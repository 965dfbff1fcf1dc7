"""Per-step overhead of image prompts on DiTs (Flux, Chroma, SD3.5), inside the real host.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_dit.py [--threads 1] [--latents 16,32] [--steps 4]
    python bench/bench_dit.py --device cuda            # Flux-/SD3.5-size single blocks, bf16 (GPU)
    python bench/bench_dit.py --quick --out x.json     # tiniest settings (the smoke test)

Three parts, each in the printed table and the JSON:

1. Models (CPU; `--no-models` skips): tiny DiTs built from the host's own Flux, Chroma and SD3 classes
   (tests/host/dit_models.py) sampled with the host's sampler, without an adapter and with XLabs /
   InstantX Flux / InstantX SD3.5 adapters applied by the pack's apply function (random weights in the
   published key layouts, real image-token counts: XLabs v2 16, InstantX Flux 128, SD3.5 64). Seconds
   per step are timed between the sampler's step callbacks, the first step left out (it holds the run's
   set-up and the K/V); variants run in interleaved rounds, the ratio is taken within each round. The
   one-time cost is the K/V of every layer (and, for SD3.5, the time-conditioned resampler: that one is
   paid on every step). ComfyUI_IPAdapter_plus never supported DiTs: there is no column to fill.
   On CPU every time is also taken as the process's CPU time (time.process_time), which leaves out
   the time spent waiting for a core: on a machine shared with other jobs that is the steadier figure
   (with one torch thread it is the work; with more it also counts threads spinning at barriers).
2. Query recovery (`--no-unrotate` skips): the adapters read the image-stream query before RoPE, the
   host's attention sees it after. nodes.dit_patch.unrotate rotates it back; the alternative is to
   recompute it from the block's input (LayerNorm, modulation, the q slice of the QKV projection, the
   RMS norm), or the full QKV projection. Flux size by default (B=1, 4096 image + 512 text tokens,
   24 heads x 128).
3. Blocks (`--blocks`, default on CUDA): ONE host DoubleStreamBlock / SingleStreamBlock (Flux) and one
   SD3 JointBlock (SD3.5-Large width) with random weights, called the way the host's forward calls a
   dit replacement, without and with the pack's DitBlockPatch (torch path, and "auto": the fused kernel
   where it applies); the inputs are copied on every call (the host's blocks add to them in place),
   in both variants. `--shapes flux` is the real width (3072 / 24 heads, SD3.5: 2432 / 38 heads, 4096
   image tokens); `--shapes mid` keeps the real head dims at width 1024 and 1024 image tokens (a CPU can
   run it); `--shapes small` runs anywhere (the smoke test). From the block times it estimates a
   full model's step (Flux: 19 double + 38 single blocks; SD3.5-Large: 38 joint blocks).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "bench", ROOT / "tests", ROOT / "tests" / "host"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

FAMILIES = {"flux": ("xlabs", "instantx-flux"), "chroma": ("xlabs", "instantx-flux"), "sd3": ("instantx-sd3",)}
IP_TOKENS = {"xlabs": 16, "instantx-flux": 128, "instantx-sd3": 64}  # XLabs v2 / InstantX as published
ENCODER = {"xlabs": "clip", "instantx-flux": "siglip", "instantx-sd3": "siglip"}
# Flux dev is guidance-distilled (cfg 1: one model call per step); Chroma and SD3.5 sample with CFG.
CFG = {"flux": 1.0, "chroma": 4.0, "sd3": 4.5}
FAMILY_NAMES = {"xlabs": "XLabs", "instantx-flux": "InstantX Flux", "instantx-sd3": "InstantX SD3.5"}
IPAPLUS = "n/a: ComfyUI_IPAdapter_plus has no DiT support"
# Block shapes: (hidden, heads, image tokens, text tokens, latent side)
BLOCK_SHAPES = {
    "flux": {"flux": (3072, 24, 4096, 512, 128), "sd3": (2432, 38, 4096, 333, 128)},
    "mid": {"flux": (1024, 8, 1024, 128, 64), "sd3": (1024, 16, 1024, 128, 64)},  # real head dims; CPU-sized
    "small": {"flux": (128, 2, 64, 16, 16), "sd3": (128, 2, 64, 16, 16)},
}
FULL_MODEL = {"double": 19, "single": 38, "joint": 38}  # FLUX.1-dev, SD3.5-Large


def _load_pack():
    from bench_apply import _load_pack as load
    if "ipadapter_fused" not in sys.modules:
        load()


def cpu_model() -> str:
    from bench_server import cpu_model as name
    return name()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def _host(device: str):
    """The host's modules: on CPU through tests/host/util.py (which forces the CPU); on a GPU the host
    is imported as it is, so it picks its CUDA attention."""
    import util
    if device == "cpu":
        return util.prepare_host()
    path = util.host_path()
    if path is None:
        raise SystemExit(f"no host: set ${util.HOST_ENV} to a ComfyUI folder")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options  # noqa: F401
    import comfy.model_management  # noqa: F401
    import torch
    return type("Host", (), {"torch": torch, "path": path})


def _spread(values):
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values), "samples": list(values)}


# --------------------------------------------------------------------------------------------------
# 1. Tiny models, sampled
# --------------------------------------------------------------------------------------------------
def _adapter(tmp: Path, family: str, kind: str, tokens: int):
    """A random adapter in the family's published layout for the tiny `kind` model, read back by the
    pack's loader (as the host test's tiny_adapter does, with the real image-token count)."""
    import comfy.model_patcher
    import torch

    import dit_models
    from ipadapter_fused.models import load_adapter_file
    from ipadapter_fused.models.synthetic import save_synthetic_dit_adapter
    from ipadapter_fused.nodes.dit_sites import dit_model
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from test_dit_adapters_host import ENCODER_WIDTH

    model = dit_model(dit_models.diffusion_model(dit_models.build_dit(kind)))
    kinds = [s.block for s in model.blocks]
    dims = dict(hidden=model.hidden_size, heads=model.heads, tokens=tokens, encoder_width=ENCODER_WIDTH,
                double_blocks=len(kinds) - kinds.count("single"))
    if kind != "sd3":
        dims.update(single_blocks=kinds.count("single"))
    path = tmp / f"{family}_{kind}.safetensors"
    save_synthetic_dit_adapter(path, family, **dims)
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(weights, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return LoadedAdapter(name=path.name, weights=weights, patcher=patcher)


def _step_times(patcher, kind, latent, steps, cfg, pos, neg, seed):
    """(wall, CPU) seconds of each sampling step, from the sampler's step callbacks. CPU time is the
    process's (time.process_time): on shared cores it leaves out the time the process waited for a core."""
    host = _host("cpu")
    torch = host.torch
    noise = host.sample.prepare_noise(latent, seed)
    stamps = []
    t0 = (time.perf_counter(), time.process_time())
    with torch.inference_mode():
        host.sample.sample(patcher, noise, steps, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                           seed=seed, callback=lambda *a: stamps.append((time.perf_counter(), time.process_time())))
    edges = [t0] + stamps
    return ([b[0] - a[0] for a, b in zip(edges, edges[1:])], [b[1] - a[1] for a, b in zip(edges, edges[1:])])


def _one_time_cost(patched, kind, reps):
    """Seconds to compute every layer's K/V from the prompt's tokens (SD3.5: the resampler for one
    timestep first, then the K/V; that is paid on every step). Median of `reps`."""
    import torch

    from ipadapter_fused.nodes.dit_patch import dit_prompts

    prompt = dit_prompts(patched.model_options)[0]
    step = 500.0 if prompt.per_step else None
    times = []
    for _ in range(reps):
        prompt.release()
        t0 = time.perf_counter()
        for layer in range(len(prompt.site_weights)):
            prompt.layer_kv(layer, torch.device("cpu"), torch.float32, step)
        times.append(time.perf_counter() - t0)
    prompt.release()
    return statistics.median(times), len(prompt.site_weights)


def bench_models(args):
    _host("cpu")
    import dit_models
    from ipadapter_fused.nodes.apply import apply_adapter
    from ipadapter_fused.nodes.dit_sites import dit_model
    from test_dit_adapters_host import image, tiny_encoder

    tmp = Path(tempfile.mkdtemp(prefix="bench_dit_"))
    encoders = {k: tiny_encoder(tmp, k) for k in ("clip", "siglip")}
    img = image(1)
    rows = []
    for kind in args.kinds:
        base = dit_models.build_dit(kind)
        hidden = dit_model(dit_models.diffusion_model(base)).hidden_size
        cfg = CFG[kind]
        variants = {"without adapter": base}
        info = {}
        for family in FAMILIES[kind]:
            adapter = _adapter(tmp, family, kind, IP_TOKENS[family])
            cv = encoders[ENCODER[family]]
            apply_times = []
            for _ in range(max(1, args.rounds)):
                t0 = time.perf_counter()
                patched = apply_adapter(base, adapter, cv, img, weight=0.8)
                apply_times.append(time.perf_counter() - t0)
            variants[family] = patched
            kv_s, layers = _one_time_cost(patched, kind, max(1, args.rounds))
            info[family] = {"apply_s": statistics.median(apply_times), "kv_s": kv_s, "layers": layers,
                            "kv_when": "every step" if family == "instantx-sd3" else "once per run"}
        for latent_side in args.latents:
            n_img = ((latent_side + 1) // 2) ** 2
            text = max(8, n_img // 8)  # Flux at 1024 px: 4096 image rows, 512 text rows
            pos = dit_models.make_dit_cond(kind, base, seed=1, tokens=text)
            neg = dit_models.make_dit_cond(kind, base, seed=2, tokens=text)
            latent = dit_models.dit_latent(kind, latent_side)
            names = list(variants)
            for name in names:  # warm-up
                _step_times(variants[name], kind, latent, 2, cfg, pos, neg, 0)
            per_round = {n: [] for n in names}
            cpu_round = {n: [] for n in names}
            first = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t, c = _step_times(variants[name], kind, latent, args.steps, cfg, pos, neg, r)
                    per_round[name].append(statistics.median(t[1:]))
                    cpu_round[name].append(statistics.median(c[1:]))
                    first[name].append(t[0])
            base_s = per_round["without adapter"]
            base_c = cpu_round["without adapter"]
            for family in FAMILIES[kind]:
                ratios = [p / b for p, b in zip(per_round[family], base_s)]
                extra_ms = [1000 * (p - b) for p, b in zip(per_round[family], base_s)]
                cpu_ratios = [p / b for p, b in zip(cpu_round[family], base_c)]
                rows.append({
                    "model": kind, "family": family, "latent": latent_side, "image_tokens": n_img,
                    "text_tokens": text, "cfg": cfg, "model_calls_batch": 1 if cfg == 1.0 else 2,
                    "ip_tokens": IP_TOKENS[family], "hidden": hidden,
                    "layers": info[family]["layers"],
                    "without_s_per_step": statistics.median(base_s),
                    "with_s_per_step": statistics.median(per_round[family]),
                    "overhead_pct": 100 * (statistics.median(ratios) - 1),
                    "overhead_pct_range": [100 * (min(ratios) - 1), 100 * (max(ratios) - 1)],
                    "overhead_ms": statistics.median(extra_ms),
                    "without_cpu_s_per_step": statistics.median(base_c),
                    "with_cpu_s_per_step": statistics.median(cpu_round[family]),
                    "overhead_cpu_pct": 100 * (statistics.median(cpu_ratios) - 1),
                    "overhead_cpu_pct_range": [100 * (min(cpu_ratios) - 1), 100 * (max(cpu_ratios) - 1)],
                    "overhead_cpu_ms": statistics.median(1000 * (p - b) for p, b in zip(cpu_round[family], base_c)),
                    "first_step_s": {"without": statistics.median(first["without adapter"]),
                                     "with": statistics.median(first[family])},
                    "one_time_kv_s": info[family]["kv_s"], "kv_when": info[family]["kv_when"],
                    "apply_s": info[family]["apply_s"],
                    "per_round_s": {"without": base_s, "with": per_round[family]},
                    "per_round_cpu_s": {"without": base_c, "with": cpu_round[family]},
                    "ipadapter_plus": IPAPLUS,
                })
    return rows


def format_models(rows) -> str:
    head = (f"{'model':<7}{'latent':>7}{'img/txt':>10}{'cfg':>5}  {'adapter':<15}{'ip tok':>7}"
            f"{'without s/step':>15}{'with':>8}{'wall +%':>9}{'(range)':>16}{'ms':>7}"
            f"{'CPU-time +%':>13}{'(range)':>16}{'ms':>7}"
            f"{'K/V (+proj)':>13}  {'when':<12}{'apply s':>8}  IPAdapter_plus")
    lines = [head]
    for r in rows:
        lo, hi = r["overhead_pct_range"]
        clo, chi = r["overhead_cpu_pct_range"]
        lines.append(
            f"{r['model']:<7}{r['latent']:>7}{r['image_tokens']:>6}/{r['text_tokens']:<3}{r['cfg']:>5.1f}  "
            f"{FAMILY_NAMES[r['family']]:<15}{r['ip_tokens']:>7}{r['without_s_per_step']:>15.4f}"
            f"{r['with_s_per_step']:>8.4f}{r['overhead_pct']:>8.1f}%{f'({lo:.0f}..{hi:.0f}%)':>16}"
            f"{r['overhead_ms']:>7.2f}{r['overhead_cpu_pct']:>12.1f}%{f'({clo:.0f}..{chi:.0f}%)':>16}"
            f"{r['overhead_cpu_ms']:>7.2f}{1000 * r['one_time_kv_s']:>10.2f} ms  {r['kv_when']:<12}"
            f"{r['apply_s']:>8.3f}  n/a (no DiT support)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Timing helpers (CPU: wall clock; CUDA: events over back-to-back calls)
# --------------------------------------------------------------------------------------------------
def _time_ms(fn, device, reps: int, inner: int = 1) -> float:
    """Median milliseconds of one call of fn over `reps` samples of `inner` back-to-back calls."""
    return statistics.median(_time_both(fn, device, inner)[0] for _ in range(reps))


def _time_both(fn, device, inner: int = 1):
    """(wall ms, CPU ms or None) of one call of fn, over `inner` back-to-back calls. CPU ms: the
    process's CPU time (CPU devices only)."""
    if device.type != "cuda":
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        return 1000 * (time.perf_counter() - t0) / inner, 1000 * (time.process_time() - c0) / inner
    return _time_cuda(fn, inner), None


def _time_cuda(fn, inner: int) -> float:
    """CUDA events around `inner` back-to-back calls (launch overhead counts), ms per call."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / inner


def _interleaved_ms(fns: dict, device, rounds: int, inner: int) -> dict:
    """Per variant: median over rounds of its per-call ms, the variants' order rotating by round
    (on CPU also the process's CPU ms, under "cpu")."""
    names = list(fns)
    for name in names:  # warm-up (allocator, kernels, caches)
        _time_both(fns[name], device, 2)
    got = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, c = _time_both(fns[name], device, inner)
            got[name].append(wall)
            cpu[name].append(c)
    out = {n: _spread(v) for n, v in got.items()}
    if device.type != "cuda":
        for n in names:
            out[n]["cpu"] = _spread(cpu[n])
    return out


def _flux_pe(host_layers, torch, txt: int, side: int, head_dim: int, device):
    """pe (1, 1, txt + side^2, head_dim/2, 2, 2) from the host's EmbedND over Flux's ids
    (text rows: zeros; image rows: (0, row, column) of the patch grid)."""
    axes = [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), dim=-1)
    img_ids = torch.cat([torch.zeros(side * side, 1), grid.reshape(-1, 2).float()], dim=1)
    ids = torch.cat([torch.zeros(txt, 3), img_ids])[None].to(device)
    return host_layers.EmbedND(dim=head_dim, theta=10000, axes_dim=axes)(ids)


# --------------------------------------------------------------------------------------------------
# 2. Pre-RoPE query: rotate back vs recompute
# --------------------------------------------------------------------------------------------------
def bench_unrotate(args, device, dtype):
    host = _host(device.type)
    torch = host.torch
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.flux.math as fmath
    import torch.nn.functional as F

    from ipadapter_fused.nodes.dit_patch import unrotate

    hidden, heads, n_img, txt, _ = BLOCK_SHAPES[args.shapes]["flux"] if args.unrotate_shapes is None \
        else BLOCK_SHAPES[args.unrotate_shapes]["flux"]
    side = int(round(n_img ** 0.5))
    d = hidden // heads
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        pe = _flux_pe(layers, torch, txt, side, d, device)[:, :, txt:]
        x = torch.randn(1, n_img, hidden, generator=g).to(device, dtype)            # the block's image input
        w = (torch.randn(3 * hidden, hidden, generator=g) / hidden ** 0.5).to(device, dtype)  # img_attn.qkv
        b = (0.02 * torch.randn(3 * hidden, generator=g)).to(device, dtype)
        shift, scale = (0.1 * torch.randn(2, 1, 1, hidden, generator=g)).to(device, dtype)
        gain = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)          # the q RMSNorm scale

        def q_from(qkv_out):
            q = qkv_out.reshape(1, n_img, -1, heads, d)[:, :, 0].transpose(1, 2)
            qf = q.float()
            return (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + 1e-6) * gain.float()).to(dtype)

        def modulated():
            return (1 + scale) * F.layer_norm(x, (hidden,), eps=1e-6) + shift

        def recompute_q():  # only the q third of the projection's rows
            return q_from(F.linear(modulated(), w[:hidden], b[:hidden]))

        def recompute_qkv():
            return q_from(F.linear(modulated(), w, b))

        q_pre = recompute_qkv()
        q_rot = fmath.apply_rope1(q_pre, pe)  # what the host's attention receives
        err = float((unrotate(q_rot, pe).float() - q_pre.float()).abs().max() / q_pre.float().abs().max())
        fns = {"unrotate (pack)": lambda: unrotate(q_rot, pe),
               "recompute q (norm, modulation, q slice of QKV, RMS norm)": recompute_q,
               "recompute QKV (full projection)": recompute_qkv}
        ms = _interleaved_ms(fns, device, args.block_rounds, args.inner)
    result = {"batch": 1, "image_tokens": n_img, "text_tokens": txt, "heads": heads, "head_dim": d,
              "hidden": hidden, "dtype": str(dtype).replace("torch.", ""), "ms": ms,
              "unrotate_max_rel_error": err,
              "recompute_q_over_unrotate": ms["recompute q (norm, modulation, q slice of QKV, RMS norm)"]["median"]
              / ms["unrotate (pack)"]["median"]}
    return result


def format_unrotate(r) -> str:
    lines = [f"pre-RoPE query, B=1, {r['image_tokens']} image rows (+{r['text_tokens']} text), {r['heads']} heads x "
             f"{r['head_dim']}, {r['dtype']}; unrotate(rope(q)) vs q: max rel error {r['unrotate_max_rel_error']:.1e}"]
    for name, s in r["ms"].items():
        cpu = f"; CPU time {s['cpu']['median']:.3f} ms" if "cpu" in s else ""
        lines.append(f"  {name:<58}{s['median']:>10.3f} ms  ({s['min']:.3f}..{s['max']:.3f}){cpu}")
    lines.append(f"  recompute q / unrotate: {r['recompute_q_over_unrotate']:.1f}x")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# 3. One block, unpatched vs patched
# --------------------------------------------------------------------------------------------------
def _init_(module, seed: int):
    """Random weights for a block the host built uninitialised: matrices N(0, 1/fan_in), norm gains
    near 1, biases and other vectors small."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
            elif "norm" in name or name.endswith("scale"):
                v = 1 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = 0.02 * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))
    return module


def _block_prompt(family, hidden, heads, device, dtype, sd3_encoder_rows):
    """An ImagePrompt of a random adapter for one block of this width, built with the pack's own
    functions (dit_tokens, dit_kv_fn). Layers: XLabs 1 double; InstantX Flux 1 double + 2 single
    (the published 1:2 split); SD3.5 1 joint. Encoder widths are small for the Flux adapters (their
    projection runs once per run, not per step); SD3.5's resampler has the published size on
    the flux shapes, since it runs on every step."""
    import torch

    from ipadapter_fused.models import DiTAdapterWeights, synthetic_dit_adapter_state
    from ipadapter_fused.nodes.dit_apply import dit_kv_fn, dit_tokens
    from ipadapter_fused.nodes.prompt import ImagePrompt
    from ipadapter_fused.nodes.schedules import SiteWeight

    big = hidden >= 2048
    dims = dict(hidden=hidden, heads=heads, tokens=IP_TOKENS[family], double_blocks=1)
    g = torch.Generator(device="cpu").manual_seed(3)
    if family == "instantx-sd3":
        dims.update(encoder_width=1152 if big else 32, resampler_dim=1280 if big else 64,
                    resampler_depth=4 if big else 1, time_embed_in=320 if big else 32)
        emb = torch.randn(1, sd3_encoder_rows, dims["encoder_width"], generator=g)
        pos, neg = emb, torch.zeros_like(emb)
    else:
        dims.update(encoder_width=32, context_dim=4096 if big else 32)
        if family == "instantx-flux":
            dims.update(single_blocks=2)
        pos = torch.randn(1, 32, generator=g)
        neg = pos if family == "instantx-flux" else torch.randn(1, 32, generator=g)
    weights = DiTAdapterWeights.from_state(synthetic_dit_adapter_state(family, **dims)).to(device, dtype).eval()
    tokens = dit_tokens(weights, pos, neg)
    n = len(weights.spec.layer_blocks)
    return ImagePrompt(weights, tokens, [SiteWeight(1.0)] * n, 1e9, 0.0, "V only", kv_fn=dit_kv_fn(heads),
                       per_step=weights.spec.time_conditioned)


def bench_blocks(args, device, dtype):
    host = _host(device.type)
    torch = host.torch
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops

    from ipadapter_fused.nodes.dit_patch import RUN_KEY, DitBlockPatch, ModelCall

    ops = comfy.ops.disable_weight_init
    backends = args.backends
    out = []
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    cases = [("flux", "double", "xlabs", 0), ("flux", "double", "instantx-flux", 0),
             ("flux", "single", "instantx-flux", 1), ("sd3", "joint", "instantx-sd3", 0)]
    blocks = {}
    failed = []
    with torch.inference_mode():
        for model, kind, family, layer in cases:
            try:  # one failing case (a dtype, a backend on this GPU) must not cost the others
                hidden, heads, n_img, txt, side = BLOCK_SHAPES[args.shapes][model]
                batch = 2 if model == "sd3" else 1  # SD3.5 samples with CFG: cond + uncond rows
                d = hidden // heads
                if (model, kind) not in blocks:
                    if kind == "double":
                        block = layers.DoubleStreamBlock(hidden, heads, mlp_ratio=4.0, qkv_bias=True, dtype=dtype,
                                                         device=device, operations=ops)
                    elif kind == "single":
                        block = layers.SingleStreamBlock(hidden, heads, mlp_ratio=4.0, dtype=dtype, device=device,
                                                         operations=ops)
                    else:
                        block = mmdit.JointBlock(hidden, heads, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch",
                                                 pre_only=False, rmsnorm=False, scale_mod_only=False, swiglu=False,
                                                 qk_norm="rms", x_block_self_attn=False, dtype=dtype, device=device,
                                                 operations=ops)
                    blocks[(model, kind)] = _init_(block, seed=len(blocks)).eval()
                block = blocks[(model, kind)]
                options = {RUN_KEY: ModelCall((side, side), 500.0, txt), "sigmas": torch.tensor([0.5]),
                           "cond_or_uncond": [1, 0] if batch == 2 else [0]}
                img, ctx, vec = rand(batch, n_img, hidden), rand(batch, txt, hidden), rand(batch, hidden)
                # the dict the host's forward passes to a dit replacement, and its original_block
                if kind == "double":
                    pe = _flux_pe(layers, torch, txt, side // 2, d, device)
                    args_ = {"img": img, "txt": ctx, "vec": vec, "pe": pe, "attn_mask": None,
                             "transformer_options": options}

                    def original(a, block=block):  # the host's blocks add to their inputs in place: copies
                        o = {}
                        o["img"], o["txt"] = block(img=a["img"].clone(), txt=a["txt"].clone(), vec=a["vec"], pe=a["pe"],
                                                   attn_mask=a.get("attn_mask"),
                                                   transformer_options=a["transformer_options"])
                        return o
                elif kind == "single":
                    args_ = {"img": torch.cat([ctx, img], 1), "vec": vec,
                             "pe": _flux_pe(layers, torch, txt, side // 2, d, device), "attn_mask": None,
                             "transformer_options": options}

                    def original(a, block=block):
                        return {"img": block(a["img"].clone(), vec=a["vec"], pe=a["pe"], attn_mask=a.get("attn_mask"),
                                             transformer_options=a["transformer_options"])}
                else:
                    args_ = {"img": img, "txt": ctx, "vec": vec, "transformer_options": options}

                    def original(a, block=block):
                        o = {}
                        o["txt"], o["img"] = block(a["txt"].clone(), a["img"].clone(), c=a["vec"],
                                                   transformer_options=a["transformer_options"])
                        return o
                prompt = _block_prompt(family, hidden, heads, device, dtype,
                                       sd3_encoder_rows=729 if hidden >= 2048 else 16)
                norms = (block.x_block.attn.ln_q, block.x_block.attn.ln_k) if kind == "joint" else ()
                key = ("single_block" if kind == "single" else "double_block", 0)
                patches = {b: DitBlockPatch(key, kind, 2, family, ((prompt, layer),), backend=b, block_norms=norms)
                           for b in backends}
                fns = {"unpatched": lambda: original(args_)}
                plain = original(args_)["img"].float()
                term_rel, errors = {}, {}
                for b, p in patches.items():
                    try:  # a backend that fails on this shape is reported, not fatal to the rest
                        got = p(args_, {"original_block": original})["img"].float()
                    except Exception as e:  # noqa: BLE001
                        errors[b] = f"{type(e).__name__}: {e}"
                        continue
                    term_rel[b] = float((got - plain).abs().max() / plain.abs().max())
                    fns[f"patched ({b})"] = (lambda p=p: p(args_, {"original_block": original}))
                ms = _interleaved_ms(fns, device, args.block_rounds, args.inner)
                ok = [b for b in backends if b not in errors]
                # K/V of this layer for the run (SD3.5: resampler + K/V, every step), cold
                step = 500.0 if prompt.per_step else None

                def cold_kv():
                    prompt.release()
                    return prompt.layer_kv(layer, device, dtype, step)
                kv_ms = _time_ms(cold_kv, device, max(3, args.block_rounds), 1)
                proj_ms = None
                if prompt.per_step:
                    def project():
                        t = torch.full((prompt.tokens[0].shape[0],), 500.0, device=device, dtype=dtype)
                        return [prompt.weights.project(row.to(device, dtype), t) for row in prompt.tokens]
                    proj_ms = _time_ms(project, device, max(3, args.block_rounds), 1)
                prompt.release()
                out.append({"model": model, "block": kind, "family": family, "hidden": hidden, "heads": heads,
                            "head_dim": d, "batch": batch, "image_tokens": n_img, "text_tokens": txt,
                            "ip_tokens": IP_TOKENS[family], "dtype": str(dtype).replace("torch.", ""), "ms": ms,
                            # within each round (the variants ran next to each other), then the median
                            "overhead_ms": {b: _per_round(ms, b, lambda p, u: p - u) for b in ok},
                            "overhead_pct": {b: _per_round(ms, b, lambda p, u: 100 * (p / u - 1)) for b in ok},
                            "overhead_cpu_ms": {b: _per_round(ms, b, lambda p, u: p - u, cpu=True) for b in ok}
                            if device.type != "cuda" else None,
                            "overhead_cpu_pct": {b: _per_round(ms, b, lambda p, u: 100 * (p / u - 1), cpu=True)
                                                 for b in ok} if device.type != "cuda" else None,
                            "term_rel_change": term_rel, "errors": errors, "kv_layer_cold_ms": kv_ms,
                            "projection_ms": proj_ms})
            except Exception as e:  # noqa: BLE001
                failed.append({"model": model, "block": kind, "family": family,
                               "error": f"{type(e).__name__}: {e}"})
                print(f"block case {model} {kind} {family} failed: {type(e).__name__}: {e}", file=sys.stderr)
    return out, full_model_estimate(out, backends), failed


def _per_round(ms, backend, f, cpu=False):
    pick = (lambda m: m["cpu"]["samples"]) if cpu else (lambda m: m["samples"])
    pairs = zip(pick(ms[f"patched ({backend})"]), pick(ms["unpatched"]))
    return statistics.median(f(p, u) for p, u in pairs)


def full_model_estimate(rows, backends) -> dict:
    """Per-step estimate for FLUX.1-dev (19 double + 38 single blocks) and SD3.5-Large (38 joint) from
    one block of each kind: the blocks only (embedders and final layer left out)."""
    # on CPU the process's CPU time (steadier on shared cores), on a GPU the events' time
    cpu = bool(rows) and all(r.get("overhead_cpu_ms") for r in rows)
    key = "overhead_cpu_ms" if cpu else "overhead_ms"
    rows = [dict(r, overhead_ms=r[key]) for r in rows]
    by = {(r["family"], r["block"]): r for r in rows}
    backends = [b for b in backends if all(b in r["overhead_ms"] for r in rows)]
    n_dbl, n_sgl, n_joint = FULL_MODEL["double"], FULL_MODEL["single"], FULL_MODEL["joint"]

    def unpatched(row):
        return row["ms"]["unpatched"]["cpu"]["median"] if cpu else row["ms"]["unpatched"]["median"]

    est = {}
    dbl = by.get(("xlabs", "double")) or by.get(("instantx-flux", "double"))
    sgl = by.get(("instantx-flux", "single"))
    for b in backends:
        if dbl and sgl:
            base = n_dbl * unpatched(dbl) + n_sgl * unpatched(sgl)
            terms = {}
            if ("xlabs", "double") in by:
                terms["flux xlabs"] = n_dbl * by[("xlabs", "double")]["overhead_ms"][b]
            if ("instantx-flux", "double") in by:
                terms["flux instantx"] = (n_dbl * by[("instantx-flux", "double")]["overhead_ms"][b]
                                          + n_sgl * sgl["overhead_ms"][b])
            for name, x in terms.items():
                est[f"{name} ({b})"] = {"blocks_ms": base, "overhead_ms": x, "overhead_pct": 100 * x / base,
                                        "basis": "CPU time" if cpu else "wall"}
        j = by.get(("instantx-sd3", "joint"))
        if j:
            # The patched joint block computes its layer's K/V on every call (they change with the step);
            # the resampler runs once per step, on the step's first block, and is shared by the others.
            base = n_joint * unpatched(j)
            x = n_joint * j["overhead_ms"][b] + (j["projection_ms"] or 0.0)
            est[f"sd3.5-large instantx ({b})"] = {"blocks_ms": base, "overhead_ms": x, "overhead_pct": 100 * x / base,
                                                  "of_which_resampler_ms": j["projection_ms"],
                                                  "basis": "CPU time" if cpu else "wall"}
    return est


def format_blocks(rows, est) -> str:
    lines = [f"{'block':<13}{'adapter':<16}{'B':>2}{'img+txt':>11}{'ip':>5}{'unpatched ms':>14}  "
             f"patched ms per backend (overhead)   K/V cold ms"]
    for r in rows:
        parts = []
        for b in r["overhead_ms"]:
            part = (f"{b} {r['ms'][f'patched ({b})']['median']:.3f} ({r['overhead_ms'][b]:+.3f} ms, "
                    f"{r['overhead_pct'][b]:+.1f}%")
            if r.get("overhead_cpu_ms"):
                part += f"; CPU time {r['overhead_cpu_ms'][b]:+.3f} ms, {r['overhead_cpu_pct'][b]:+.1f}%"
            parts.append(part + ")")
        parts += [f"{b} failed" for b in r["errors"]]
        lines.append(f"{r['model'] + ' ' + r['block']:<13}{FAMILY_NAMES[r['family']]:<16}{r['batch']:>2}"
                     f"{r['image_tokens']:>6}+{r['text_tokens']:<4}{r['ip_tokens']:>5}"
                     f"{r['ms']['unpatched']['median']:>14.3f}  {' | '.join(parts)}   {r['kv_layer_cold_ms']:.3f}")
        for b, e in r["errors"].items():
            lines.append(f"    backend {b}: {e}")
    for name, e in est.items():
        lines.append(f"  x19 double + 38 single (Flux) / x38 joint (SD3.5-L), {name}: blocks {e['blocks_ms']:.1f} "
                     f"ms/step, image prompt {e['overhead_ms']:+.2f} ms ({e['overhead_pct']:+.2f}%, {e['basis']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--kinds", default="flux,chroma,sd3", help="tiny models to sample (comma list)")
    ap.add_argument("--latents", default="16,32", help="latent sides (16 -> 64 image tokens, 32 -> 256)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per run (the first is left out)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every variant once per round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-models", action="store_true", help="skip the tiny-model sampling part")
    ap.add_argument("--no-unrotate", action="store_true", help="skip the query-recovery comparison")
    ap.add_argument("--blocks", action=argparse.BooleanOptionalAction, default=None,
                    help="single-block timing (default: on for cuda, off for cpu)")
    ap.add_argument("--shapes", choices=sorted(BLOCK_SHAPES), default=None,
                    help="block shapes: flux (real width; default on cuda), mid (CPU-sized, real head dims) or small "
                         "(default on cpu)")
    ap.add_argument("--unrotate-shapes", choices=sorted(BLOCK_SHAPES), default="flux",
                    help="shapes of the query-recovery comparison (default flux)")
    ap.add_argument("--block-rounds", type=int, default=None, help="rounds for block/unrotate timing")
    ap.add_argument("--inner", type=int, default=None, help="back-to-back calls per timed sample")
    ap.add_argument("--backends", default=None,
                    help="patched variants' attention backends (default: torch,auto on cuda, torch on cpu)")
    ap.add_argument("--dtype", default=None, help="block dtype (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--quick", action="store_true", help="tiniest settings (smoke test)")
    ap.add_argument("--note", default="", help="what the machine was doing")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/dit_<device>_<name>[_tN].json)")
    args = ap.parse_args(argv)

    host = _host("cpu" if args.device == "cpu" else "cuda")
    torch = host.torch
    _load_pack()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.kinds, args.latents, args.steps, args.rounds = args.kinds, "8", 2, 1
        args.unrotate_shapes = "small"
        args.shapes = args.shapes or "small"
        args.block_rounds = args.block_rounds or 1
        args.inner = args.inner or 1
        if args.blocks is None:
            args.blocks = True
    args.kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in args.kinds if k not in FAMILIES]
    if bad:
        raise SystemExit(f"unknown model kind(s) {bad}; choose from {', '.join(FAMILIES)}")
    args.latents = [int(x) for x in str(args.latents).split(",") if x]
    args.blocks = cuda if args.blocks is None else args.blocks
    args.shapes = args.shapes or ("flux" if cuda else "small")
    args.block_rounds = args.block_rounds or (5 if cuda else 3)
    args.inner = args.inner or (10 if cuda else 1)
    args.backends = [b for b in (args.backends or ("torch,auto" if cuda else "torch")).split(",") if b]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if cuda and not args.no_models:
        args.no_models = True  # the tiny-model part samples through the CPU-forced host

    load_start = os.getloadavg()
    result = {"device": args.device, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "hostname": platform.node(),
              "gpu": torch.cuda.get_device_name(device) if cuda else None, "quick": args.quick,
              "loadavg_start": list(load_start), "note": args.note, "ipadapter_plus": IPAPLUS,
              "settings": {"kinds": args.kinds, "latents": args.latents, "steps": args.steps, "rounds": args.rounds,
                           "shapes": args.shapes, "unrotate_shapes": args.unrotate_shapes,
                           "block_rounds": args.block_rounds, "inner": args.inner, "dtype": str(dtype),
                           "backends": args.backends}}
    text = []
    if not args.no_models:
        result["models"] = bench_models(args)
        text.append(f"Tiny DiTs from the host's classes, sampled on CPU ({torch.get_num_threads()} threads); s/step "
                    f"= median of steps 2..{args.steps} per run, median over {args.rounds} interleaved rounds")
        text.append(format_models(result["models"]))
    if not args.no_unrotate:
        result["unrotate"] = bench_unrotate(args, device, torch.float32 if not cuda else dtype)
        text.append(format_unrotate(result["unrotate"]))
    if args.blocks:
        rows, est, failed = bench_blocks(args, device, dtype)
        result["blocks"], result["full_model_estimate"], result["blocks_failed"] = rows, est, failed
        text.append(f"One block, {args.shapes} shapes, {result['settings']['dtype']} on {result['gpu'] or 'cpu'}: "
                    "ms per call, median over interleaved rounds")
        text.append(format_blocks(rows, est))
    result["loadavg_end"] = list(os.getloadavg())
    print("\n\n".join(text))
    if args.out:
        out = Path(args.out)
    else:
        name = _slug(result["gpu"]) if cuda else f"cpu_{_slug(result['cpu'])}_t{result['threads']}"
        out = ROOT / "bench" / "results" / f"dit_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nload average {load_start[0]:.2f} -> {result['loadavg_end'][0]:.2f}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
