"""Smoke test of bench/bench_dit.py at its tiniest settings (--quick): it runs every part in the real
host on CPU (tiny Flux / Chroma / SD3 sampling, the query-recovery comparison, the single-block timing
with the GPU mode's code on small shapes) and writes the JSON the README describes. Timings are not
checked (this machine is shared); what the numbers rest on is: the rows are complete, the patched
blocks change the output, unrotate undoes the host's RoPE. Plus the full-model estimate's arithmetic
on made-up block times."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MODEL_FIELDS = {"model", "family", "latent", "image_tokens", "text_tokens", "cfg", "ip_tokens", "hidden", "layers",
                "without_s_per_step", "with_s_per_step", "overhead_pct", "overhead_pct_range", "overhead_ms",
                "first_step_s", "one_time_kv_s", "kv_when", "apply_s", "per_round_s", "ipadapter_plus",
                "without_cpu_s_per_step", "with_cpu_s_per_step", "overhead_cpu_pct", "overhead_cpu_ms",
                "overhead_cpu_pct_range", "per_round_cpu_s"}
BLOCK_FIELDS = {"model", "block", "family", "hidden", "heads", "head_dim", "batch", "image_tokens", "text_tokens",
                "ip_tokens", "dtype", "ms", "overhead_ms", "overhead_pct", "overhead_cpu_ms", "overhead_cpu_pct",
                "term_rel_change", "errors",
                "kv_layer_cold_ms", "projection_ms"}


def _bench():
    if "bench_dit" in sys.modules:
        return sys.modules["bench_dit"]
    spec = importlib.util.spec_from_file_location("bench_dit", ROOT / "bench" / "bench_dit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_dit"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_every_part(host, tmp_path, capsys):
    out = tmp_path / "dit.json"
    _bench().main(["--quick", "--backends", "torch,auto", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert {"cpu", "cores", "threads", "torch", "loadavg_start", "loadavg_end", "settings", "note"} <= report.keys()
    assert "no DiT support" in report["ipadapter_plus"]

    rows = report["models"]
    assert {(r["model"], r["family"]) for r in rows} == {
        ("flux", "xlabs"), ("flux", "instantx-flux"), ("chroma", "xlabs"), ("chroma", "instantx-flux"),
        ("sd3", "instantx-sd3")}
    for r in rows:
        assert MODEL_FIELDS <= r.keys(), MODEL_FIELDS - r.keys()
        assert r["without_s_per_step"] > 0 and r["with_s_per_step"] > 0 and r["one_time_kv_s"] > 0
        assert r["ip_tokens"] == {"xlabs": 16, "instantx-flux": 128, "instantx-sd3": 64}[r["family"]]
        assert r["kv_when"] == ("every step" if r["family"] == "instantx-sd3" else "once per run")
        # XLabs patches the double blocks only (2 in the tiny model), InstantX Flux double + single (4)
        assert r["layers"] == {"xlabs": 2, "instantx-flux": 4, "instantx-sd3": 2}[r["family"]]

    u = report["unrotate"]
    assert set(u["ms"]) == {"unrotate (pack)", "recompute q (norm, modulation, q slice of QKV, RMS norm)",
                            "recompute QKV (full projection)"}
    assert u["unrotate_max_rel_error"] < 1e-5  # rotating back undoes the host's own apply_rope

    blocks = report["blocks"]
    assert report["blocks_failed"] == []
    assert [(b["block"], b["family"]) for b in blocks] == [
        ("double", "xlabs"), ("double", "instantx-flux"), ("single", "instantx-flux"), ("joint", "instantx-sd3")]
    for b in blocks:
        assert BLOCK_FIELDS <= b.keys(), BLOCK_FIELDS - b.keys()
        assert not b["errors"], b["errors"]
        assert set(b["overhead_ms"]) == set(b["overhead_cpu_ms"]) == {"torch", "auto"}
        assert all(v["cpu"]["median"] > 0 for v in b["ms"].values())  # CPU time, taken beside wall time
        for backend, rel in b["term_rel_change"].items():  # the patch really adds a term
            assert rel > 1e-3, (b["family"], b["block"], backend, rel)
    assert blocks[-1]["projection_ms"] is not None  # SD3.5: its resampler, timed on its own
    assert set(report["full_model_estimate"]) == {
        f"{m} ({b})" for m in ("flux xlabs", "flux instantx", "sd3.5-large instantx") for b in ("torch", "auto")}
    text = capsys.readouterr().out
    assert "n/a (no DiT support)" in text and "x19 double + 38 single" in text


def _row(family, block, unpatched, patched, projection=None):
    return {"family": family, "block": block, "ms": {"unpatched": {"median": unpatched}},
            "overhead_ms": {"torch": patched - unpatched}, "projection_ms": projection}


def test_full_model_estimate_counts_the_published_blocks():
    est = _bench().full_model_estimate([
        _row("xlabs", "double", 10.0, 10.5), _row("instantx-flux", "double", 10.0, 11.0),
        _row("instantx-flux", "single", 4.0, 4.25), _row("instantx-sd3", "joint", 8.0, 9.0, projection=3.0)],
        ["torch"])
    flux_blocks = 19 * 10.0 + 38 * 4.0
    assert est["flux xlabs (torch)"]["blocks_ms"] == pytest.approx(flux_blocks)
    assert est["flux xlabs (torch)"]["overhead_ms"] == pytest.approx(19 * 0.5)
    assert est["flux instantx (torch)"]["overhead_ms"] == pytest.approx(19 * 1.0 + 38 * 0.25)
    assert est["flux instantx (torch)"]["overhead_pct"] == pytest.approx(100 * 28.5 / flux_blocks)
    sd3 = est["sd3.5-large instantx (torch)"]
    # every joint block pays its K/V (inside its patched time); the resampler runs once per step
    assert sd3["blocks_ms"] == pytest.approx(38 * 8.0) and sd3["overhead_ms"] == pytest.approx(38 * 1.0 + 3.0)
