"""Server-level tests: one real ComfyUI server (main.py --cpu on 127.0.0.1, temp --base-directory,
this pack linked into its custom_nodes), driven through the HTTP/WebSocket API with tiny models.

The host: $COMFYUI_PATH, else ../shared/host/ComfyUI beside the pack. The tests skip only when
neither exists; a host that exists but does not start is a failure. Every test here is marked
`server` (registered in pyproject.toml; the default run includes them, `-m "not server"` leaves them out).

Fixtures
  server        session-scoped ServerHarness (server_harness.py), started once for all modules:
    .names            TinyModelNames: checkpoint, clip_vision, adapters{"base","plus","full-face"}, unet_b
                      (models/diffusion_models), image (the uploaded input picture), files{folder: [paths]}
    .run(prompt, timeout=600, interrupt_when=None) -> RunResult   (any status; PromptRejected if refused)
    .run_ok(prompt) -> RunResult                  (AssertionError with the node message + host log)
    .submit(prompt) -> prompt_id                  (no wait; .wait_done(prompt_id) -> its /history entry)
    .interrupt(prompt_id=None)
    .free(unload_models=True, free_memory=True, keep=None)   (returns once the host has acted on /free;
                      `keep`: a prompt whose non-output nodes keep their cached outputs)
    .latent(result) / .latents(result) -> torch tensors written by SaveLatent
    .images(result) -> uint8 arrays written by SaveImage;  .output_path(file_record)
    .upload_image(path, name=None) -> name for LoadImage;  .add_model(folder, path, name=None) -> name
    .object_info / .refresh_object_info();  .rss() server RSS in bytes;  .alive();  .log_tail(n)
    .run_caches() -> {"adapters", "cached"}: live ImagePrompt objects and their run-cache entries, read
                      through the test-only probe route of tests/server/ipaf_test_probe (loaded beside the pack)
    .work         the session's temp folder (adapters made there);  .server  the runner's ComfyServer
    .client       the runner's HostClient (get_json, post_json, history, view, ...)
  tiny          the TinyModelNames (server.names)
  sd15_graph    server_harness.sd15_graph: (names, adapters=[{layout, weight, weight_type, attn_mask...}],
                seed, steps, size, batch, ...) -> (Graph, ids); the graph ends in SaveLatent
  Graph         server_harness.Graph, an API-prompt builder (add(class_type, **inputs) -> id; out(id, slot))

RunResult (tools/ipaf_runner/run.py): .status ("success" | "error" | "interrupted"), .error (the
host's execution_error payload: exception_message, node_id, node_type ...), .message() (what the runner
prints), .executed / .cached (node ids), .outputs, .files(kind), .seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import server_harness  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    for it in mine:
        it.add_marker(pytest.mark.server)
    if mine and server_harness.host_path() is None:
        skip = pytest.mark.skip(reason=f"no ComfyUI: set ${server_harness.HOST_ENV} or put it at ../shared/host/ComfyUI")
        for it in mine:
            it.add_marker(skip)


@pytest.fixture(scope="session")
def server():
    path = server_harness.host_path()
    if path is None:
        pytest.skip("no ComfyUI host")
    harness = server_harness.ServerHarness(path)
    harness.start()
    yield harness
    harness.close()


@pytest.fixture
def tiny(server):
    return server.names


@pytest.fixture
def sd15_graph():
    return server_harness.sd15_graph


@pytest.fixture
def Graph():
    return server_harness.Graph
