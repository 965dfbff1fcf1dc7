"""Smoke test of bench/bench_attention.py --quick on CPU: it runs and writes the expected JSON."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

ROW_FIELDS = {
    "name", "model", "layout", "batch", "heads", "head_dim", "lq", "lt", "n_ctx", "ctx_tokens", "dtype",
    "unfused_ms", "fused_ms", "fused_unpacked_ms", "speedup", "ideal_bytes", "fused_gbps",
    "fused_peak_fraction", "unfused_gbps", "max_abs_diff", "fused_backend",
}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "bench" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    _bench().main(["--quick", "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert {"torch", "triton", "peak_gbps", "results"} <= report.keys()
    assert len(report["results"]) == 2
    for row in report["results"]:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["unfused_ms"] > 0 and row["ideal_bytes"] > 0
        if row["fused_ms"] is not None:  # the kernel under the interpreter (conftest sets it)
            assert row["max_abs_diff"] < 1e-4
    assert "unfused ms" in capsys.readouterr().out


def test_full_shape_list_covers_the_brief():
    shapes = _bench().full_shapes()
    names = {s.name for s in shapes}
    assert {"sd15_q4096_d40_c1x16", "sd15_q256_d160_c4x16", "sdxl_q16384_h10_c2x16", "flux_q4096_h24_c4x16"} <= names
    assert any(s.ctx_tokens == 257 for s in shapes)
    assert {s.layout for s in shapes if s.model.startswith("Flux")} == {"bhld"}
