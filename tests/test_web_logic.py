"""The front-end's layer-weight logic (web/js/layer_weights_logic.js) against nodes/schedules.py.

Runs Node's own test runner over tests/web/ (so the README's one pytest command covers it), checks
that the fixture those tests read is what nodes/schedules.py resolves today, and sends every preset
the editor writes back through the pack's parser: the string it writes must give the same weight
(and token swap) on every layer as the weight type it stands for."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ipadapter_fused.nodes.schedules import (DIT_WEIGHT_TYPES, WEIGHT_TYPES, Site, resolve_dit_weights,
                                             resolve_site_weights)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "web" / "schedules_fixture.json"
LOGIC = ROOT / "web" / "js" / "layer_weights_logic.js"

# Built by hand from the host's block layouts, independent of the JS tables: (block, count) in forward order.
UNET_BLOCKS = {"sd15": (("input", 6), ("middle", 1), ("output", 9)), "sdxl": (("input", 4), ("middle", 1), ("output", 6))}
DIT_BLOCKS = {"flux": (("double", 19), ("single", 38)), "sd35": (("joint", 38),)}


def _node():
    node = shutil.which("node")
    if node is None:
        if os.environ.get("IPADAPTER_FUSED_REQUIRE_WEB") == "1":
            pytest.fail("IPADAPTER_FUSED_REQUIRE_WEB=1 but there is no `node` on PATH (Node.js >= 18 runs tests/web)")
        pytest.skip("no `node` on PATH: the front-end logic tests need Node.js >= 18")
    return node


def _sites(family):
    sites, t = [], 0
    if family in UNET_BLOCKS:
        for block, count in UNET_BLOCKS[family]:
            for i in range(count):
                sites.append(Site((block, i, 0), block, t, 320, 768, 8))
                t += 1
    else:
        for block, count in DIT_BLOCKS[family]:
            for i in range(count):
                sites.append(Site(("double_block" if block != "single" else "single_block", i), block, t, 64, 0, 2))
                t += 1
    return sites


def _resolve(family, weight_type, weight, layer_weights="", composition=1.0):
    sites = _sites(family)
    if family in UNET_BLOCKS:
        sw = resolve_site_weights(sites, weight_type, weight, composition * weight, layer_weights)
    else:
        sw = resolve_dit_weights(sites, sites, weight_type, weight, layer_weights)
    return [w.weight for w in sw], [w.swap for w in sw]


def _presets(family):
    return [t for t in (WEIGHT_TYPES if family in UNET_BLOCKS else DIT_WEIGHT_TYPES) if t != "custom"]


def expected_fixture():
    return {family: {t: dict(zip(("factors", "swap"), _resolve(family, t, 1.0))) for t in _presets(family)}
            for family in (*UNET_BLOCKS, *DIT_BLOCKS)}


def test_fixture_is_what_schedules_resolve():
    """tests/web/ compares the JS presets with this file; it must be nodes/schedules.py's answer
    today. Regenerate with IPADAPTER_FUSED_WRITE_WEB_FIXTURE=1."""
    want = expected_fixture()
    if os.environ.get("IPADAPTER_FUSED_WRITE_WEB_FIXTURE") == "1":
        lines = [f'  {json.dumps(f"{f}/{t}")}: {json.dumps(v)}' for f, ps in want.items() for t, v in ps.items()]
        FIXTURE.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one line per family/preset
    got = {}
    for key, value in json.loads(FIXTURE.read_text()).items():
        family, t = key.split("/", 1)
        got.setdefault(family, {})[t] = value
    assert got == want, "stale fixture: rerun with IPADAPTER_FUSED_WRITE_WEB_FIXTURE=1"


def test_node_test_runner_passes():
    proc = subprocess.run([_node(), "--test", str(ROOT / "tests" / "web")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# pass 0" not in proc.stdout, proc.stdout[-2000:]


_DUMP = """
import * as L from %s;
const out = {};
for (const f of L.FAMILY_IDS) {
  out[f] = {};
  for (const t of L.presetsFor(f)) out[f][t] = { plain: L.applyPreset(f, t), comp: L.applyPreset(f, t, 0.5) };
}
console.log(JSON.stringify(out));
"""


def test_every_preset_string_resolves_like_its_weight_type():
    proc = subprocess.run([_node(), "--input-type=module", "-e", _DUMP % json.dumps(LOGIC.as_uri())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(proc.stdout)
    assert set(written) == {*UNET_BLOCKS, *DIT_BLOCKS}
    for family, presets in written.items():
        assert list(presets) == _presets(family)
        for t, got in presets.items():
            for composition, key in ((1.0, "plain"), (0.5, "comp")):
                weight = 0.8
                want_w, want_swap = _resolve(family, t, weight, composition=composition)
                got_w, got_swap = _resolve(family, got[key]["weightType"], weight, got[key]["layerWeights"])
                assert got_swap == want_swap, (family, t)
                assert got_w == pytest.approx(want_w, abs=1e-4), (family, t, got[key]["layerWeights"])
