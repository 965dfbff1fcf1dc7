"""Soak: 100 sampling runs in one server process, alternating adapters (base, Plus, Full-face),
weight types, masks, two stacked apply nodes and graphs with no adapter.

Checked: every repeat of a configuration gives a bit-identical latent (same seed), a graph without
the adapter gives the base model's latent of the very first run at any point (no patch leaks into
another branch), the run caches are empty after every run, and the server's RSS after warm-up stays
within RSS_BOUND.

Every prompt carries the apply nodes of all configurations, connected or not. The host's default
(classic) cache keeps the output of every node whose inputs are in the current prompt, so each apply
node (and its CLIP-vision encoding, a ViT-L forward, the costly part on a CPU) runs once, while the
sampler, whose model input changes from one run to the next, samples every time: the soak measures
sampling, not the encoder."""
from __future__ import annotations

import time

import torch

RUNS = 100
WARMUP_RUNS = 16      # two rounds of the configurations: every apply node has run and been sampled twice
SIZE = 32             # 4x4 latents: the UNet's cost is per pixel, the adapter's per layer
STEPS = 1             # one UNet call per run: the soak is about repetition, not about the schedule
SEED = 11
# RSS bound after warm-up. What one run of a leak would hold: the packed K/V of a Full-face run
# (16 layers x 2 rows x 257 tokens x 320 x (K, V) x 4 bytes = 21 MB), a ModelPatcher clone of the UNet
# with copied weights (~400 MB), a latent (bytes). Over the 84 measured runs a leak of the first two
# kinds grows RSS by >= 200 MB. Measured (torch 2.14.1, CPU, 2 cores): RSS 4359.5 MiB after warm-up,
# max 4359.5 MiB, 4347.6 MiB at the end (growth 0.0 MiB). 48 MB leaves room for allocator drift and
# still catches a per-run leak of K/V or models (a few KB per run, e.g. the host's own history
# entries, stays below it by design).
RSS_BOUND = 48 * 2**20

CONFIGS = [
    ("no adapter", []),
    ("base linear", [{"layout": "base"}]),
    ("plus ease in", [{"layout": "plus", "weight": 0.8, "weight_type": "ease in"}]),
    ("full-face style transfer", [{"layout": "full-face", "weight": 0.9, "weight_type": "style transfer"}]),
    ("base masked strong middle", [{"layout": "base", "weight_type": "strong middle", "mask": True}]),
    ("stack base + plus", [{"layout": "base", "weight": 0.7},
                           {"layout": "plus", "weight": 0.5, "weight_type": "weak input", "end_at": 0.6}]),
    ("plus K+V", [{"layout": "plus", "embeds_scaling": "K+V", "weight": 1.2}]),
    ("full-face masked reverse in-out", [{"layout": "full-face", "weight_type": "reverse in-out", "mask": True}]),
]


def soak_prompts(server, Graph):
    """One prompt per configuration, all holding the same nodes (same ids), each sampler fed from
    its own configuration's chain."""
    names = server.names
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=names.checkpoint)
    pos = g.add("CLIPTextEncode", text="a photo of a red square", clip=g.out(ckpt, 1))
    neg = g.add("CLIPTextEncode", text="blurry", clip=g.out(ckpt, 1))
    latent = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    cv = g.add("CLIPVisionLoader", clip_name=names.clip_vision)
    image = g.add("LoadImage", image=names.image)
    mask = g.add("LoadImageMask", image=names.image, channel="red")
    loaders = {layout: g.add("IPAdapterFusedLoader", ipadapter_file=file) for layout, file in names.adapters.items()}
    model_of = {}
    for label, chain in CONFIGS:
        model = g.out(ckpt, 0)
        for spec in chain:
            spec = dict(spec)
            layout = spec.pop("layout")
            use_mask = spec.pop("mask", False)
            inputs = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                          embeds_scaling="V only", middle_block="patch")
            inputs.update(spec)
            if use_mask:
                inputs["attn_mask"] = g.out(mask, 0)
            nid = g.add("IPAdapterFusedApply", model=model, ipadapter=g.out(loaders[layout]),
                        clip_vision=g.out(cv), image=g.out(image), **inputs)
            model = g.out(nid)
        model_of[label] = model
    sampler = g.add("KSampler", model=None, seed=SEED, steps=STEPS, cfg=5.0, sampler_name="euler",
                    scheduler="normal", positive=g.out(pos), negative=g.out(neg), latent_image=g.out(latent),
                    denoise=1.0)
    g.add("SaveLatent", samples=g.out(sampler), filename_prefix="soak")
    prompts = {}
    for label, _ in CONFIGS:
        p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in g.prompt.items()}
        p[sampler]["inputs"]["model"] = model_of[label]
        prompts[label] = p
    return prompts, sampler


def test_soak(server, Graph):
    prompts, sampler = soak_prompts(server, Graph)
    first: dict = {}
    rss = []
    counts = {label: 0 for label, _ in CONFIGS}
    t0 = time.time()
    for i in range(RUNS):
        label = CONFIGS[i % len(CONFIGS)][0]
        result = server.run_ok(prompts[label])
        assert sampler in result.executed, f"run {i} ({label}): the sampler was served from the cache"
        latent = server.latent(result)
        assert torch.isfinite(latent).all(), f"run {i} ({label}): non-finite latent"
        counts[label] += 1
        if label not in first:
            first[label] = latent
        else:
            # bit-identical, and for "no adapter": the base model's latent of run 0, before any patch existed
            assert torch.equal(latent, first[label]), (
                f"run {i} ({label}): differs from its first run by {float((latent - first[label]).abs().max()):.3g}")
        if i % 10 == 9:  # the probe walks the server's heap (holding its GIL): not after every run
            caches = server.run_caches()
            assert caches["cached"] == 0, f"run {i} ({label}): run caches not released: {caches}"
        if i + 1 >= WARMUP_RUNS:
            rss.append(server.rss())
    elapsed = time.time() - t0

    # the configurations really differ: every adapter changes the latent, and each differently
    distinct = {label: lat for label, lat in first.items()}
    base = distinct.pop("no adapter")
    for label, lat in distinct.items():
        assert not torch.equal(lat, base), f"{label}: the adapter did not change the latent"
    values = list(distinct.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])

    growth = max(rss) - rss[0]
    print(f"\nsoak: {RUNS} runs in {elapsed:.1f} s ({elapsed / RUNS:.2f} s/run); runs per configuration {counts}; "
          f"RSS after warm-up {rss[0] / 2**20:.1f} MiB, max {max(rss) / 2**20:.1f} MiB, end {rss[-1] / 2**20:.1f} MiB, "
          f"growth {growth / 2**20:.1f} MiB (bound {RSS_BOUND / 2**20:.0f} MiB)")
    assert sum(counts.values()) == RUNS
    assert growth <= RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB after warm-up (bound {RSS_BOUND / 2**20:.0f} MiB)"
