"""The table/JSON code of bench/bench_server.py and the profile analysis of bench/profile_server.py,
on made-up measurements (no server: the benchmark itself is a script, not a test)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


META = {"arch": "sd15", "model_channels": 320, "latent": 32, "steps": 6, "cfg": 5.0, "rounds_n": 3,
        "cache_lru": 64, "device": "cpu", "cpu": "test cpu", "cores": 2, "threads": 2, "torch": "x"}


def _rounds():
    # round 2 is slow for everyone (machine load): per-round ratios stay the same, raw times do not
    none, fused, plus = [10.0, 20.0, 10.5], [10.2, 20.4, 10.71], [11.0, 22.0, 11.55]
    steps = lambda total: [total / 6 + 0.5] + [total / 6] * 5  # noqa: E731
    return [{"no adapter": {"sampler_s": n, "steps_s": steps(n)},
             "IPAdapter Fused (base)": {"sampler_s": f, "steps_s": steps(f)},
             "ComfyUI_IPAdapter_plus (base)": {"sampler_s": p, "steps_s": steps(p)}}
            for n, f, p in zip(none, fused, plus)]


def test_summary_takes_ratios_within_rounds_and_medians(tmp_path):
    bs = _load("bench_server")
    rounds = _rounds()
    result = bs.summarize(rounds, {"IPAdapter Fused (base)": [0.5, 0.7, 0.6]}, META)
    for name in rounds[0]:
        ratios = [r[name]["sampler_s"] / r["no adapter"]["sampler_s"] for r in rounds]
        assert abs(result["ratio_to_none"][name] - statistics.median(ratios)) < 1e-12
        # the first step (sampler set-up) is left out of s/step
        later = [s for r in rounds for s in r[name]["steps_s"][1:]]
        assert abs(result["seconds_per_step"][name] - statistics.median(later)) < 1e-12
    assert abs(result["ratio_to_none"]["IPAdapter Fused (base)"] - 1.02) < 1e-9
    assert abs(result["ratio_to_none"]["ComfyUI_IPAdapter_plus (base)"] - 1.1) < 1e-9
    spread = result["variants"]["no adapter"]["sampler_s"]
    assert (spread["min"], spread["max"], spread["median"]) == (10.0, 20.0, 10.5)
    assert result["apply_s"]["IPAdapter Fused (base)"]["median"] == 0.6
    text = bs.format_table(result)
    assert "ComfyUI_IPAdapter_plus (base)" in text and "1.100x" in text
    json.loads(json.dumps(result))  # serialisable as written


def test_graphs_reference_their_nodes():
    bs = _load("bench_server")
    names = {"checkpoint": "c.safetensors", "clip_vision": "cv.safetensors", "base": "a.safetensors"}
    for variant in ("none", "fused", "ipaplus"):
        g = bs.graph(names, variant, None if variant == "none" else "base", seed=7, steps=6, latent=32)
        assert g["5"]["inputs"]["seed"] == 7 and g["4"]["inputs"]["width"] == 256
        for node in g.values():
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in g, (node, value)
    only = bs.graph(names, "ipaplus", "base", seed=0, steps=6, latent=32, weight=0.9, apply_only=True)
    assert "5" not in only and only["90"]["inputs"]["source"] == ["31", 0] and only["31"]["inputs"]["weight"] == 0.9
    # SD1.5 attn2 widths in the public checkpoints' order: input blocks, output blocks, middle block
    assert bs.sd15_layer_dims(320) == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640,
                                       320, 320, 320, 1280]


def test_profile_analysis_counts_nested_parts(tmp_path):
    ps = _load("profile_server")
    sampler = "thread (1): worker;prompt_worker (main.py:1);common_ksampler (nodes.py:1);UNetModel._forward (openaimodel.py:9)"
    raw = tmp_path / "p.txt"
    raw.write_text("\n".join([
        f"{sampler};BasicTransformerBlock._forward (attention.py:808);CrossAttention.forward (attention.py:1) 30",
        f"{sampler};BasicTransformerBlock._forward (attention.py:845);Attn2Patch.__call__ (patch.py:3) 5",
        f"{sampler};BasicTransformerBlock._forward (attention.py:843);Linear.forward (linear.py:1) 2",
        f"{sampler};BasicTransformerBlock._forward (attention.py:860);FeedForward.forward (attention.py:2) 13",
        f"{sampler};ResBlock._forward (openaimodel.py:3) 50",
        "thread (1): worker;prompt_worker (main.py:1);cleanup (model_management.py:1) 10",
        "thread (2): MainThread;run_forever (base_events.py:1) 40",
    ]))
    counts = ps.classify(ps.parse_raw(raw), {"attn1": [808], "attn2": [843, 845], "ff": [860]})
    assert counts["all threads"] == 150 and counts["sampler"] == 100 and counts["sampler thread"] == 110
    assert (counts["attn1"], counts["attn2"], counts["ff"]) == (30, 7, 13)
    assert counts["IPAdapter Fused attn2 patch"] == 5 and "ComfyUI_IPAdapter_plus attn2 patch" not in counts
    summary = ps.summarize_profile(counts, sampler_seconds=2.0, rate=100)
    assert summary["share_of_sampler"]["attn2"] == 0.07 and summary["coverage"] == 0.5
    assert "IPAdapter Fused attn2 patch" in ps.format_summary(summary, "t")
