"""Untrusted files in the server's models/ipadapter, through the HTTP API.

Each bad file is put in the folder and a normal graph names it in the loader. The prompt must fail
with the host's execution_error whose exception_message starts with the file's name and says what is
wrong; a pickle payload must never run; the server must then run the next good prompt and give the
same latent as before the bad files."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared bad-file makers
from untrusted_files import (  # noqa: E402
    BAD_FILES,
    clip_vision_model,
    full_checkpoint,
    unet_state_dict,
)

# Real models of other kinds, linked as they are (hundreds of MB each): refused from the header.
WRONG_MODELS = [
    ("checkpoints", "sd15_checkpoint_here_by_mistake.safetensors", ["full Stable Diffusion checkpoint"]),
    ("clip_vision", "clip_vision_here_by_mistake.safetensors", ["CLIP vision encoder", "models/clip_vision"]),
    ("diffusion_models", "unet_here_by_mistake.safetensors", ["UNet (diffusion model)"]),
]


def _with_adapter_file(graph, name):
    for node in graph.prompt.values():
        if node["class_type"] == "IPAdapterFusedLoader":
            node["inputs"]["ipadapter_file"] = name
    return graph.prompt


def test_bad_adapter_files_fail_by_name_and_the_server_keeps_serving(server, tiny, sd15_graph, tmp_path):
    """All bad files in a row; then one of them is replaced, under its name, by the good adapter (a
    user re-downloading it) and the graph naming it must give the latent of the good adapter,
    sampled afresh: neither a failure nor a server state is left behind."""
    import os
    import shutil

    from safetensors.torch import load_file

    good, good_ids = sd15_graph(tiny, adapters=[{"layout": "base", "weight": 0.8}], steps=1, prefix="untrusted_good")
    before = server.latent(server.run_ok(good.prompt))

    good_file = next(p for p in tiny.files["ipadapter"] if p.name == tiny.adapters["base"])
    state = load_file(str(good_file))
    folder = tmp_path / "bad"
    folder.mkdir()
    ctx = {"marker": tmp_path / "code_ran"}
    # the big foreign models are linked as real files below; the makers here stay small
    cases = []
    for make in BAD_FILES:
        if make in (unet_state_dict, full_checkpoint, clip_vision_model):
            continue
        name, words = make(folder, state, ctx)
        cases.append((server.add_model("ipadapter", folder / name, name), words))
    for kind, name, words in WRONG_MODELS:
        cases.append((server.add_model("ipadapter", tiny.files[kind][0], name), words))
    server.refresh_object_info()

    failures = []
    for name, words in cases:
        graph, ids = sd15_graph(tiny, adapters=[{"layout": "base", "weight": 0.8}], steps=1, prefix="untrusted_bad")
        result = server.run(_with_adapter_file(graph, name), timeout=300)
        err = result.error or {}
        msg = err.get("exception_message", "")
        if result.status != "error" or err.get("node_type") != "IPAdapterFusedLoader" \
                or not msg.startswith(f"{name}: ") or not all(w in msg for w in words) \
                or ids["sampler"] in result.executed:
            failures.append((name, result.status, err.get("node_type"), msg))
        assert server.alive(), f"the server died on {name}\n{server.log_tail(30)}"
    assert not failures, "\n".join(map(repr, failures))
    assert not ctx["marker"].exists(), "a pickle payload ran in the server"

    fixed = "nan.safetensors"
    st = (folder / fixed).stat()
    shutil.copyfile(good_file, folder / fixed)
    os.utime(folder / fixed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    result = server.run_ok(_with_adapter_file(good, fixed))
    assert good_ids["sampler"] in result.executed, "the sampler must run again, not come from the cache"
    assert (server.latent(result) == before).all(), "the fixed file gives another latent than the good one"
