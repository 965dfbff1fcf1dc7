"""Random combinations of the apply node's settings against the written-out formula, layer by
layer, in the real host (issue 6, property test).

For every cross-attention call of a short sampling run on a tiny host UNet, the layer's output
must equal, on the same inputs,

    to_out( Attn(q, K, V) + [sigma in window] * w_l * m * Attn(q, K_ip, V_ip) )

with, written out here from the reference pack's definitions (ComfyUI_IPAdapter_plus):
  - w_l: the weight of layer l for the weight type (ease curves over the transformer index,
    block factors, the style/composition tables, custom `index:factor` layer weights), zero
    on the middle block when it is skipped;
  - the "precise" types feeding the positive image through the negative rows on some layers;
  - embeds_scaling: V only (w on the output), K+V (w on K and V), the C penalty (w * width /
    1280) and K+mean(V);
  - the window from start_at / end_at through the model's model_sampling;
  - the mask resized (bilinear) to the grid the host's Downsample gives each level;
  - K_ip = t W_k^T, V_ip = t W_v^T with the checkpoint's tensors, t the image tokens of the
    row's chunk (positive for cond rows, negative for uncond rows; several images joined).
The image tokens themselves come from the pack's encoder and projection (checked against
the written-out projection and against IPAdapter_plus elsewhere).

Hypothesis runs a fixed, derandomized set of examples so the test is deterministic."""
from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from test_gaps_harness import CLIP, LayerProbe, apply, check_layers, host_attention, image, make_adapter  # noqa: E402
from test_gaps_masks import host_grids  # noqa: E402

WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise", "custom"]
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
COMBINE = ["concat", "add", "subtract", "average", "norm average", "max", "min"]
LATENT = (8, 12)
STEPS = 2

_SD15_STYLE = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)


def layer_table(weight_type, w, wc, sdxl, layer_weights):
    """IPAdapter_plus's per-transformer weight dicts (None: the weight is not a table)."""
    if layer_weights:
        return {int(k): float(v) * w for k, v in (p.split(":") for p in layer_weights.split(","))}
    if weight_type == "style transfer":
        return {6: w} if sdxl else {i: w for i in _SD15_STYLE}
    if weight_type == "composition":
        return {3: w} if sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong style transfer":
        return {i: w for i in ((0, 1, 2, 4, 5, 6, 7, 8, 9, 10) if sdxl else (0, 1, 2, 3) + tuple(range(6, 16)))}
    if weight_type in ("style and composition", "style transfer precise"):
        c = w if weight_type == "style transfer precise" else wc
        if sdxl:
            return {3: c, 6: w}
        return {**{i: w for i in _SD15_STYLE}, 4: c * 0.25, 5: c}
    if weight_type == "composition precise":
        if sdxl:
            return {**{i: w * 0.1 for i in range(11)}, 3: w, 6: w}
        return {**{i: w for i in range(16)}, 4: w * 0.25, 5: w, 6: w * 0.1, 7: w * 0.1, 8: w * 0.1}
    return None


def expected_weight(weight_type, t, block, sdxl, w, wc, layer_weights):
    """(weight, swap) of the transformer with index t in block `block`."""
    n = 11 if sdxl else 16
    comp = {3} if sdxl else {4, 5}
    table = layer_table(weight_type, w, wc, sdxl, layer_weights)
    if table is not None:
        if t not in table:
            return 0.0, False
        swap = (weight_type == "style transfer precise" and t in comp) or \
               (weight_type == "composition precise" and t not in comp)
        return table[t], swap
    if weight_type == "ease in":
        return w * (0.05 + 0.95 * (1 - t / n)), False
    if weight_type == "ease out":
        return w * (0.05 + 0.95 * (t / n)), False
    if weight_type == "ease in-out":
        return w * (0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2))), False
    if weight_type == "reverse in-out":
        return w * (0.05 + 0.95 * (abs(t - n / 2) / (n / 2))), False
    factor = {"weak input": ("input",), "weak output": ("output",), "weak middle": ("middle",),
              "strong middle": ("input", "output")}.get(weight_type, ())
    return (w * 0.2 if block in factor else w), False


def image_term(q, tokens_pos, tokens_neg, wk, wv, w, scaling, extra):
    """The image term of one layer, rows by chunk, with the embeds scaling written out."""
    import torch

    heads, chunks = extra["n_heads"], extra["cond_or_uncond"]
    per = q.shape[0] // len(chunks)
    rows = []
    for b in range(q.shape[0]):
        t = (tokens_neg if chunks[b // per] == 1 else tokens_pos).reshape(1, -1, wk.shape[1])
        k_ip, v_ip = t @ wk.T, t @ wv.T
        if scaling == "V only":
            rows.append(w * host_attention(q[b:b + 1], k_ip, v_ip, heads))
            continue
        s = w * k_ip.shape[-1] / 1280.0 if "C penalty" in scaling else w
        if scaling.startswith("K+mean(V)"):
            mean = v_ip.mean(dim=1, keepdim=True)
            v_ip = (v_ip - mean) + mean * s
        else:
            v_ip = v_ip * s
        rows.append(host_attention(q[b:b + 1], k_ip * s, v_ip, heads))
    return torch.cat(rows)


@st.composite
def settings_strategy(draw):
    kind = draw(st.sampled_from(["sd15"] * 5 + ["sdxl"]))  # SDXL's 70 layers cost 4x
    weight_type = draw(st.sampled_from(WEIGHT_TYPES))
    n_transformers = 11 if kind == "sdxl" else 16
    layer_weights = ""
    if weight_type == "custom" or draw(st.integers(0, 5)) == 0:
        idx = draw(st.lists(st.integers(0, n_transformers - 1), min_size=1, max_size=4, unique=True))
        layer_weights = ",".join(f"{i}:{draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5]))}" for i in idx)
    start_at = draw(st.sampled_from([0.0, 0.2, 0.5]))
    end_at = draw(st.sampled_from([x for x in (0.3, 0.6, 1.0) if x >= start_at]))
    mask = None
    if draw(st.booleans()):
        y0, x0 = draw(st.integers(0, 20)), draw(st.integers(0, 30))
        mask = (y0, draw(st.integers(y0 + 1, 32)), x0, draw(st.integers(x0 + 1, 48)))
    return dict(
        kind=kind,
        layout=draw(st.sampled_from(["base", "plus"])),
        weight=draw(st.sampled_from([-0.5, 0.3, 0.8, 1.0, 1.7, 3.0])),
        weight_type=weight_type,
        weight_composition=draw(st.sampled_from([0.5, 1.0, 2.0])),
        start_at=start_at, end_at=end_at,
        combine_embeds=draw(st.sampled_from(COMBINE)),
        n_images=draw(st.integers(1, 3)),
        embeds_scaling=draw(st.sampled_from(EMBEDS_SCALING)),
        mask=mask,
        middle_block=draw(st.sampled_from(["patch", "skip (IPAdapter_plus compatible)"])),
        negative=draw(st.booleans()),
        layer_weights=layer_weights,
    )


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _module_state(host):
    # The tiny UNets run thousands of small ops; on a shared 2-core machine intra-op threads
    # mostly wait on each other (measured: 3-5x slower wall time than one thread).
    threads = host.torch.get_num_threads()
    host.torch.set_num_threads(1)
    yield
    host.torch.set_num_threads(threads)
    _CACHE.clear()  # while the host's modules are alive (ModelPatcher.__del__ needs them)


def _fixtures(host, kind, layout, tiny_sd15, tiny_sdxl, tiny_clip_vision, tmp_path_factory):
    """The models, encoder and adapters built once for all examples."""
    if "cv" not in _CACHE:
        _CACHE["cv"] = tiny_clip_vision(**CLIP)
    if kind not in _CACHE:
        _CACHE[kind] = (tiny_sd15 if kind == "sd15" else tiny_sdxl)()
    key = (kind, layout)
    if key not in _CACHE:
        _CACHE[key] = make_adapter(host, _CACHE[kind], layout, tmp_path_factory.mktemp("adapters"))
    return _CACHE[kind], _CACHE["cv"], _CACHE[key]


@settings(max_examples=25, derandomize=True, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(opts=settings_strategy())
def test_apply_settings_match_the_formula(host, opts, tiny_sd15, tiny_sdxl, tiny_clip_vision, sampler, cond,
                                          tmp_path_factory):
    import torch.nn.functional as F

    from ipadapter_fused.nodes.encode import encode_images, image_tokens
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    kind, sdxl = opts["kind"], opts["kind"] == "sdxl"
    model, cv, (adapter, state, _) = _fixtures(host, kind, opts["layout"], tiny_sd15, tiny_sdxl, tiny_clip_vision,
                                               tmp_path_factory)
    img = image(torch, seed=3, n=opts["n_images"])
    negative = image(torch, seed=7) if opts["negative"] else None
    mask = None
    if opts["mask"] is not None:
        y0, y1, x0, x1 = opts["mask"]
        mask = torch.zeros(1, 32, 48)
        mask[:, y0:y1, x0:x1] = 1.0

    patched = apply(model, adapter, cv, img, weight=opts["weight"], weight_type=opts["weight_type"],
                    start_at=opts["start_at"], end_at=opts["end_at"], combine_embeds=opts["combine_embeds"],
                    embeds_scaling=opts["embeds_scaling"], middle_block=opts["middle_block"],
                    image_negative=negative, attn_mask=mask, layer_weights=opts["layer_weights"],
                    weight_composition=opts["weight_composition"])
    probe = LayerProbe()
    sampler(probe.attach(patched), cond(kind, seed=1), cond(kind, seed=2), steps=STEPS,
            latent=torch.zeros(1, 4, *LATENT))

    pos, neg = encode_images(cv, adapter.spec, img, negative)
    tokens = image_tokens(adapter.weights, pos, neg, opts["combine_embeds"])
    sites = {s.key: (i, s) for i, s in enumerate(unet_attn2_sites(model.get_model_object("diffusion_model")))}
    sampling = model.get_model_object("model_sampling")
    lo, hi = sampling.percent_to_sigma(opts["end_at"]), sampling.percent_to_sigma(opts["start_at"])
    grids = {h * w: (h, w) for h, w in host_grids(host, *LATENT)}
    skip_middle = opts["middle_block"] != "patch"

    def reference(key, q, k, v, extra):
        out = host_attention(q, k, v, extra["n_heads"])
        i, site = sites[key]
        w, swap = expected_weight(opts["weight_type"], site.transformer_index, site.block, sdxl, opts["weight"],
                                  opts["weight_composition"], opts["layer_weights"])
        sigma = float(extra["sigmas"][0])
        if w == 0 or not lo <= sigma <= hi or (skip_middle and site.block == "middle"):
            return out
        t_pos, t_neg = (torch.zeros_like(tokens[0]), tokens[0]) if swap else (tokens[0], tokens[1])
        n = 2 * i + 1
        term = image_term(q, t_pos, t_neg, state[f"ip_adapter.{n}.to_k_ip.weight"],
                          state[f"ip_adapter.{n}.to_v_ip.weight"], w, opts["embeds_scaling"], extra)
        if mask is not None:
            m = F.interpolate(mask[:, None], size=grids[q.shape[1]], mode="bilinear").reshape(1, -1, 1)
            term = term * m
        return out + term

    n_sites = 70 if sdxl else 16
    check_layers(torch, model, probe.calls, reference, atol=1e-5, rtol=1e-5, min_calls=n_sites * STEPS)
