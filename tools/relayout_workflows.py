"""Maintenance: makes the shipped workflows fit the front-end as it draws the nodes today.

Loads each workflows/*.json in headless Chromium on a real ComfyUI server (as tests/browser does),
takes every node's size as the front-end computes it and the widget values it holds (a widget added
to a node since the workflow was saved gets its default), then moves nodes down their column until
none overlaps another. The browser test fails while a shipped workflow has overlapping nodes.

    COMFYUI_PATH=../shared/host/ComfyUI python tools/relayout_workflows.py [workflow.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests" / "browser"), str(ROOT / "tests" / "server")]

import cdp  # noqa: E402
import server_harness  # noqa: E402
from ipaf_runner.server import ComfyServer  # noqa: E402

TITLE = 30
GAP = 20


def _box(n):
    x, y = n["pos"]
    w, h = n["size"]
    return x, y - TITLE, x + w, y + h


def _overlap(a, b):
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def relayout(nodes):
    moved = True
    while moved:
        moved = False
        for a in sorted(nodes, key=lambda n: n["pos"][1]):
            for b in nodes:
                if b is not a and b["pos"][1] >= a["pos"][1] and _overlap(a, b):
                    b["pos"][1] = a["pos"][1] + a["size"][1] + TITLE + GAP
                    moved = True


def main() -> int:
    host = ComfyServer(server_harness.host_path(), cpu=True, models={}, say=print)
    host.start()
    browser = cdp.Chromium(cdp.find_chromium())
    try:
        browser.call("Page.navigate", url=f"http://127.0.0.1:{host.port}/")
        browser.wait_for("!!window.LiteGraph?.registered_node_types?.IPAdapterFusedApply", timeout=60)
        only = set(sys.argv[1:])  # workflow file names; all when none are given
        for path in sorted((ROOT / "workflows").glob("*.json")):
            if only and path.name not in only:
                continue
            wf = json.loads(path.read_text())
            drawn = browser.js(f"""(async () => {{
              const app = window.comfyAPI.app.app;
              await app.loadGraphData({json.dumps(wf)}, true, true, "x");
              return app.graph._nodes.map(n => ({{ id: n.id, size: [...n.size].map(Math.ceil),
                widgets_values: (n.widgets ?? []).filter(w => w.serialize !== false && w.options?.serialize !== false).map(w => w.value) }}));
            }})()""")
            by_id = {d["id"]: d for d in drawn}
            for n in wf["nodes"]:
                d = by_id[n["id"]]
                n["size"] = [max(a, b) for a, b in zip(n["size"], d["size"])]
                old = n.get("widgets_values")
                if isinstance(old, list) and len(d["widgets_values"]) > len(old) and n["type"].startswith("IPAdapterFused"):
                    n["widgets_values"] = old + d["widgets_values"][len(old):]
            relayout(wf["nodes"])
            path.write_text(json.dumps(wf, indent=2) + "\n")
            print("laid out", path.name)
    finally:
        browser.close()
        host.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
