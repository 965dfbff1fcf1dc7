"""The attn2 patch called exactly as the host calls it, against the decoupled
cross-attention formula computed independently row by row."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ipadapter_fused.nodes import patch as patch_mod
from ipadapter_fused.nodes.patch import Attn2Patch, install
from ipadapter_fused.nodes.prompt import ImagePrompt
from ipadapter_fused.nodes.schedules import Site, SiteWeight

H, D, C_CTX, T = 2, 8, 12, 4
WIDTH = H * D


class FakeWeights(torch.nn.Module):
    """Stands in for models.IPAdapterWeights: per-layer to_k_ip / to_v_ip without bias."""

    def __init__(self, n_layers, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.wk = torch.nn.Parameter(torch.randn(n_layers, WIDTH, C_CTX, generator=g) / math.sqrt(C_CTX))
        self.wv = torch.nn.Parameter(torch.randn(n_layers, WIDTH, C_CTX, generator=g) / math.sqrt(C_CTX))

    def layer_kv(self, i, tokens):
        return tokens @ self.wk[i].T, tokens @ self.wv[i].T


def sdpa_blc(q, k, v):
    b = q.shape[0]
    split = lambda x: x.reshape(x.shape[0], x.shape[1], H, D).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, WIDTH)


@pytest.fixture(autouse=True)
def torch_host_attention(monkeypatch):
    monkeypatch.setattr(patch_mod, "host_attention_fn", lambda extra: (lambda q, k, v, heads: sdpa_blc(q, k, v)))


def extra_options(cond_or_uncond, sigma=5.0, latent=(8, 8)):
    return {
        "n_heads": H, "dim_head": D, "cond_or_uncond": list(cond_or_uncond),
        "sigmas": torch.full((1,), sigma), "original_shape": [2, 4, *latent],
        "block": ("input", 1), "block_index": 0, "transformer_index": 0, "attn_precision": None,
    }


def make_entry(weights, layer_weights, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, T, C_CTX, generator=g)
    return ImagePrompt(weights, tokens, layer_weights, kw.pop("sigma_start", 1e9), kw.pop("sigma_end", 0.0), **kw)


def expected(q, k, v, cond_or_uncond, entries, layer, sigma=5.0, mask_rows=None):
    """Row by row: text attention plus, for every active entry, w * mask * attention over
    the image tokens of that row's chunk (positive for cond, negative for uncond)."""
    out = sdpa_blc(q, k, v)
    per = q.shape[0] // len(cond_or_uncond)
    for e in entries:
        if not (e.sigma_end <= sigma <= e.sigma_start):
            continue
        sw = e.site_weights[layer]
        tok = e.tokens if not sw.swap else torch.stack([torch.zeros_like(e.tokens[0]), e.tokens[0]])
        for b in range(q.shape[0]):
            chunk = cond_or_uncond[b // per]
            t = tok[1 if chunk == 1 else 0]
            ik, iv = t @ e.weights.wk[layer].T, t @ e.weights.wv[layer].T
            w = sw.weight
            if e.embeds_scaling != "V only":
                s = w * (WIDTH / 1280.0 if "C penalty" in e.embeds_scaling else 1.0)
                ik = ik * s
                iv = (iv - iv.mean(0)) + iv.mean(0) * s if "mean" in e.embeds_scaling else iv * s
                w = 1.0
            term = sdpa_blc(q[b:b + 1], ik[None], iv[None])[0] * w
            if mask_rows is not None:
                term = term * mask_rows[b][:, None]
            out[b] += term
    return out


def qkv(batch, lq=64, lt=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, WIDTH, generator=g), torch.randn(batch, lt, WIDTH, generator=g),
            torch.randn(batch, lt, WIDTH, generator=g))


TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 on CPU; only summation order differs


@pytest.mark.parametrize("cond_or_uncond", [[0], [1, 0], [0, 1], [1, 0, 0]])
@pytest.mark.parametrize("scaling", ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"])
def test_patch_matches_formula(cond_or_uncond, scaling):
    weights = FakeWeights(3)
    entry = make_entry(weights, [SiteWeight(0.6), SiteWeight(-0.8), SiteWeight(1.3)], embeds_scaling=scaling)
    for layer in range(3):
        patch = Attn2Patch(layer, (entry,))
        q, k, v = qkv(2 * len(cond_or_uncond))
        got = patch(q, k, v, extra_options(cond_or_uncond))
        torch.testing.assert_close(got, expected(q, k, v, cond_or_uncond, [entry], layer), **TOL)


def test_stacked_entries_and_window():
    weights = FakeWeights(1)
    a = make_entry(weights, [SiteWeight(0.5)], seed=1)
    b = make_entry(weights, [SiteWeight(1.0)], seed=2, sigma_start=3.0, sigma_end=1.0)
    patch = Attn2Patch(0, (a, b))
    q, k, v = qkv(2)
    for sigma in (5.0, 2.0, 0.5):  # b inactive, both active, b inactive
        got = patch(q, k, v, extra_options([1, 0], sigma))
        torch.testing.assert_close(got, expected(q, k, v, [1, 0], [a, b], 0, sigma), **TOL)
    a.release(), b.release()


def test_order_of_stacking_does_not_matter():
    weights = FakeWeights(1)
    a = make_entry(weights, [SiteWeight(0.5)], seed=1)
    b = make_entry(weights, [SiteWeight(0.9)], seed=2)
    q, k, v = qkv(2)
    ab = Attn2Patch(0, (a, b))(q, k, v, extra_options([1, 0]))
    ba = Attn2Patch(0, (b, a))(q, k, v, extra_options([1, 0]))
    assert torch.equal(ab, ba), "stacking order must not change a single bit"


def test_swap_and_zero_weight():
    weights = FakeWeights(2)
    entry = make_entry(weights, [SiteWeight(1.0, swap=True), SiteWeight(0.0)])
    q, k, v = qkv(2)
    for layer in (0, 1):
        got = Attn2Patch(layer, (entry,))(q, k, v, extra_options([0, 1]))
        torch.testing.assert_close(got, expected(q, k, v, [0, 1], [entry], layer), **TOL)
    torch.testing.assert_close(Attn2Patch(1, (entry,))(q, k, v, extra_options([0, 1])), sdpa_blc(q, k, v))


def test_mask_rows_follow_the_token_grid():
    weights = FakeWeights(1)
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0  # left half
    entry = make_entry(weights, [SiteWeight(1.0)], mask=mask)
    q, k, v = qkv(4, lq=64)  # 8x8 latent, full-resolution layer
    got = Attn2Patch(0, (entry,))(q, k, v, extra_options([1, 0]))
    rows = F.interpolate(mask[:, None], size=(8, 8), mode="bilinear")[0, 0].reshape(-1)
    want = expected(q, k, v, [1, 0], [entry], 0, mask_rows=[rows] * 4)
    torch.testing.assert_close(got, want, **TOL)
    # right half of the picture sees text attention only
    text = sdpa_blc(q, k, v)
    right = torch.arange(64).reshape(8, 8)[:, 5:].reshape(-1)
    torch.testing.assert_close(got[:, right], text[:, right], **TOL)


def test_foreign_patch_keeps_working_and_keys():
    calls = []

    def foreign(q, k, v, extra):
        calls.append(extra["block"])
        return sdpa_blc(q, k, v) * 2.0

    weights = FakeWeights(2)
    entry = make_entry(weights, [SiteWeight(0.5), SiteWeight(0.5)])
    sites = [Site(("input", 1, 0), "input", 0, WIDTH, C_CTX, H), Site(("middle", 0, 0), "middle", 1, WIDTH, C_CTX, H)]
    opts = {"transformer_options": {"patches_replace": {"attn2": {("input", 1): foreign}}}}
    before = copy.deepcopy(opts)
    to = install(opts, sites, entry)
    assert opts == before, "install must not mutate the options it was given"
    p = to["patches_replace"]["attn2"][("input", 1, 0)]
    assert p.previous is foreign and ("middle", 0, 0) in to["patches_replace"]["attn2"]
    q, k, v = qkv(2)
    got = p(q, k, v, extra_options([1, 0]))
    want = expected(q, k, v, [1, 0], [entry], 0) + sdpa_blc(q, k, v)  # foreign doubles the text part
    torch.testing.assert_close(got, want, **TOL)
    assert calls
    # a second apply stacks onto the same patch object, keeping the foreign one
    entry2 = make_entry(weights, [SiteWeight(1.0), SiteWeight(1.0)], seed=5)
    to2 = install({"transformer_options": to}, sites, entry2, skip_keys={("middle", 0, 0)})
    p2 = to2["patches_replace"]["attn2"][("input", 1, 0)]
    assert set(p2.entries) == {entry, entry2} and p2.previous is foreign
    assert to2["patches_replace"]["attn2"][("middle", 0, 0)].entries == (entry,)
    # a clone (deepcopy of model_options) gets its own patch object sharing the adapters and
    # the foreign patch, so that an in-place `add` by another pack stays on that clone
    c = copy.deepcopy(to2)["patches_replace"]["attn2"][("input", 1, 0)]
    assert c is not p2 and c.entries == p2.entries and c.previous is foreign
    assert all(a is b for a, b in zip(c.entries, p2.entries))
    c.add(lambda out, q, k, v, extra, **kw: kw["w"] * sdpa_blc(q, k, v), w=0.25, sigma_start=10.0, sigma_end=1.0)
    assert p2.foreign_terms == () and len(c.foreign_terms) == 1
    torch.testing.assert_close(c(q, k, v, extra_options([1, 0])),
                               p2(q, k, v, extra_options([1, 0])) + 0.25 * sdpa_blc(q, k, v), **TOL)
    # outside the added term's own window it adds nothing
    torch.testing.assert_close(c(q, k, v, extra_options([1, 0], sigma=0.5)),
                               p2(q, k, v, extra_options([1, 0], sigma=0.5)), atol=0, rtol=0)


def test_kv_computed_once_per_run():
    weights = FakeWeights(1)
    calls = []
    orig = weights.layer_kv
    weights.layer_kv = lambda i, t: (calls.append(i), orig(i, t))[1]
    entry = make_entry(weights, [SiteWeight(1.0)])
    patch = Attn2Patch(0, (entry,))
    q, k, v = qkv(2)
    for step in range(4):
        patch(q, k, v, extra_options([1, 0], sigma=10.0 - step))
    assert calls == [0, 0]  # one projection per row (positive, negative), once
    entry.release()
    patch(q, k, v, extra_options([1, 0]))
    assert calls == [0, 0, 0, 0]


@pytest.mark.parametrize("scaling", ["V only", "K+mean(V) w/ C penalty"])
def test_patch_through_fused_kernel(scaling):
    """The same patch with the fused kernel (Triton interpreter on CPU) as backend."""
    weights = FakeWeights(1)
    mask = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(7))
    a = make_entry(weights, [SiteWeight(0.7)], seed=1, embeds_scaling=scaling, mask=mask)
    b = make_entry(weights, [SiteWeight(-0.4, swap=True)], seed=2)
    q, k, v = qkv(4, lq=64)
    got = Attn2Patch(0, (a, b), backend="triton")(q, k, v, extra_options([1, 0]))
    rows = F.interpolate(mask[:, None], size=(8, 8), mode="bilinear")[0, 0].reshape(-1)
    ref_a = expected(q, k, v, [1, 0], [a], 0, mask_rows=[rows] * 4)
    ref_b = expected(q, k, v, [1, 0], [b], 0) - sdpa_blc(q, k, v)
    torch.testing.assert_close(got, ref_a + ref_b, atol=1e-4, rtol=1e-4)


class _Sampling:
    """percent_to_sigma of a schedule from `top` down to 0 (linear), like a model_sampling."""

    def __init__(self, top):
        self.top = top

    def percent_to_sigma(self, p):
        return self.top * (1.0 - p)


def test_window_is_resolved_from_the_runs_model_sampling():
    weights = FakeWeights(1)
    entry = make_entry(weights, [SiteWeight(1.0)], sigma_start=7.0, sigma_end=3.0, window=(0.3, 0.7))
    assert entry.active(5.0) and not entry.active(8.0)  # outside a run: the sigmas of apply time
    entry.begin_run(_Sampling(100.0))                  # a run whose schedule was shifted: 70 .. 30
    assert entry.active(50.0) and not entry.active(5.0) and not entry.active(80.0)
    entry.release()
    assert entry.active(5.0) and not entry.active(50.0)


def test_begin_run_reads_a_foreign_patch_on_the_fallback_key():
    """IPAdapter_plus on SD1.5 registers ("input", 1) after this pack registered ("input", 1, 0):
    the host never calls it, so each run makes it this pack's `previous` (in the run's copy)."""
    from ipadapter_fused.nodes.patch import begin_run

    weights = FakeWeights(1)
    entry = make_entry(weights, [SiteWeight(0.5)], window=(0.0, 1.0))
    sites = [Site(("input", 1, 0), "input", 0, WIDTH, C_CTX, H)]
    to = install({}, sites, entry)
    ours = to["patches_replace"]["attn2"][("input", 1, 0)]

    def foreign(q, k, v, extra):
        return sdpa_blc(q, k, v) * 2.0

    run = copy.deepcopy({"transformer_options": to})
    run["transformer_options"]["patches_replace"]["attn2"][("input", 1)] = foreign
    assert begin_run(run, _Sampling(10.0)) == [entry]
    p = run["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert p.previous is foreign and ours.previous is None
    q, k, v = qkv(2)
    want = expected(q, k, v, [1, 0], [entry], 0) + sdpa_blc(q, k, v)  # foreign doubles the text part
    torch.testing.assert_close(p(q, k, v, extra_options([1, 0])), want, **TOL)
    entry.release()
