"""Smoke test of bench/bench_regions.py at its tiniest settings (--quick): it runs every kind of variant in the
real host on CPU (no adapter, one adapter, a masked region, chained regions, a multi-reference merge with a MIP
file) and writes the JSON the README describes. Timings are not checked (this machine is shared): the rows, the
settings and the machine fields are; plus the stripe masks the regions use."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ROW_FIELDS = {"variant", "apply_s", "s_per_step", "cpu_s_per_step", "vs_without", "vs_without_range",
              "vs_one_adapter", "vs_one_adapter_range", "cpu_vs_without", "cpu_vs_one_adapter",
              "s_per_step_per_round", "cpu_s_per_step_per_round"}


def _bench():
    if "bench_regions" in sys.modules:
        return sys.modules["bench_regions"]
    spec = importlib.util.spec_from_file_location("bench_regions", ROOT / "bench" / "bench_regions.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_regions"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_every_variant(host, tmp_path, capsys):
    out = tmp_path / "regions.json"
    _bench().main(["--quick", "--threads", "1", "--note", "smoke test", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True and report["threads"] == 1
    assert {"cpu", "cores", "torch", "arch", "model_channels", "latent", "steps", "rounds", "interleaved",
            "loadavg_start", "loadavg_end", "busy", "note", "rows"} <= report.keys()
    assert report["cpu"] and report["note"].startswith("smoke test")
    assert report["busy"] == (max(report["loadavg_start"][0], report["loadavg_end"][0]) > 1.5)
    assert ("machine busy" in report["note"]) == report["busy"]
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["without adapter", "1 adapter, no mask", "1 region (masked)", "2 regions",
                          "multi-ref 2 (MIP gate)"]
    for r in rows.values():
        assert ROW_FIELDS <= r.keys(), ROW_FIELDS - r.keys()
        assert r["s_per_step"] > 0 and r["cpu_s_per_step"] > 0
        assert len(r["s_per_step_per_round"]) == report["rounds"] == 1
    assert rows["without adapter"]["vs_without"] == 1.0 and rows["1 adapter, no mask"]["vs_one_adapter"] == 1.0
    assert rows["without adapter"]["apply_s"] == 0.0 and rows["multi-ref 2 (MIP gate)"]["apply_s"] > 0
    assert "multi-ref 2 (MIP gate)" in capsys.readouterr().out


def test_stripe_masks_are_disjoint_and_cover_the_picture():
    import torch
    for n in (1, 2, 3, 4):
        masks = _bench().stripe_masks(n, size=10)
        assert len(masks) == n and all(m.shape == (1, 10, 10) for m in masks)
        total = torch.stack(masks).sum(0)
        assert torch.equal(total, torch.ones(1, 10, 10)), "stripes overlap or leave a gap"
        assert all(m.sum() > 0 for m in masks)
