"""start_at / end_at follow the schedule of the run, not the one at apply time (issue 6).

A ModelSampling node chained after the apply node replaces model_sampling, and with it the
sigmas that "30 % of the schedule" means. The window must be resolved when sampling starts,
from the model's model_sampling of that run, as the host does for ControlNet. Before the fix
the apply node turned the fractions into sigmas of the model it was given, so after a
zero-terminal-SNR (or shifted) schedule the adapter acted on the wrong steps."""
import pytest

from test_gaps_harness import CLIP, LayerProbe, apply, check_layers, host_attention, image, image_term, make_adapter


def _shift(model, node, *args):
    import comfy_extras.nodes_model_advanced as advanced
    return getattr(advanced, node)().patch(model, *args)[0]


def formula(state, layer_of, tokens, weight, active):
    """text + weight * image attention (positive tokens for cond rows, negative for uncond),
    the image term only where active(sigma)."""

    def reference(key, q, k, v, extra):
        heads = extra["n_heads"]
        out = host_attention(q, k, v, heads)
        if not active(float(extra["sigmas"][0])):
            return out
        n = 2 * layer_of[key] + 1
        term = image_term(state, n, tokens, q, extra)
        return out + weight * term

    return reference


# (node, its inputs, start_at, end_at): zero-terminal SNR moves the early steps, a flow shift
# (SD3/Flux users' node) the whole schedule
NODES = [("ModelSamplingDiscrete", ("eps", True), 0.15, 0.75), ("ModelSamplingSD3", (3.0,), 0.3, 0.75)]


@pytest.mark.parametrize("node,args,start_at,end_at", NODES)
def test_window_follows_a_model_sampling_node_after_the_apply_node(host, node, args, start_at, end_at, tiny_sd15,
                                                                  tiny_clip_vision, sampler, cond, tmp_path):
    from ipadapter_fused.nodes.encode import encode_images, image_tokens
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, state, _ = make_adapter(host, model, "base", tmp_path)
    img = image(torch)
    weight = 0.8

    patched = apply(model, adapter, cv, img, weight=weight, start_at=start_at, end_at=end_at)
    shifted = _shift(patched, node, *args)
    probe = LayerProbe()
    sampler(probe.attach(shifted), cond("sd15", seed=1), cond("sd15", seed=2), steps=6, latent_size=8)

    live = shifted.get_model_object("model_sampling")
    lo, hi = live.percent_to_sigma(end_at), live.percent_to_sigma(start_at)
    old = model.get_model_object("model_sampling")
    old_lo, old_hi = old.percent_to_sigma(end_at), old.percent_to_sigma(start_at)
    steps = probe.sigmas()
    on = [lo <= s <= hi for s in steps]
    # the test means something only if the two schedules put the window on other steps
    assert on != [old_lo <= s <= old_hi for s in steps], (steps, (lo, hi), (old_lo, old_hi))
    assert any(on) and not all(on), (steps, lo, hi)

    pos, neg = encode_images(cv, adapter.spec, img, None)
    tokens = image_tokens(adapter.weights, pos, neg, "concat")
    layer_of = {s.key: i for i, s in enumerate(unet_attn2_sites(model.get_model_object("diffusion_model")))}
    check_layers(torch, model, probe.calls, formula(state, layer_of, tokens, weight, lambda s: lo <= s <= hi),
                 min_calls=16 * len(steps))


def test_apply_after_or_before_the_model_sampling_node_is_the_same(host, tiny_sd15, tiny_clip_vision, sampler, cond,
                                                                 tmp_path):
    """Order of the two nodes does not matter; and the run's window does not stick to the
    adapter: the same patched model without the node samples with its own schedule again."""
    torch = host.torch
    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    adapter, _, _ = make_adapter(host, model, "base", tmp_path)
    img = image(torch)
    kw = dict(weight=0.8, start_at=0.3, end_at=0.75)

    def run(m):
        return sampler(m, cond("sd15", seed=1), cond("sd15", seed=2), steps=6, latent_size=8)

    patched = apply(model, adapter, cv, img, **kw)
    after = run(_shift(patched, "ModelSamplingSD3", 3.0))
    before = run(apply(_shift(model, "ModelSamplingSD3", 3.0), adapter, cv, img, **kw))
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    plain = run(patched)
    torch.testing.assert_close(plain, run(apply(model, adapter, cv, img, **kw)), atol=0, rtol=0)
    assert (plain - after).abs().max() > 1e-3
