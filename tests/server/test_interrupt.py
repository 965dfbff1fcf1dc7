"""Interrupt: POST /interrupt while the sampler runs. The interrupted prompt ends as interrupted,
its run caches are released, and the next run is bit-identical to an uninterrupted one.

The run caches (packed image K/V and masks of ImagePrompt) are read through the test-only probe
route /ipaf_test/run_caches (tests/server/ipaf_test_probe); it answers while the sampler runs, which
also shows the probe sees a filled cache (the check after the interruption is not vacuous)."""
from __future__ import annotations

import time

import torch

STEPS = 12          # the run is interrupted at its first steps; 12 leave room on a fast machine
SIZE = 32


def _graph(server, sd15_graph, seed):
    g, ids = sd15_graph(server.names, adapters=[{"layout": "plus", "weight": 0.8}], seed=seed, steps=STEPS,
                        size=SIZE, prefix="interrupt")
    return g.prompt, ids


def test_interrupt_mid_sampling_then_identical_rerun(server, sd15_graph):
    prompt, ids = _graph(server, sd15_graph, seed=3)
    reference = server.latent(server.run_ok(prompt))
    assert server.run_caches()["cached"] == 0

    # a different seed, so that the host's cache does not hold the sampler's output of the same prompt
    other, _ = _graph(server, sd15_graph, seed=4)
    prompt_id = server.submit(other)
    seen_filled = 0
    t0 = time.time()
    while time.time() - t0 < 300:
        seen_filled = server.run_caches()["cached"]
        if seen_filled:
            break
        assert server.client.history(prompt_id) is None, "the prompt ended before it could be interrupted"
        time.sleep(0.05)
    assert seen_filled > 0, "the sampler never filled a run cache"
    server.interrupt(prompt_id)
    entry = server.wait_done(prompt_id)
    kinds = [m[0] for m in (entry.get("status") or {}).get("messages", [])]
    assert "execution_interrupted" in kinds, kinds
    # (the adapter loader's info text is an output too; only the sampler's latent must be missing)
    assert not any("latents" in out for out in (entry.get("outputs") or {}).values()), \
        "an interrupted prompt saved a latent"
    assert server.run_caches()["cached"] == 0, "the interrupted run left its K/V cache behind"

    # the same prompt as the reference: the sampler runs again (the interrupted prompt replaced it in
    # the cache) and must give exactly the reference
    result = server.run_ok(prompt)
    assert ids["sampler"] in result.executed
    assert torch.equal(server.latent(result), reference)
    assert server.run_caches()["cached"] == 0


def test_interrupt_through_the_runner_reports_interrupted(server, sd15_graph):
    """The runner's own interrupt hook (interrupt_when, used on progress messages) ends the prompt with
    status 'interrupted' and a message saying so."""
    prompt, _ = _graph(server, sd15_graph, seed=5)
    result = server.run(prompt, interrupt_when=lambda m: m.get("type") == "progress"
                        and (m.get("data") or {}).get("value", 0) >= 2)
    assert result.status == "interrupted", result.status
    assert result.message() == "the prompt was interrupted"
    assert server.run_caches()["cached"] == 0
