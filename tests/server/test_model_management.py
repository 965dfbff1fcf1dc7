"""Model management: POST /free {"unload_models": true, "free_memory": true} between runs, and a
different UNet loaded (UNETLoader, models/diffusion_models). Outputs stay bit-identical, and the
adapter's weights are loaded again (its loader node runs again instead of coming from the cache)."""
from __future__ import annotations

import torch

SIZE = 32
STEPS = 2
# the host logs this when it loads the adapter's weights (its ModelPatcher) for a run
LOAD_LINE = "Requested to load IPAdapterWeights"


def _graphs(server, sd15_graph, Graph):
    names = server.names
    ckpt_graph, ckpt_ids = sd15_graph(names, adapters=[{"layout": "base", "weight": 0.9}], size=SIZE, steps=STEPS,
                                      prefix="mm_ckpt")
    # the same graph with the model from UNETLoader (another UNet of the same shape)
    unet_graph = Graph()
    unet_graph.prompt = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])}
                         for k, v in ckpt_graph.prompt.items()}
    unet = unet_graph.add("UNETLoader", node_id="100", unet_name=names.unet_b, weight_dtype="default")
    apply_id = ckpt_ids["apply"][0]
    unet_graph.prompt[apply_id]["inputs"]["model"] = Graph.out(unet, 0)
    unet_graph.prompt[ckpt_ids["save"]]["inputs"]["filename_prefix"] = "mm_unet_b"
    loader = unet_graph.prompt[apply_id]["inputs"]["ipadapter"][0]
    return ckpt_graph.prompt, unet_graph.prompt, loader, ckpt_ids["sampler"]


def test_free_and_other_unet_keep_outputs_identical(server, sd15_graph, Graph):
    ckpt, unet_b, loader, sampler = _graphs(server, sd15_graph, Graph)
    first = server.run_ok(ckpt)
    a = server.latent(first)

    server.free(unload_models=True, free_memory=True)
    second = server.run_ok(unet_b)
    b = server.latent(second)
    assert not torch.equal(a, b), "the other UNet gave the same latent: it was not used"
    # free_memory drops the host's node cache: the adapter is loaded from its file again
    assert loader in second.executed and sampler in second.executed, second.executed

    server.free(unload_models=True, free_memory=True)
    third = server.run_ok(ckpt)
    assert loader in third.executed, f"the adapter was not loaded again after /free: {third.executed}"
    assert torch.equal(server.latent(third), a), "same graph after /free and another UNet: latent changed"

    server.free(unload_models=True, free_memory=False, keep=unet_b)  # models unloaded, node outputs kept
    loads = server.server.log_text().count(LOAD_LINE)
    fourth = server.run_ok(unet_b)
    assert loader in fourth.cached, "without free_memory the loader's output stays cached"
    assert server.server.log_text().count(LOAD_LINE) > loads, "the unloaded adapter weights were not loaded again"
    assert torch.equal(server.latent(fourth), b)
    assert server.run_caches()["cached"] == 0
