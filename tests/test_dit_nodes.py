"""DiT pieces that need no host: model family names, per-block weights, patch-grid masks, RoPE inverse."""
from __future__ import annotations

import math

import pytest
import torch

from ipadapter_fused.attention import mask_to_patch_tokens, patch_grid
from ipadapter_fused.nodes.dit_patch import unrotate
from ipadapter_fused.nodes.dit_sites import dit_model, is_dit
from ipadapter_fused.nodes.schedules import Site, resolve_dit_weights


def _fake_model(module: str, name: str = "Model"):
    cls = type(name, (), {})
    cls.__module__ = module
    return cls()


@pytest.mark.parametrize("module,name", [("comfy.ldm.hydit.models", "Hunyuan-DiT"),
                                         ("comfy.ldm.qwen_image.model", "Qwen-Image"),
                                         ("comfy.ldm.wan.model", "Wan"),
                                         ("comfy.ldm.chroma_radiance.model", "Chroma Radiance")])
def test_unsupported_dits_are_named(module, name):
    model = _fake_model(module)
    assert is_dit(model)
    with pytest.raises(ValueError, match=f"the model is {name}, for which no IP-Adapter exists"):
        dit_model(model)


def test_an_unknown_model_is_named_by_its_class():
    with pytest.raises(ValueError, match="the model is SomethingNew"):
        dit_model(_fake_model("somepack.models", "SomethingNew"))


def _blocks(double=4, single=8):
    out = [Site(("double_block", i), "double", i, 64, 0, 2) for i in range(double)]
    out += [Site(("single_block", i), "single", double + i, 64, 0, 2) for i in range(single)]
    return out


def test_ramps_run_over_the_blocks_in_forward_order():
    blocks = _blocks()
    n = len(blocks)
    got = [w.weight for w in resolve_dit_weights(blocks, blocks, "ease in", 2.0)]
    assert got == pytest.approx([2.0 * (0.05 + 0.95 * (1 - t / n)) for t in range(n)])
    got = [w.weight for w in resolve_dit_weights(blocks, blocks, "reverse in-out", 1.0)]
    assert got == pytest.approx([0.05 + 0.95 * abs(t - n / 2) / (n / 2) for t in range(n)])


@pytest.mark.parametrize("weight_type,weak", [("weak input", {0}), ("weak middle", {1}), ("weak output", {2}),
                                              ("strong middle", {0, 2})])
def test_weak_and_strong_types_act_on_thirds(weight_type, weak):
    blocks = _blocks(3, 6)
    got = [w.weight for w in resolve_dit_weights(blocks, blocks, weight_type, 1.0)]
    assert got == pytest.approx([0.2 if (3 * t // 9) in weak else 1.0 for t in range(9)])


def test_custom_names_double_and_single_blocks():
    blocks = _blocks()
    layer_sites = blocks[:4] + blocks[6:7]  # an adapter on the doubles and single block 2
    got = [w.weight for w in resolve_dit_weights(layer_sites, blocks, "custom", 0.5, "d1:1.0, s2:0.4, d3:2")]
    assert got == pytest.approx([0.0, 0.5, 0.0, 1.0, 0.2])
    listed = [w.weight for w in resolve_dit_weights(blocks, blocks, "linear", 1.0, "1, 0.5, 0, 0.25")]
    assert listed == pytest.approx([1.0, 0.5, 0.0, 0.25] + [0.0] * 8)


@pytest.mark.parametrize("text,match", [("s8:1", "does not have.*d0..d3, s0..s7"), ("d0:x", "not understood"),
                                        ("d0:nan", "not a finite"), ("", "needs layer_weights")])
def test_custom_errors(text, match):
    with pytest.raises(ValueError, match=match):
        resolve_dit_weights(_blocks(), _blocks(), "custom", 1.0, text)


@pytest.mark.parametrize("weight_type", ["style transfer", "composition", "style and composition"])
def test_unet_layer_types_are_refused_on_dits(weight_type):
    with pytest.raises(ValueError, match="no meaning on a DiT"):
        resolve_dit_weights(_blocks(), _blocks(), weight_type, 1.0)


@pytest.mark.parametrize("h,w", [(8, 8), (9, 7), (1, 5), (13, 2)])
def test_patch_tokens_average_the_latent_cells_of_each_patch(h, w):
    g = torch.Generator().manual_seed(h * 31 + w)
    mask = torch.rand(2, 3 * h + 1, 2 * w + 3, generator=g)
    cells = torch.nn.functional.interpolate(mask[:, None], size=(h, w), mode="bilinear")[:, 0]
    gh, gw = patch_grid(h, w, 2)
    assert (gh, gw) == (math.ceil(h / 2), math.ceil(w / 2))
    want = torch.zeros(2, gh, gw)
    for i in range(gh):
        for j in range(gw):
            want[:, i, j] = cells[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2))
    torch.testing.assert_close(mask_to_patch_tokens(mask, h, w, 2), want.reshape(2, -1))


def test_unrotate_inverts_a_rotation_per_channel_pair():
    g = torch.Generator().manual_seed(0)
    b, heads, n, d = 2, 3, 5, 8
    angle = torch.rand(b, 1, n, d // 2, generator=g) * 6.0
    pe = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], -1)
    pe = pe.reshape(b, 1, n, d // 2, 2, 2)
    q = torch.randn(b, heads, n, d, generator=g)
    pairs = q.reshape(b, heads, n, d // 2, 2)
    # rotate: out_i = pe[i, 0] * x0 + pe[i, 1] * x1 (the 2x2 matrix times the pair)
    rotated = torch.einsum("bxnpij,bhnpj->bhnpi", pe, pairs).reshape(q.shape)
    torch.testing.assert_close(unrotate(rotated, pe), q, atol=1e-6, rtol=1e-6)
