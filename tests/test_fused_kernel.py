"""The fused Triton kernel against the torch reference, on CPU through the Triton interpreter.

Truth is decoupled_attention_torch evaluated in fp32 on the same (already rounded) inputs.
Tolerances per input dtype (max abs error of the output, values are O(1)):
  fp32: 1e-4  - both sides accumulate in fp32; only summation order differs.
  fp16: 4e-3  - output rounding (~5e-4 at |x|<1) plus P rounded to fp16 before the PV dot.
  bf16: 3e-2  - output rounding alone is up to ~1.6e-2 at |x|~4 (bf16 keeps 8 mantissa bits);
                the interpreter upcasts bf16 dots, the GPU does not (P in bf16), which the
                margin covers. Measured here: <= 1.6e-2, the same as torch's own bf16 path.
Shapes stay tiny: the interpreter runs every program instance in numpy.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ipadapter_fused.attention import (
    ImageContext,
    PackedContexts,
    decoupled_attention_torch,
    fused_decoupled_attention,
    pack_image_contexts,
)
from ipadapter_fused.attention import fused_triton

pytestmark = pytest.mark.skipif(not fused_triton.HAS_TRITON, reason="triton not installed")

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _kv(gen, layout, rows, length, heads, d, dtype):
    shape = (rows, length, heads * d) if layout == "blc" else (rows, heads, length, d)
    return _rand(gen, *shape, dtype=dtype), _rand(gen, *shape, dtype=dtype)


def make_case(
    *,
    layout="blc",
    batch=2,
    heads=2,
    d=40,
    lq=70,
    lt=77,
    contexts=(),
    dtype=torch.float32,
    seed=0,
):
    """contexts: dicts with lk, rows (context rows), weight, mask ('row'|'batch'|None), bidx (list|None)."""
    gen = torch.Generator().manual_seed(seed)
    q_shape = (batch, lq, heads * d) if layout == "blc" else (batch, heads, lq, d)
    q = _rand(gen, *q_shape, dtype=dtype)
    k_text = v_text = None
    if lt:
        k_text, v_text = _kv(gen, layout, batch, lt, heads, d, dtype)
    ctxs = []
    for spec in contexts:
        rows = spec.get("rows", batch)
        k, v = _kv(gen, layout, rows, spec["lk"], heads, d, dtype)
        mask = None
        if spec.get("mask") == "row":
            mask = torch.rand(1, lq, generator=gen)
        elif spec.get("mask") == "batch":
            mask = torch.rand(batch, lq, generator=gen)
        bidx = spec.get("bidx")
        ctxs.append(
            ImageContext(
                k=k,
                v=v,
                weight=spec.get("weight", 1.0),
                mask=mask,
                batch_index=None if bidx is None else torch.tensor(bidx, dtype=torch.int64),
            )
        )
    return q, k_text, v_text, ctxs


def truth(q, k_text, v_text, ctxs, heads, layout):
    f = lambda t: None if t is None else t.float()  # noqa: E731
    ctxs32 = [dataclasses.replace(c, k=c.k.float(), v=c.v.float()) for c in ctxs]
    return decoupled_attention_torch(f(q), f(k_text), f(v_text), ctxs32, heads, layout)


def check(out, q, k_text, v_text, ctxs, heads, layout):
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = truth(q, k_text, v_text, ctxs, heads, layout)
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs error {err:.3g} > {TOL[q.dtype]} for {q.dtype}"
    return ref


CASES = {
    # name: make_case kwargs
    "d40_text_1ctx4": dict(d=40, contexts=[dict(lk=4, weight=0.7)]),
    "d64_text_only": dict(d=64, lq=33, contexts=[]),
    "d80_text_2ctx": dict(d=80, lq=40, contexts=[dict(lk=16, weight=0.5), dict(lk=23, rows=1, weight=1.5)]),
    "d160_4ctx_masks_bidx": dict(
        d=160, heads=1, lq=37, lt=20,
        contexts=[
            dict(lk=4, rows=2, bidx=[1, 0], mask="batch", weight=0.8),
            dict(lk=16, rows=1, weight=0.3),
            dict(lk=5, rows=3, bidx=[2, 2], mask="row", weight=1.2),
            dict(lk=9, weight=-0.4),
        ],
    ),
    "d40_no_text_2ctx": dict(d=40, lt=0, contexts=[dict(lk=7, weight=0.9, mask="batch"), dict(lk=3, weight=0.6)]),
    "no_text_no_ctx": dict(d=40, lq=20, lt=0, contexts=[]),
    "long_ctx_257": dict(d=40, heads=1, batch=1, lq=17, lt=0, contexts=[dict(lk=257, weight=1.0)]),
    "bhld_d128": dict(layout="bhld", d=128, lq=45, lt=100, contexts=[dict(lk=16, rows=2, bidx=[0, 1], weight=0.75)]),
    "bhld_d64_no_text": dict(layout="bhld", d=64, lq=30, lt=0, contexts=[dict(lk=6, mask="row")]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
    kw = CASES[name]
    q, kt, vt, ctxs = make_case(**kw)
    heads, layout = kw.get("heads", 2), kw.get("layout", "blc")
    out = fused_decoupled_attention(q, kt, vt, ctxs, heads, layout)
    check(out, q, kt, vt, ctxs, heads, layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["d40_text_1ctx4", "d80_text_2ctx", "d160_4ctx_masks_bidx", "bhld_d128"])
def test_matches_reference_half(name, dtype):
    kw = CASES[name]
    q, kt, vt, ctxs = make_case(dtype=dtype, **kw)
    heads, layout = kw.get("heads", 2), kw.get("layout", "blc")
    out = fused_decoupled_attention(q, kt, vt, ctxs, heads, layout)
    check(out, q, kt, vt, ctxs, heads, layout)


def test_small_blocks_many_iterations():
    # 16-wide tiles: several query blocks and several key blocks per context, all with ragged tails.
    q, kt, vt, ctxs = make_case(d=40, lq=50, lt=37, contexts=[dict(lk=21, mask="batch", weight=0.6), dict(lk=17)])
    out = fused_decoupled_attention(q, kt, vt, ctxs, 2, block_m=16, block_n=16)
    check(out, q, kt, vt, ctxs, 2, "blc")


def test_strided_inputs_blc():
    """q/k/v as the slices and transposes a host hands over, never made contiguous."""
    gen = torch.Generator().manual_seed(3)
    b, lq, lt, h, d = 2, 29, 77, 2, 40
    c = h * d
    qkv = torch.randn(b, lq, 3 * c, generator=gen)
    q = qkv[..., c: 2 * c]  # channel slice: row stride 3C
    kv_text = torch.randn(lt, b, 2 * c, generator=gen).transpose(0, 1)  # batch stride C*2, row stride B*2C
    k_text, v_text = kv_text[..., :c], kv_text[..., c:]
    img = torch.randn(b, 2 * c, 16, generator=gen).transpose(1, 2)  # (B, 16, 2C), channel stride 16
    ctxs = [ImageContext(k=img[..., :c], v=img[..., c:], weight=0.7, mask=torch.rand(2, 60, generator=gen)[:, ::2][:, :lq])]
    for t in (q, k_text, v_text, ctxs[0].k, ctxs[0].mask):
        assert not t.is_contiguous()
    out = fused_decoupled_attention(q, k_text, v_text, ctxs, h)
    check(out, q, k_text, v_text, ctxs, h, "blc")


def test_strided_inputs_bhld_and_strided_out():
    gen = torch.Generator().manual_seed(4)
    b, lq, lt, h, d = 2, 33, 20, 3, 64
    q = torch.randn(b, lq, h, d, generator=gen).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k_text = torch.randn(b, lt, h, d, generator=gen).transpose(1, 2)
    v_text = torch.randn(b, h, d, lt, generator=gen).transpose(2, 3)  # D not the fastest dim
    ctxs = [ImageContext(k=torch.randn(1, 5, h, d, generator=gen).transpose(1, 2), v=torch.randn(1, h, 5, d, generator=gen))]
    out = torch.full((b, lq, h, d), float("nan")).transpose(1, 2)
    res = fused_decoupled_attention(q, k_text, v_text, ctxs, h, "bhld", out=out)
    assert res is out
    check(out, q, k_text, v_text, ctxs, h, "bhld")


def test_text_batch_broadcast():
    q, kt, vt, ctxs = make_case(d=40, lq=20, contexts=[dict(lk=4)])
    kt, vt = kt[:1], vt[:1]  # one text row for both query rows
    ref = truth(q, kt.expand(2, -1, -1), vt.expand(2, -1, -1), ctxs, 2, "blc")
    out = fused_decoupled_attention(q, kt, vt, ctxs, 2)
    assert (out - ref).abs().max().item() <= TOL[torch.float32]


def test_packed_reuse_and_weights():
    q, kt, vt, ctxs = make_case(
        d=40, lq=24, contexts=[dict(lk=4, rows=2, bidx=[1, 0], mask="batch", weight=0.5), dict(lk=16, rows=1, weight=0.9)]
    )
    packed = pack_image_contexts(ctxs, batch=2, heads=2)
    assert isinstance(packed, PackedContexts) and len(packed) == 2
    assert packed.k.shape == (2 * 4 + 16, 80) and packed.meta.dtype == torch.int32
    check(fused_decoupled_attention(q, kt, vt, packed, 2), q, kt, vt, ctxs, 2, "blc")
    # The pack's own contexts are views into its buffers and reproduce the originals.
    for orig, view in zip(ctxs, packed.contexts):
        assert torch.equal(orig.k, view.k) and torch.equal(orig.v, view.v)
        assert view.k.data_ptr() >= packed.k.data_ptr()
    # Per-call weights: as a kwarg and through with_weights, both match new contexts.
    new = [dataclasses.replace(c, weight=w) for c, w in zip(ctxs, (-1.0, 2.0))]
    check(fused_decoupled_attention(q, kt, vt, packed, 2, weights=(-1.0, 2.0)), q, kt, vt, new, 2, "blc")
    check(fused_decoupled_attention(q, kt, vt, packed.with_weights((-1.0, 2.0)), 2), q, kt, vt, new, 2, "blc")
    # The torch reference accepts a pack as its context list.
    torch.testing.assert_close(
        decoupled_attention_torch(q, kt, vt, packed, 2), decoupled_attention_torch(q, kt, vt, ctxs, 2)
    )


def test_packed_bhld_views():
    q, kt, vt, ctxs = make_case(layout="bhld", d=64, lq=20, lt=10, contexts=[dict(lk=5, rows=1), dict(lk=3)])
    packed = pack_image_contexts(ctxs, batch=2, heads=2, layout="bhld")
    for orig, view in zip(ctxs, packed.contexts):
        assert view.k.shape == orig.k.shape and torch.equal(view.k, orig.k)
    check(fused_decoupled_attention(q, kt, vt, packed, 2, "bhld"), q, kt, vt, ctxs, 2, "bhld")


def test_pack_validates_batch_index():
    _, _, _, ctxs = make_case(d=40, lq=8, contexts=[dict(lk=4, rows=2, bidx=[0, 2])])
    with pytest.raises(ValueError, match="batch_index"):
        pack_image_contexts(ctxs, batch=2, heads=2)


def test_unsupported_reasons():
    q = torch.randn(1, 8, 2 * 320)
    assert "head dim" in fused_triton.fused_unsupported_reason(q, None, None, [], 2)
    q = torch.randn(1, 8, 2 * 40)
    ctx = ImageContext(k=torch.randn(1, 4, 80), v=torch.randn(1, 4, 80))
    assert "exceed" in fused_triton.fused_unsupported_reason(q, None, None, [ctx] * 9, 2)
    assert fused_triton.fused_unsupported_reason(q.double(), None, None, [ctx], 2) is not None
    with pytest.raises(ValueError, match="cannot run"):
        fused_decoupled_attention(torch.randn(1, 8, 2 * 320), None, None, [], 2)


def test_detects_wrong_answers():
    """The comparison is sharp enough to catch a swapped batch route, weight or mask."""
    q, kt, vt, ctxs = make_case(d=40, lq=20, contexts=[dict(lk=4, rows=2, bidx=[0, 1], mask="batch", weight=0.8)])
    out = fused_decoupled_attention(q, kt, vt, ctxs, 2)
    c = ctxs[0]
    wrongs = [
        dataclasses.replace(c, batch_index=torch.tensor([1, 0])),
        dataclasses.replace(c, weight=0.81),
        dataclasses.replace(c, mask=c.mask.flip(0)),
    ]
    for wrong in wrongs:
        ref = truth(q, kt, vt, [wrong], 2, "blc")
        assert (out - ref).abs().max().item() > 10 * TOL[torch.float32]


def test_compiles_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects; compile one real variant (fp16, head
    dim 80 padded to 128, text + masked image contexts) to a Hopper cubin with Triton's bundled
    ptxas. Runs in a subprocess because this process has the interpreter switched on."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    script = f"""
import importlib.util, os, sys
os.environ.pop("TRITON_INTERPRET", None)
spec = importlib.util.spec_from_file_location("aot_attention", {str(root / "attention" / "__init__.py")!r},
    submodule_search_locations=[{str(root / "attention")!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["aot_attention"] = mod; spec.loader.exec_module(mod)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ft = mod.fused_triton
fn = ft._decoupled_attn_fwd
assert not ft.interpreting()
cfg = ft._launch_config(128, 16, torch.float16)
sig = {{a: "i32" for a in fn.arg_names}}
for a in ("Q", "KT", "VT", "KI", "VI", "O"):
    sig[a] = "*fp16"
sig["META"], sig["MASKS"] = "*i32", "*fp32"
for a in ("qk_scale", "w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7"):
    sig[a] = "fp32"
const = dict(HEAD_DIM=80, HAS_TEXT=True, HAS_MASK=True, UPCAST=False, F32=False, BLOCK_D=128,
             BLOCK_M=cfg["BLOCK_M"], BLOCK_N_TEXT=cfg["BLOCK_N_TEXT"], BLOCK_N_IMG=cfg["BLOCK_N_IMG"],
             stride_qd=1, stride_ktd=1, stride_vtd=1, stride_od=1)
sig.update({{k: "constexpr" for k in const}})
k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
assert len(k.asm["cubin"]) > 0
print("OK")
"""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("Triton's CUDA toolchain (ptxas) is not available here")
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
