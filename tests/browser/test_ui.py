"""The pack in the real front-end: every shipped workflow loads with no missing node, the loader's
detection summary stays one line inside its node, the per-layer weight editor writes the
layer_weights the pack parses, and the examples are in the host's template browser with thumbnails.
Screenshots go to tests/artifacts/ (ignored by git); IPADAPTER_FUSED_WRITE_THUMBNAILS=1 also
rewrites the templates' thumbnails (workflows/<name>.jpg) from them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ipadapter_fused.nodes.schedules import Site, resolve_site_weights
from ipaf_runner.server import LINK_NAME

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
ARTIFACTS = ROOT / "tests" / "artifacts"
EXT = f"/extensions/{LINK_NAME}"
APP = "window.comfyAPI.app.app"
LONG_SUMMARY = ("IP-Adapter Plus for SDXL: 16 image tokens from CLIP ViT-H/14 penultimate hidden states (width 1280), "
                "resampler width 1280 x 4 layers, 20 heads; 70 cross-attention layers, context width 2048")


def _load(browser, path: Path) -> None:
    browser.js(f"{APP}.loadGraphData({path.read_text()}, true, true, {json.dumps(path.stem)})")
    browser.js("window.ipadapterFused?.closeLayerEditor?.(), true")


def _fit_view(browser) -> dict:
    """Zooms the canvas onto the graph; returns the canvas' rectangle on the page."""
    return browser.js(f"""(() => {{
      const app = {APP}, c = app.canvas, nodes = app.graph._nodes, T = LiteGraph.NODE_TITLE_HEIGHT;
      const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - T));
      const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
      const r = c.canvas.getBoundingClientRect();
      const s = Math.min(r.width / (x1 - x0 + 80), r.height / (y1 - y0 + 80), 1.2);
      if ('min_font_size_for_lod' in c) c.min_font_size_for_lod = 0;
      c.ds.scale = s;
      c.ds.offset = [-x0 + (r.width / s - (x1 - x0)) / 2, -y0 + (r.height / s - (y1 - y0)) / 2];
      c.setDirty(true, true); c.draw(true, true);
      return {{x: r.x, y: r.y, width: r.width, height: r.height}};
    }})()""")


_BOXES = f"""(() => {{
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  return {APP}.graph._nodes.map(n => ({{id: n.id, type: n.type,
    box: [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]}}));
}})()"""


def _overlaps(boxes) -> set:
    out = set()
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                out.add((a["id"], b["id"]))
    return out


def test_templates_list_the_examples_with_thumbnails(host):
    listed = host.client.get_json("/workflow_templates")
    assert sorted(listed.get(LINK_NAME, [])) == [p.stem for p in WORKFLOWS]
    assert "selfcheck_sd15" not in json.dumps(listed), "the runner-only selfcheck must stay out of the template browser"
    for p in WORKFLOWS:
        status, body = host.client.request("GET", f"/api/workflow_templates/{LINK_NAME}/{p.stem}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff", f"no JPEG thumbnail for {p.name}"
        status, body = host.client.request("GET", f"/api/workflow_templates/{LINK_NAME}/{p.name}")
        assert status == 200 and json.loads(body)["nodes"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_and_summary_fits(host, browser, path):
    _load(browser, path)
    saved = json.loads(path.read_text())
    loaded = browser.js(f"{APP}.graph._nodes.map(n => [n.id, n.type, !!LiteGraph.registered_node_types[n.type]])")
    assert sorted(i for i, _, _ in loaded) == sorted(n["id"] for n in saved["nodes"])
    missing = [t for _, t, known in loaded if not known]
    assert not missing, f"{path.name}: missing node types {missing}"

    if os.environ.get("IPADAPTER_FUSED_WRITE_THUMBNAILS") == "1":  # the graph as shipped, before any run
        rect = _fit_view(browser)
        browser.screenshot(path.with_suffix(".jpg"), fmt="jpeg", quality=80, clip={**rect, "scale": 0.5})

    before_boxes = browser.js(_BOXES)
    # a run's message on every loader of the pack, the longest summary the pack writes
    result = browser.js(f"""(async () => {{
      const app = {APP};
      const {{ summaryRect }} = await import("{EXT}/loader_summary.js");
      const out = [];
      for (const n of app.graph._nodes.filter(n => n.type.startsWith("IPAdapterFused") && n.ipafSummary === undefined
                                                   && (n.outputs ?? []).some(o => o.type === "IPADAPTER_FUSED"))) {{
        const size = [...n.size];
        n.onExecuted({{ ipadapter_info: [{json.dumps(LONG_SUMMARY)}] }});
        const rect = summaryRect(n, app.canvas.ctx);
        const file = n.widgets?.find(w => w.type === "combo");
        // hover: the full text becomes the canvas' native tooltip, and goes when the pointer leaves
        n.ipafSummaryRect = rect;
        n.onMouseMove({{}}, [rect[0] + 5, rect[1] + rect[3] / 2]);
        const hover = app.canvas.canvas.title;
        n.onMouseMove({{}}, [rect[0] + 5, n.size[1] - 2]);
        const away = app.canvas.canvas.title;
        out.push({{ id: n.id, size, after: [...n.size], rect, summary: n.ipafSummary, hover, away,
                    fileY: file ? (file.last_y ?? file.y) : null, widgets: n.widgets?.length ?? 0 }});
      }}
      return out;
    }})()""")
    info = host.client.object_info()
    loaders = [n for n in saved["nodes"] if "IPADAPTER_FUSED" in info.get(n["type"], {}).get("output", [])]
    assert loaders and len(result) == len(loaders), (path.name, result)
    for r in result:
        assert r["size"] == r["after"], f"{path.name}: the loader {r['id']} changed size"
        x, y, w, h = r["rect"]
        assert y >= 0, f"{path.name}: the summary went to the title bar although the output row has room {r}"
        assert w >= 60 and x >= 0 and x + w <= r["size"][0] and y + h <= r["size"][1], r
        if r["fileY"] is not None and y >= 0:
            assert y + h <= r["fileY"], f"{path.name}: the summary line runs into the file widget {r}"
        assert r["summary"] == LONG_SUMMARY
        assert r["hover"] == LONG_SUMMARY and r["away"] == "", r
    assert _overlaps(browser.js(_BOXES)) <= _overlaps(before_boxes), f"{path.name}: a node now overlaps another"
    assert not _overlaps(before_boxes), f"{path.name}: nodes overlap as shipped: {_overlaps(before_boxes)}"

    _fit_view(browser)
    browser.screenshot(ARTIFACTS / f"{path.stem}.png")


def _sd15_sites():
    blocks = ["input"] * 6 + ["middle"] + ["output"] * 9
    return [Site((b, i, 0), b, i, 320, 768, 8) for i, b in enumerate(blocks)]


def test_layer_weight_editor_writes_layer_weights(browser):
    path = ROOT / "workflows" / "sd15_basic.json"
    _load(browser, path)
    node = browser.js(f"{APP}.graph._nodes.find(n => n.type === 'IPAdapterFusedApply').id")
    opened = browser.js(f"""(() => {{
      const app = {APP}, node = app.graph.getNodeById({node});
      const button = node.title_buttons.find(b => b.name === "ipaf_layer_weights");
      node.onTitleButtonClick(button, app.canvas);
      const root = document.querySelector(".ipaf-le");
      const select = root.querySelector("select[data-role=family]");
      select.value = "sd15"; select.dispatchEvent(new Event("change"));
      return {{ bars: root.querySelectorAll(".bar").length,
               groups: [...root.querySelectorAll("legend")].map(l => l.textContent),
               presets: root.querySelectorAll("[data-preset]").length }};
    }})()""")
    assert opened == {"bars": 16, "groups": ["input (6)", "middle (1)", "output (9)"], "presets": 15}

    def pick(preset):
        return browser.js(f"""(() => {{
          document.querySelector('.ipaf-le [data-preset="{preset}"]').click();
          const n = {APP}.graph.getNodeById({node}), w = name => n.widgets.find(x => x.name === name).value;
          return [w("weight_type"), w("layer_weights")];
        }})()""")

    sites = _sd15_sites()
    for preset in ("style transfer", "composition", "ease in-out", "composition precise"):
        weight_type, text = pick(preset)
        assert weight_type == ("composition precise" if preset == "composition precise" else "custom")
        # the pack itself, fed the string the editor wrote, gives the preset's weights (weight 1.0, the workflow's)
        got = resolve_site_weights(sites, weight_type, 1.0, 1.0, text)
        want = resolve_site_weights(sites, preset, 1.0, 1.0, "")
        assert [s.swap for s in got] == [s.swap for s in want], preset
        assert [s.weight for s in got] == pytest.approx([s.weight for s in want], abs=1e-4), (preset, text)
    assert pick("style transfer")[1] == "0:1, 1:1, 2:1, 3:1, 9:1, 10:1, 11:1, 12:1, 13:1, 14:1, 15:1"

    # drag the middle block's bar to the top: 1.5 there, the rest as the preset left it
    text = browser.js(f"""(() => {{
      const bar = document.querySelector('.ipaf-le .bar[data-index="6"]'), r = bar.getBoundingClientRect();
      const at = (type, y) => bar.dispatchEvent(new PointerEvent(type, {{ clientX: r.x + 4, clientY: y, buttons: 1,
                                                                          bubbles: true, pointerId: 1 }}));
      at("pointerdown", r.y + r.height * 0.6); at("pointermove", r.y + 1); at("pointerup", r.y + 1);
      return {APP}.graph.getNodeById({node}).widgets.find(x => x.name === "layer_weights").value;
    }})()""")
    assert text == "0:1, 1:1, 2:1, 3:1, 6:1.5, 9:1, 10:1, 11:1, 12:1, 13:1, 14:1, 15:1"
    _fit_view(browser)
    browser.screenshot(ARTIFACTS / "layer_weight_editor.png")

    # what a saved workflow holds: the string, in the widget's own place, and nothing else
    saved = browser.js(f"{APP}.graph.serialize().nodes.find(n => n.id === {node}).widgets_values")
    original = next(n for n in json.loads(path.read_text())["nodes"] if n["id"] == node)["widgets_values"]
    assert len(saved) == len(original)
    assert saved[original.index("")] == text and saved[1] == "custom"
    browser.js("window.ipadapterFused.closeLayerEditor(), true")
    assert browser.js("document.querySelectorAll('.ipaf-le').length") == 0


def test_no_front_end_errors(browser):
    errors = [m for m in browser.console if m.startswith("EXCEPTION") and "ipadapter" in m.lower()]
    assert not errors, errors
