"""Which backend runs where, and that every route gives the reference's answer."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ipadapter_fused.attention import (
    ImageContext,
    available_backends,
    decoupled_attention,
    decoupled_attention_torch,
    pack_image_contexts,
    select_backend,
    set_prefer_torch_rule,
)
from ipadapter_fused.attention import dispatch, fused_triton
from ipadapter_fused.attention.reference import sdpa_attention

needs_triton = pytest.mark.skipif(not fused_triton.HAS_TRITON, reason="triton not installed")


def _inputs(d=40, heads=2, batch=2, lq=20, lt=10, n_ctx=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = heads * d
    q = torch.randn(batch, lq, c, generator=gen)
    kt, vt = torch.randn(batch, lt, c, generator=gen), torch.randn(batch, lt, c, generator=gen)
    ctxs = [
        ImageContext(
            k=torch.randn(2, 4, c, generator=gen),
            v=torch.randn(2, 4, c, generator=gen),
            weight=0.6 + 0.1 * j,
            mask=torch.rand(batch, lq, generator=gen),
            batch_index=torch.tensor([1, 0][:batch]),
        )
        for j in range(n_ctx)
    ]
    return q, kt, vt, ctxs


@pytest.fixture
def spy(monkeypatch):
    """Records which backend really ran."""
    ran = []
    real_fused = fused_triton.fused_decoupled_attention
    real_torch = dispatch.decoupled_attention_torch

    def fused(*a, **k):
        ran.append("triton")
        return real_fused(*a, **k)

    def torch_path(*a, **k):
        ran.append("torch")
        return real_torch(*a, **k)

    monkeypatch.setattr(fused_triton, "fused_decoupled_attention", fused)
    monkeypatch.setattr(dispatch, "decoupled_attention_torch", torch_path)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    return ran


@pytest.fixture
def native(monkeypatch):
    """Pretend CPU tensors run the compiled kernel, to reach the shape rules of "auto"."""
    monkeypatch.setattr(dispatch, "_runs_natively", lambda q: True)
    monkeypatch.setattr(dispatch, "_kernel_verified", lambda device, variant: True)


def test_cpu_auto_runs_torch(spy):
    q, kt, vt, ctxs = _inputs()
    assert select_backend(q) == "torch"
    out = decoupled_attention(q, kt, vt, ctxs, 2)
    assert spy == ["torch"]
    torch.testing.assert_close(out, decoupled_attention_torch(q, kt, vt, ctxs, 2))


@needs_triton
def test_explicit_triton_on_cpu_under_interpreter(spy):
    assert fused_triton.interpreting()  # conftest sets TRITON_INTERPRET=1
    assert available_backends() == ["torch", "triton"]
    q, kt, vt, ctxs = _inputs()
    assert select_backend(q, "triton") == "triton"
    out = decoupled_attention(q, kt, vt, ctxs, 2, backend="triton")
    assert spy == ["triton"]
    torch.testing.assert_close(out, decoupled_attention_torch(q, kt, vt, ctxs, 2), atol=1e-4, rtol=1e-4)


def test_explicit_torch(spy):
    q, kt, vt, ctxs = _inputs()
    decoupled_attention(q, kt, vt, ctxs, 2, backend="torch")
    assert spy == ["torch"]


@needs_triton
def test_explicit_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setattr(fused_triton, "interpreting", lambda: False)
    q, kt, vt, ctxs = _inputs()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        decoupled_attention(q, kt, vt, ctxs, 2, backend="triton")


def test_triton_unavailable_falls_back(monkeypatch, spy):
    monkeypatch.setattr(fused_triton, "HAS_TRITON", False)
    monkeypatch.setattr(fused_triton, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(dispatch, "_runs_natively", lambda q: True)  # even "on a GPU"
    assert available_backends() == ["torch"]
    q, kt, vt, ctxs = _inputs()
    assert select_backend(q, "auto", k_text=kt, v_text=vt, contexts=ctxs, heads=2) == "torch"
    out = decoupled_attention(q, kt, vt, ctxs, 2)
    assert spy == ["torch"]
    torch.testing.assert_close(out, decoupled_attention_torch(q, kt, vt, ctxs, 2))
    with pytest.raises(RuntimeError, match="not importable"):
        decoupled_attention(q, kt, vt, ctxs, 2, backend="triton")


def test_import_without_triton_subprocess(tmp_path):
    """A real failing `import triton`: the package imports and the torch path answers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError("No module named 'triton'")
                return None
        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location(
            "pack_attention", {os.path.join(root, "attention", "__init__.py")!r},
            submodule_search_locations=[{os.path.join(root, "attention")!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pack_attention"] = mod
        spec.loader.exec_module(mod)
        import torch
        assert "triton" not in sys.modules
        assert mod.available_backends() == ["torch"], mod.available_backends()
        q = torch.randn(2, 8, 16); k = torch.randn(2, 5, 16)
        ctx = mod.ImageContext(k=torch.randn(1, 4, 16), v=torch.randn(1, 4, 16), weight=0.5)
        out = mod.decoupled_attention(q, k, k, [ctx], 2)
        ref = mod.decoupled_attention_torch(q, k, k, [ctx], 2)
        assert torch.equal(out, ref)
        try:
            mod.decoupled_attention(q, k, k, [ctx], 2, backend="triton")
        except RuntimeError as e:
            assert "not importable" in str(e)
        else:
            raise AssertionError("explicit triton should raise")
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_BACKEND}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


@needs_triton
def test_auto_on_gpu_picks_triton(native, spy):
    q, kt, vt, ctxs = _inputs()
    assert select_backend(q) == "triton"
    out = decoupled_attention(q, kt, vt, ctxs, 2)
    assert spy == ["triton"]
    torch.testing.assert_close(out, decoupled_attention_torch(q, kt, vt, ctxs, 2), atol=1e-4, rtol=1e-4)


@needs_triton
def test_auto_unsupported_head_dim_falls_back(native, spy):
    q, kt, vt, ctxs = _inputs(d=320)
    assert select_backend(q, k_text=kt, v_text=vt, contexts=ctxs, heads=2) == "torch"
    decoupled_attention(q, kt, vt, ctxs, 2)
    assert spy == ["torch"]
    with pytest.raises(ValueError, match="head dim 320"):
        decoupled_attention(q, kt, vt, ctxs, 2, backend="triton")


@needs_triton
def test_auto_too_many_contexts_falls_back(native, spy):
    q, kt, vt, ctxs = _inputs(n_ctx=fused_triton.MAX_IMAGE_CONTEXTS + 1)
    decoupled_attention(q, kt, vt, ctxs, 2)
    assert spy == ["torch"]


@needs_triton
def test_prefer_torch_rule(native, spy):
    q, kt, vt, ctxs = _inputs()
    seen = []
    previous = set_prefer_torch_rule(lambda shape: seen.append(shape) or shape.lq < 64)
    try:
        decoupled_attention(q, kt, vt, ctxs, 2)
        assert spy == ["torch"]
        assert seen[0].lq == 20 and seen[0].head_dim == 40 and seen[0].image_lengths == (4,) and seen[0].has_masks
    finally:
        set_prefer_torch_rule(previous)
    # The default rule: plain attention (no image context) stays with SDPA.
    decoupled_attention(q, kt, vt, [], 2)
    assert spy == ["torch", "torch"]
    assert select_backend(q, k_text=kt, v_text=vt, contexts=ctxs, heads=2) == "triton"


def test_bad_backend_name():
    q, kt, vt, ctxs = _inputs()
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        decoupled_attention(q, kt, vt, ctxs, 2, backend="cuda")
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend(q, "flash")


def test_env_override(monkeypatch, spy, native):
    q, kt, vt, ctxs = _inputs()
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    decoupled_attention(q, kt, vt, ctxs, 2)
    assert spy == ["torch"]
    monkeypatch.setenv(dispatch.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match=dispatch.ENV_BACKEND):
        decoupled_attention(q, kt, vt, ctxs, 2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_packed_contexts_and_weights_on_both_backends(backend):
    q, kt, vt, ctxs = _inputs(n_ctx=2)
    packed = pack_image_contexts(ctxs, batch=2, heads=2)
    ref = decoupled_attention_torch(q, kt, vt, ctxs, 2)
    torch.testing.assert_close(decoupled_attention(q, kt, vt, packed, 2, backend=backend), ref, atol=1e-4, rtol=1e-4)
    new = [dataclasses.replace(c, weight=w) for c, w in zip(ctxs, (0.2, -0.5))]
    ref_w = decoupled_attention_torch(q, kt, vt, new, 2)
    for c in (packed, ctxs):
        out = decoupled_attention(q, kt, vt, c, 2, backend=backend, weights=(0.2, -0.5))
        torch.testing.assert_close(out, ref_w, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="weights"):
        decoupled_attention(q, kt, vt, packed, 2, backend=backend, weights=(1.0,))


def test_packed_batch_mismatch_raises():
    q, kt, vt, ctxs = _inputs()
    packed = pack_image_contexts(ctxs, batch=2, heads=2)
    with pytest.raises(ValueError, match="batch of 2"):
        decoupled_attention(q[:1], kt[:1], vt[:1], packed, 2)


def test_attention_fn_used_by_torch_path():
    q, kt, vt, ctxs = _inputs()
    calls = []

    def attn(q_, k_, v_, h_):
        calls.append(k_.shape[1])
        return sdpa_attention(q_, k_, v_, h_)

    decoupled_attention(q, kt, vt, ctxs, 2, backend="torch", attention_fn=attn)
    assert calls == [10, 4]


@needs_triton
def test_auto_checks_the_kernel_once_per_device(monkeypatch):
    """A kernel that passes its self-check is used; one that computes wrong, or fails to
    launch, is replaced by the torch path on that device with a warning."""
    monkeypatch.setattr(dispatch, "_runs_natively", lambda q: True)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    q, kt, vt, ctxs = _inputs()
    kw = dict(k_text=kt, v_text=vt, contexts=ctxs, heads=2)

    monkeypatch.setattr(dispatch, "_verified", {})
    assert select_backend(q, **kw) == "triton"  # the real kernel, under the interpreter
    assert list(dispatch._verified.values()) == [True]

    real = fused_triton.fused_decoupled_attention
    for broken in (lambda *a, **k: real(*a, **k) * 1.1,
                   lambda *a, **k: (_ for _ in ()).throw(RuntimeError("PTX compile failed"))):
        monkeypatch.setattr(dispatch, "_verified", {})
        monkeypatch.setattr(fused_triton, "fused_decoupled_attention", broken)
        with _warns_logged(monkeypatch) as logged:
            assert select_backend(q, **kw) == "torch"
            assert select_backend(q, **kw) == "torch"
        assert len(logged) == 1 and "self-check" in logged[0]
        out = decoupled_attention(q, kt, vt, ctxs, 2)
        torch.testing.assert_close(out, decoupled_attention_torch(q, kt, vt, ctxs, 2))


def _bhld(t, heads):
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).contiguous()


def _call_variants():
    """Calls the patch makes, each compiling another kernel variant: head dims of SD1.5 (40,
    80, 160) and SDXL (64), no text (a foreign patch computes it), no masks, fp32 and 16-bit,
    the bhld layout, a long (Full-face) image context."""
    calls = {}
    q, kt, vt, ctxs = _inputs(d=40)
    calls["d40"] = (q, kt, vt, ctxs, "blc")
    for d in (80, 160, 64):
        q, kt, vt, ctxs = _inputs(d=d)
        calls[f"d{d}"] = (q, kt, vt, ctxs, "blc")
    q, kt, vt, ctxs = _inputs(d=40)
    calls["no text"] = (q, None, None, ctxs, "blc")
    calls["no mask"] = (q, kt, vt, [dataclasses.replace(c, mask=None) for c in ctxs], "blc")
    calls["fp16"] = (q.half(), kt.half(), vt.half(), [dataclasses.replace(c, k=c.k.half(), v=c.v.half()) for c in ctxs],
                     "blc")
    calls["bhld"] = (_bhld(q, 2), _bhld(kt, 2), _bhld(vt, 2),
                     [dataclasses.replace(c, k=_bhld(c.k, 2), v=_bhld(c.v, 2)) for c in ctxs], "bhld")
    long_ctx = [dataclasses.replace(c, k=torch.randn(2, 257, 80), v=torch.randn(2, 257, 80)) for c in ctxs]
    calls["257 tokens"] = (q, kt, vt, long_ctx, "blc")
    return calls


@pytest.mark.parametrize("broken", ["d80", "d160", "d64", "no text", "no mask", "fp16", "bhld", "257 tokens"])
def test_each_kernel_variant_that_runs_is_checked(monkeypatch, broken):
    """A kernel that is wrong in one variant only (one head dim, one layout, no text...) is
    caught when a call first needs that variant, and only that variant falls back; each
    variant is checked once per device. The kernel is a stand-in (the torch reference, made
    wrong where `broken` says), so this runs fast without a GPU."""
    monkeypatch.setattr(dispatch, "_runs_natively", lambda q: True)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    monkeypatch.setattr(dispatch, "_verified", {})
    calls = _call_variants()
    bad = dispatch.kernel_variant(*[calls[broken][i] for i in (0, 1, 3)], 2, calls[broken][4])
    checked = []

    def kernel(q, kt, vt, ctxs, heads, layout="blc", **kw):
        variant = dispatch.kernel_variant(q, kt, ctxs, heads, layout)
        checked.append(variant)
        out = decoupled_attention_torch(q, kt, vt, ctxs, heads, layout)
        return out * 1.01 if variant == bad else out

    monkeypatch.setattr(fused_triton, "fused_decoupled_attention", kernel)
    with _warns_logged(monkeypatch) as logged:
        for _ in range(2):
            for name, (q, kt, vt, ctxs, layout) in calls.items():
                want = "torch" if name == broken else "triton"
                assert select_backend(q, k_text=kt, v_text=vt, contexts=ctxs, heads=2, layout=layout) == want, name
    assert len(logged) == 1 and "self-check" in logged[0], logged
    assert len(checked) == len(set(checked)) == len(calls), "each variant is checked once"


@needs_triton
@pytest.mark.parametrize("dtype,layout,text", [(torch.float32, "bhld", False), (torch.float16, "blc", True)])
def test_self_check_passes_for_the_real_kernel(dtype, layout, text):
    """The check's own inputs compile the variant it was asked about, and the real kernel
    (under the interpreter) passes it."""
    variant = dispatch.KernelVariant(layout, dtype, 40, text, True, 128, 16, 4)
    assert dispatch._self_check(torch.device("cpu"), variant) is None


class _warns_logged:
    def __init__(self, monkeypatch):
        self.mp, self.msgs = monkeypatch, []

    def __enter__(self):
        self.mp.setattr(dispatch.logging, "warning", lambda msg, *a: self.msgs.append(msg % a))
        return self.msgs

    def __exit__(self, *exc):
        return False
