"""Browser tests: headless Chromium against a real ComfyUI server on loopback (the host snapshot,
this pack only, CPU). Marked `browser`. They skip when no Chromium is installed, unless
IPADAPTER_FUSED_REQUIRE_BROWSER=1 (CI), which turns that skip into a failure."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "server"))

import cdp  # noqa: E402
import server_harness  # noqa: E402
from ipaf_runner.server import ComfyServer  # noqa: E402

REQUIRE = os.environ.get("IPADAPTER_FUSED_REQUIRE_BROWSER", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    for it in items:
        if HERE in Path(str(it.fspath)).resolve().parents:
            it.add_marker(pytest.mark.browser)


def _skip(reason):
    if REQUIRE:
        pytest.fail(f"IPADAPTER_FUSED_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def host():
    path = server_harness.host_path()
    if path is None:
        _skip("no ComfyUI host (set COMFYUI_PATH or put it at ../shared/host/ComfyUI)")
    # ComfyUI-Kolors-MZ's node declarations, so workflows/kolors_faceid.json draws as it does with that pack
    server = ComfyServer(path, cpu=True, models={}, say=lambda m: None,
                         extra_custom_nodes=[HERE / "kolors_mz_declarations"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(host):
    if cdp.find_chromium() is None:
        _skip("no Chromium (apt-get install chromium chromium-driver)")
    b = cdp.Chromium(cdp.find_chromium())
    try:
        b.call("Runtime.enable")
        # no first-run template browser over the canvas
        host.client.post_json("/settings/Comfy.TutorialCompleted", True)
        # full drawing at any zoom: the screenshots (and the templates' thumbnails) show the text
        host.client.post_json("/settings/LiteGraph.Canvas.MinFontSizeForLOD", 0)
        host.client.post_json("/settings/Comfy.Minimap.Visible", False)
        b.call("Page.navigate", url=f"http://127.0.0.1:{host.port}/")
        b.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.IPAdapterFusedApply)",
                   timeout=60)
        yield b
    finally:
        b.close()
