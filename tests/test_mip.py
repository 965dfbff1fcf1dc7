"""MIP-Adapter and multi-reference merging: checkpoints (detection, loading, damage) and the
merges of attention/merge.py, each against the formula written out here with plain torch.

The reference processor below follows MIP-Adapter's IPAttnProcessor.__call__
(github.com/hqhQAQ/MIP-Adapter, ip_adapter/attention_processor_multi.py lines 140-231) step by
step in float64: diffusers' head_to_batch_dim / get_attention_scores / batch_to_head_dim
spelled out as reshapes, baddbmm-style scores and a softmax over the last dim."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ipadapter_fused.attention import (
    attention_routed_merge,
    entity_attention_map,
    entity_token_slice,
    mask_routed_merge,
    mip_merge,
    object_weights,
)
from ipadapter_fused.models import (
    COMBINE_METHODS,
    AdapterFormatError,
    IPAdapterWeights,
    combine_embeds,
    combine_embeds_weighted,
    detect_family,
    expected_shapes,
    load_adapter_file,
    save_synthetic_mip_adapter,
    synthetic_mip_state,
)
from ipadapter_fused.models.synthetic import nest_state, sd15_layer_dims, sdxl_layer_dims, synthetic_adapter_state

# Tiny SDXL-structured MIP files: 70 layers of width 64/128 (model channels 32), context 16.
TINY = dict(model_channels=32, context_dim=16, encoder_width=24)
# the merges compute in float32; the written-out formulas below in float64
F32 = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the reference processor, written out


def _to_heads(x, heads):  # diffusers head_to_batch_dim: (B, L, H*D) -> (B*H, L, D)
    b, l, c = x.shape
    return x.reshape(b, l, heads, c // heads).permute(0, 2, 1, 3).reshape(b * heads, l, c // heads)


def _from_heads(x, heads):  # batch_to_head_dim: (B*H, L, D) -> (B, L, H*D)
    bh, l, d = x.shape
    return x.reshape(bh // heads, heads, l, d).permute(0, 2, 1, 3).reshape(bh // heads, l, heads * d)


def _scores(query, key, dim_head):  # get_attention_scores: softmax(alpha * Q K^T, dim=-1), alpha = D^-0.5
    return torch.softmax(torch.bmm(query, key.transpose(-1, -2)) * dim_head ** -0.5, dim=-1)


def reference_processor(x, text, ip_tokens, entity_text, token_lens, W, heads, scale):
    """MIP's IPAttnProcessor from `x` (B, Lq, hidden) up to the sum before to_out.

    text: (B, Lt, ctx). ip_tokens: (B, N*T, ctx) (objects after the text in the reference, split
    off at line 175). entity_text: (B, N, Le, ctx). token_lens[b][i]: entity i's token count."""
    b, lq, hidden = x.shape
    n = entity_text.shape[1]
    d = hidden // heads
    query = _to_heads(x @ W["q"].T, heads)                                              # line 167, 184
    hidden_states = _from_heads(torch.bmm(_scores(query, _to_heads(text @ W["k"].T, heads), d),
                                          _to_heads(text @ W["v"].T, heads)), heads)    # line 185
    ip = ip_tokens.reshape(b, n, -1, ip_tokens.shape[-1])                              # line 188
    terms, word_maps = [], []
    for i in range(n):                                                                  # lines 191-209
        k_ip = _to_heads(ip[:, i] @ W["k_ip"].T, heads)
        v_ip = _to_heads(ip[:, i] @ W["v_ip"].T, heads)
        terms.append(scale * _from_heads(torch.bmm(_scores(query, k_ip, d), v_ip), heads))
        # cross_attention_attn: get_attention_scores(key, query): text rows attend over latent positions
        k_ent = _to_heads(entity_text[:, i] @ W["k"].T, heads)
        word_maps.append(_scores(k_ent, query, d).reshape(b, heads, -1, lq))
    terms = torch.stack(terms, dim=1)                                                   # (B, N, Lq, C)
    word_maps = torch.stack(word_maps, dim=1).mean(dim=2)                               # (B, N, Le, Lq)
    sel = torch.stack([torch.stack([word_maps[bi, i, 1:1 + token_lens[bi][i]].mean(dim=0) for i in range(n)])
                       for bi in range(b)])                                             # (B, N, Lq)
    sel = sel / sel.sum(dim=1, keepdim=True)                                            # line 224
    gate = torch.sigmoid(hidden_states @ W["gate"].T)                                   # line 226, (B, Lq, 1)
    gate = (gate / gate.mean(dim=1, keepdim=True)).unsqueeze(1)                         # line 227
    w = sel.unsqueeze(-1) * gate                                                        # line 225, 228
    return hidden_states + (w * terms).sum(dim=1), hidden_states                        # lines 230-231


def _sdpa(q, k, v, heads):
    b, lq, c = q.shape

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, lq, c)


@pytest.fixture(scope="module")
def mip_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("mip") / "model_sdxl.bin"
    save_synthetic_mip_adapter(path, "base", seed=3, dtype=torch.float32, **TINY)
    return load_adapter_file(path)


@pytest.mark.parametrize("token_lens", [[[1, 1], [1, 1]], [[3, 1], [2, 4]]], ids=["one-token", "multi-token"])
def test_mip_layer_matches_reference_processor(mip_weights, token_lens):
    """One layer end to end: the pack's pieces (entity maps, gate logits from the loaded file,
    mip_merge) reproduce the reference processor, including words of several tokens."""
    torch.manual_seed(0)
    layer = 5
    hidden = mip_weights.spec.layer_dims[layer]
    heads, ctx, b, lq, lt, le, n, t = hidden // 64, 16, 2, 12, 7, 6, 2, 4
    g = mip_weights.ip_adapter[str(2 * layer + 1)]
    W = {"q": torch.randn(hidden, hidden) / hidden ** 0.5, "k": torch.randn(hidden, ctx) / ctx ** 0.5,
         "v": torch.randn(hidden, ctx) / ctx ** 0.5, "k_ip": g.to_k_ip.weight.double(),
         "v_ip": g.to_v_ip.weight.double(), "gate": g.text_to_weight.weight.double() * 4}
    W = {k: v.double() for k, v in W.items()}
    x, text = torch.randn(b, lq, hidden).double(), torch.randn(b, lt, ctx).double()
    ip_tokens, entity_text = torch.randn(b, n * t, ctx).double(), torch.randn(b, n, le, ctx).double()
    scale = 0.75
    want, o_text_ref = reference_processor(x, text, ip_tokens, entity_text, token_lens, W, heads, scale)

    q = x @ W["q"].T
    o_text = _sdpa(q, text @ W["k"].T, text @ W["v"].T, heads)
    torch.testing.assert_close(o_text, o_text_ref)
    terms, maps = [], []
    for i in range(n):
        k_ip, v_ip = mip_weights.layer_kv(layer, ip_tokens[:, i * t:(i + 1) * t].float())
        terms.append(scale * _sdpa(q, k_ip.double(), v_ip.double(), heads))
        longest = max(lens[i] for lens in token_lens)
        rows = entity_token_slice(longest, le)
        k_ent = (entity_text[:, i] @ W["k"].T)[:, rows]
        mask = torch.tensor([[j < lens[i] for j in range(longest)] for lens in token_lens])
        maps.append(entity_attention_map(q, k_ent, heads, token_mask=mask))
    # the loaded gate (float32) on the float64 text output, times the same 4 the reference used
    logits = 4 * mip_weights.gate_logits(layer, o_text.float()).double()
    got = o_text + mip_merge(terms, maps, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_entity_map_sums_to_one_and_selects_rows():
    torch.manual_seed(1)
    q, k = torch.randn(2, 9, 8), torch.randn(2, 5, 8)
    m = entity_attention_map(q, k, heads=2)
    torch.testing.assert_close(m.sum(dim=-1), torch.ones(2))
    # the map of rows {0, 2} is the mean of each row's own map (softmax rows are independent)
    both = entity_attention_map(q, k, 2, token_mask=torch.tensor([[1, 0, 1, 0, 0]] * 2))
    torch.testing.assert_close(both, (entity_attention_map(q, k[:, :1], 2) + entity_attention_map(q, k[:, 2:3], 2)) / 2)
    assert entity_token_slice(3, 77) == slice(1, 4)
    with pytest.raises(ValueError, match="does not fit"):
        entity_token_slice(77, 77)
    with pytest.raises(ValueError, match="no token"):
        entity_attention_map(q, k, 2, token_mask=torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))


def _loop_merge(terms, maps, gate_logits=None, weights=None):
    """out[b, l, :] = sum_i w_i * p_i[b, l] / sum_j p_j[b, l] * G[b, l] * terms_i[b, l, :], loops only."""
    n, (b, lq, c) = len(terms), terms[0].shape
    out = torch.zeros(b, lq, c, dtype=torch.float64)
    for bi in range(b):
        if gate_logits is not None:
            sig = [1.0 / (1.0 + math.exp(-float(gate_logits[bi, l, 0]))) for l in range(lq)]
            mean = sum(sig) / lq
        for l in range(lq):
            total = sum(float(maps[j][bi, l]) for j in range(n))
            gate = sig[l] / mean if gate_logits is not None else 1.0
            for i in range(n):
                wi = 1.0 if weights is None else weights[i]
                out[bi, l] += wi * float(maps[i][bi, l]) / total * gate * terms[i][bi, l].double()
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_mip_and_routed_merge_against_loops(n):
    torch.manual_seed(n)
    b, lq, c = 2, 6, 5
    terms = [torch.randn(b, lq, c) for _ in range(n)]
    maps = [torch.rand(b, lq) + 0.01 for _ in range(n)]
    logits = torch.randn(b, lq, 1) * 2
    torch.testing.assert_close(mip_merge(terms, maps, logits).double(), _loop_merge(terms, maps, logits), **F32)
    torch.testing.assert_close(attention_routed_merge(terms, maps).double(), _loop_merge(terms, maps), **F32)
    w = [0.5, 2.0, 1.5][:n]
    torch.testing.assert_close(mip_merge(terms, maps, logits, weights=w).double(),
                               _loop_merge(terms, maps, logits, w), **F32)
    # stacked tensors and (B, Lq) logits are accepted the same
    torch.testing.assert_close(mip_merge(torch.stack(terms), torch.stack(maps), logits[..., 0]),
                               mip_merge(terms, maps, logits))
    # dtype follows the terms
    assert mip_merge([t.half() for t in terms], maps, logits).dtype == torch.float16


def test_object_weights_properties():
    torch.manual_seed(2)
    maps = torch.rand(3, 2, 10) + 0.1
    w = object_weights(maps)
    torch.testing.assert_close(w.sum(dim=0), torch.ones(2, 10))
    wg = object_weights(maps, torch.randn(2, 10, 1) * 3)
    # the gate redistributes over positions: summed over objects it averages 1 per row
    torch.testing.assert_close(wg.sum(dim=0).mean(dim=-1), torch.ones(2))
    # maps of all-zero (underflowed) positions give 0 weights, not NaN
    maps[:, 0, 3] = 0
    assert object_weights(maps)[:, 0, 3].eq(0).all()


def _loop_mask(terms, masks, weights=None, normalize=True):
    n, (b, lq, c) = len(terms), terms[0].shape
    out = torch.zeros(b, lq, c, dtype=torch.float64)
    for bi in range(b):
        for l in range(lq):
            total = sum(float(masks[j][min(bi, masks[j].shape[0] - 1), l]) for j in range(n))
            div = max(1.0, total) if normalize else 1.0
            for i in range(n):
                m = float(masks[i][min(bi, masks[i].shape[0] - 1), l])
                out[bi, l] += (1.0 if weights is None else weights[i]) * m / div * terms[i][bi, l].double()
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_mask_routed_merge_against_loops(normalize):
    torch.manual_seed(4)
    b, lq, c = 2, 8, 3
    terms = [torch.randn(b, lq, c) for _ in range(2)]
    hard_a = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)          # (1, Lq): one for every row
    soft_b = torch.tensor([[0, 0, 0.5, 1, 1, 0.25, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]])  # overlaps a at 2, 3
    masks = [hard_a, soft_b]
    got = mask_routed_merge(terms, masks, weights=[1.0, 0.8], normalize=normalize)
    torch.testing.assert_close(got.double(), _loop_mask(terms, masks, [1.0, 0.8], normalize), **F32)
    # outside every mask the merge is exactly zero
    assert got[0, 6:].eq(0).all() and got[1, 4:].eq(0).all()


def test_merge_errors():
    t = [torch.zeros(1, 4, 2)] * 2
    with pytest.raises(ValueError, match="2 terms but 3"):
        attention_routed_merge(t, [torch.ones(1, 4)] * 3)
    with pytest.raises(ValueError, match="do not fit"):
        attention_routed_merge(t, [torch.ones(1, 5)] * 2)
    with pytest.raises(ValueError, match="do not fit"):
        mip_merge(t, [torch.ones(1, 4)] * 2, torch.zeros(1, 5, 1))
    with pytest.raises(ValueError, match="1 weights for 2"):
        mask_routed_merge(t, [torch.ones(1, 4)] * 2, weights=[1.0])
    with pytest.raises(ValueError, match="no objects"):
        mip_merge([], [])


# --------------------------------------------------------------------------------------------
# per-image weights for every combine method


def _loop_combine(x, w, method):
    x, n = x.double(), x.shape[0]
    if method == "concat":
        return torch.stack([w[i] * x[i] for i in range(n)])
    if method == "add":
        return sum(w[i] * x[i] for i in range(n))[None]
    if method == "subtract":
        return (w[0] * x[0] - sum(w[i] * x[i] for i in range(1, n)) / sum(w[1:]))[None]
    if method == "average":
        return (sum(w[i] * x[i] for i in range(n)) / sum(w))[None]
    if method == "norm average":
        norm = torch.sqrt(sum(x[i] ** 2 for i in range(n)))
        return (sum(w[i] * x[i] / norm for i in range(n)) / sum(w))[None]
    pick = torch.maximum if method == "max" else torch.minimum
    out = w[0] * x[0]
    for i in range(1, n):
        out = pick(out, w[i] * x[i])
    return out[None]


@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_weighted_combine_every_method(method):
    torch.manual_seed(5)
    x = torch.randn(3, 4, 6)
    w = [0.25, 1.5, 0.75]
    torch.testing.assert_close(combine_embeds_weighted(x, w, method).double(), _loop_combine(x, w, method), **F32)
    torch.testing.assert_close(combine_embeds_weighted(x, [1.0] * 3, method), combine_embeds(x, method))
    assert combine_embeds_weighted(x.half(), w, method).dtype == torch.float16


def test_weighted_combine_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="3 weights for 2"):
        combine_embeds_weighted(x, [1, 1, 1], "add")
    with pytest.raises(ValueError, match="finite"):
        combine_embeds_weighted(x, [1, float("nan")], "add")
    with pytest.raises(ValueError, match="positive sum"):
        combine_embeds_weighted(x, [0, 0], "average")
    with pytest.raises(ValueError, match=">= 0"):
        combine_embeds_weighted(x, [1, -1], "subtract")
    # negative weights are fine where nothing is averaged
    torch.testing.assert_close(combine_embeds_weighted(x, [1, -1], "add"), (x[0] - x[1])[None])


# --------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("layout,tokens", [("base", 4), ("plus", 16)])
@pytest.mark.parametrize("fmt", ["model_sdxl.bin", "flat.safetensors"])
def test_tiny_mip_files_detected_and_loaded(tmp_path, layout, tokens, fmt):
    path = tmp_path / fmt
    state = save_synthetic_mip_adapter(path, layout, **TINY)
    gates = sorted(k for k in state if k.endswith("text_to_weight.weight"))
    assert len(gates) == 70 and gates[0] == "ip_adapter.1.text_to_weight.weight"
    assert "ip_adapter.139.text_to_weight.weight" in state
    w = load_adapter_file(path)
    spec = w.spec
    assert spec.mip_gate and w.has_gate and spec.layout == layout and spec.tokens == tokens
    assert spec.num_layers == 70 and spec.layer_dims == tuple(sdxl_layer_dims(32))
    assert "MIP-Adapter" in spec.family_name and "text_to_weight" in spec.describe()
    shapes = expected_shapes(spec)
    for i, width in enumerate(spec.layer_dims):
        assert shapes[f"ip_adapter.{2 * i + 1}.text_to_weight.weight"] == (1, width)
    # the file's tensors are the module's parameters, gates included
    assert set(w.state_dict()) == set(state)
    gate = w.ip_adapter["75"].text_to_weight.weight
    torch.testing.assert_close(gate, state["ip_adapter.75.text_to_weight.weight"])
    text_out = torch.randn(2, 9, spec.layer_dims[37], dtype=gate.dtype)
    torch.testing.assert_close(w.gate_logits(37, text_out), (text_out.float() @ gate.float().T).to(gate.dtype),
                               rtol=2e-3, atol=2e-3)
    assert w.gate_logits(37, text_out).shape == (2, 9, 1)
    with pytest.raises(ValueError, match="reads"):
        w.gate_logits(37, torch.randn(2, 9, spec.layer_dims[37] + 1))


def test_published_layout_is_nested_float16(tmp_path):
    path = tmp_path / "model_sdxl_plus.bin"
    save_synthetic_mip_adapter(path, "plus", **TINY)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"image_proj", "ip_adapter"}
    assert raw["ip_adapter"]["1.text_to_weight.weight"].dtype == torch.float16
    assert detect_family(raw).mip_gate


def test_plain_adapter_has_no_gate():
    state = synthetic_adapter_state("base", sdxl_layer_dims(32), 16, 24)
    w = IPAdapterWeights.from_state(state)
    assert not w.spec.mip_gate and not w.has_gate
    assert not any("text_to_weight" in k for k in w.state_dict())
    with pytest.raises(ValueError, match="no text_to_weight"):
        w.gate_logits(0, torch.zeros(1, 4, 64))


def test_sd15_shaped_mip_refused(tmp_path):
    state = synthetic_adapter_state("base", sd15_layer_dims(8), 768, 24, mip_gate=True)
    with pytest.raises(AdapterFormatError, match="shaped for SD1.5.*SDXL only"):
        detect_family(state)
    path = tmp_path / "mip_sd15.safetensors"
    save_file(state, path)
    with pytest.raises(AdapterFormatError, match=r"^mip_sd15\.safetensors: .*shaped for SD1\.5"):
        load_adapter_file(path)
    # the same IP-Adapter without gates is an ordinary SD1.5 adapter
    plain = {k: v for k, v in state.items() if "text_to_weight" not in k}
    assert detect_family(plain).arch_hint == "sd15"


def test_other_layer_count_refused():
    state = synthetic_adapter_state("base", [64, 128, 64], 16, 24, mip_gate=True)
    with pytest.raises(AdapterFormatError, match="3 cross-attention layers.*SDXL only"):
        detect_family(state)


def _damaged(fn):
    state = synthetic_mip_state("base", **TINY, dtype=torch.float32)
    fn(state)
    return state


DAMAGED = {
    "gate missing on one layer": (lambda s: s.pop("ip_adapter.77.text_to_weight.weight"),
                                  ["MIP-Adapter", "77", "have none"]),
    "gate transposed": (lambda s: s.update({"ip_adapter.3.text_to_weight.weight": torch.zeros(64, 1)}),
                        ["ip_adapter.3.text_to_weight.weight has shape (64, 1)", "(1, 64)"]),
    "gate of the wrong width": (lambda s: s.update({"ip_adapter.9.text_to_weight.weight": torch.zeros(1, 65)}),
                                ["(1, 65)", "width 128"]),
    "gate with a bias row": (lambda s: s.update({"ip_adapter.9.text_to_weight.weight": torch.zeros(2, 128)}),
                             ["(2, 128)"]),
    "gate on a layer without K/V": (lambda s: s.update({"ip_adapter.141.text_to_weight.weight": torch.zeros(1, 64)}),
                                    ["141", "no to_k_ip/to_v_ip"]),
    "gate bias": (lambda s: s.update({"ip_adapter.1.text_to_weight.bias": torch.zeros(1)}),
                  ["unexpected ip_adapter keys", "ip_adapter.1.text_to_weight.bias"]),
    "K/V missing under a gate": (lambda s: [s.pop(f"ip_adapter.139.to_{kv}_ip.weight") for kv in "kv"],
                                 ["139", "no to_k_ip/to_v_ip"]),
    "gates only": (lambda s: [s.pop(k) for k in list(s) if "_ip." in k], ["gates but no to_k_ip"]),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_mip_files_explained(tmp_path, name):
    fn, words = DAMAGED[name]
    state = _damaged(fn)
    with pytest.raises(AdapterFormatError) as info:
        detect_family(state)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    path = tmp_path / "broken_mip.bin"
    torch.save(nest_state(state), path)
    with pytest.raises(AdapterFormatError, match=r"^broken_mip\.bin: "):
        load_adapter_file(path)


def test_nan_gate_refused():
    state = synthetic_mip_state("base", **TINY, dtype=torch.float32)
    state["ip_adapter.5.text_to_weight.weight"][0, 3] = float("nan")
    with pytest.raises(AdapterFormatError, match="ip_adapter.5.text_to_weight.weight.*NaN"):
        IPAdapterWeights.from_state(state)


def test_truncated_mip_file(tmp_path):
    path = tmp_path / "model_sdxl.bin"
    save_synthetic_mip_adapter(path, "base", **TINY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError):
        load_adapter_file(path)
