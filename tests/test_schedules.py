"""Per-layer weights against the numbers of the established implementation."""
import pytest

from ipadapter_fused.nodes.schedules import Site, WEIGHT_TYPES, parse_layer_weights, resolve_site_weights


def _sites(kind):
    """Sites in checkpoint order with their host transformer indices, built by hand from
    the UNet block layout (independent of nodes.unet_sites)."""
    sites = []
    if kind == "sd15":
        inputs = [1, 2, 4, 5, 7, 8]
        outputs = [3, 4, 5, 6, 7, 8, 9, 10, 11]
        for t, b in enumerate(inputs):
            sites.append(Site(("input", b, 0), "input", t, 320, 768, 8))
        for j, b in enumerate(outputs):
            sites.append(Site(("output", b, 0), "output", 7 + j, 320, 768, 8))
        sites.append(Site(("middle", 0, 0), "middle", 6, 1280, 768, 8))
    else:
        t = 0
        for b, depth in ((4, 2), (5, 2), (7, 10), (8, 10)):
            sites += [Site(("input", b, i), "input", t, 640, 2048, 10) for i in range(depth)]
            t += 1
        t_out = 5
        for b, depth in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)):
            sites += [Site(("output", b, i), "output", t_out, 1280, 2048, 20) for i in range(depth)]
            t_out += 1
        sites += [Site(("middle", 0, i), "middle", 4, 1280, 2048, 20) for i in range(10)]
    return sites


def _by_t(sites, sw):
    out = {}
    for s, w in zip(sites, sw):
        out.setdefault(s.transformer_index, set()).add((w.weight, w.swap))
    assert all(len(v) == 1 for v in out.values()), "sites of one transformer must share a weight"
    return {t: next(iter(v)) for t, v in out.items()}


def test_site_counts():
    assert len(_sites("sd15")) == 16 and len(_sites("sdxl")) == 70


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_linear_is_flat(kind):
    sw = resolve_site_weights(_sites(kind), "linear", 0.7)
    assert {(w.weight, w.swap) for w in sw} == {(0.7, False)}


@pytest.mark.parametrize("kind,n", [("sd15", 16), ("sdxl", 11)])
def test_ease_curves(kind, n):
    sites = _sites(kind)
    for wt, f in {
        "ease in": lambda t: 0.05 + 0.95 * (1 - t / n),
        "ease out": lambda t: 0.05 + 0.95 * (t / n),
        "ease in-out": lambda t: 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)),
        "reverse in-out": lambda t: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2)),
    }.items():
        got = _by_t(sites, resolve_site_weights(sites, wt, 2.0))
        for t, (w, swap) in got.items():
            assert w == pytest.approx(2.0 * f(t), abs=1e-12)
            assert not swap


def test_block_weights_sdxl():
    sites = _sites("sdxl")
    for wt, expect in {
        "weak input": {"input": 0.2, "middle": 1.0, "output": 1.0},
        "weak middle": {"input": 1.0, "middle": 0.2, "output": 1.0},
        "weak output": {"input": 1.0, "middle": 1.0, "output": 0.2},
        "strong middle": {"input": 0.2, "middle": 1.0, "output": 0.2},
    }.items():
        for s, w in zip(sites, resolve_site_weights(sites, wt, 1.0)):
            assert w.weight == pytest.approx(expect[s.block])


def test_style_and_composition_tables():
    sdxl, sd15 = _sites("sdxl"), _sites("sd15")
    got = _by_t(sdxl, resolve_site_weights(sdxl, "style transfer", 1.5))
    assert {t for t, (w, _) in got.items() if w} == {6} and got[6][0] == 1.5
    got = _by_t(sdxl, resolve_site_weights(sdxl, "composition", 1.5))
    assert {t for t, (w, _) in got.items() if w} == {3}
    got = _by_t(sd15, resolve_site_weights(sd15, "composition", 2.0))
    assert got[4][0] == 0.5 and got[5][0] == 2.0 and sum(1 for w, _ in got.values() if w) == 2
    got = _by_t(sd15, resolve_site_weights(sd15, "style transfer", 1.0))
    assert {t for t, (w, _) in got.items() if w} == {0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15}
    got = _by_t(sdxl, resolve_site_weights(sdxl, "style and composition", 1.0, weight_composition=0.3))
    assert got[3][0] == 0.3 and got[6][0] == 1.0
    got = _by_t(sdxl, resolve_site_weights(sdxl, "strong style transfer", 1.0))
    assert {t for t, (w, _) in got.items() if w} == {0, 1, 2, 4, 5, 6, 7, 8, 9, 10}


def test_precise_types_swap_tokens():
    sdxl, sd15 = _sites("sdxl"), _sites("sd15")
    got = _by_t(sdxl, resolve_site_weights(sdxl, "style transfer precise", 1.0))
    assert got[3] == (1.0, True) and got[6] == (1.0, False)
    got = _by_t(sdxl, resolve_site_weights(sdxl, "composition precise", 1.0))
    assert got[3] == (1.0, False) and got[6] == (1.0, True) and got[0] == (pytest.approx(0.1), True)
    got = _by_t(sd15, resolve_site_weights(sd15, "style transfer precise", 1.0))
    assert got[4] == (0.25, True) and got[5] == (1.0, True) and got[0] == (1.0, False)


def test_custom_layer_weights():
    sites = _sites("sdxl")
    got = _by_t(sites, resolve_site_weights(sites, "custom", 2.0, layer_weights="3:0.5, 6:1"))
    assert got[3][0] == 1.0 and got[6][0] == 2.0 and got[0][0] == 0.0
    with pytest.raises(ValueError, match="valid indices 0..10"):
        resolve_site_weights(sites, "custom", 1.0, layer_weights="11:1")
    with pytest.raises(ValueError, match="needs layer_weights"):
        resolve_site_weights(sites, "custom", 1.0)
    with pytest.raises(ValueError, match="not understood"):
        parse_layer_weights("a:b", 11)
    assert parse_layer_weights("1, 0.5", 11) == {0: 1.0, 1: 0.5}


def test_unknown_weight_type():
    with pytest.raises(ValueError, match="unknown weight_type"):
        resolve_site_weights(_sites("sd15"), "strongest", 1.0)
    assert "linear" in WEIGHT_TYPES
