"""Fused decoupled cross-attention: one Triton launch per attention call.

    O = softmax(Q K_t^T s) V_t + sum_j w_j * m_j[row] * softmax(Q K_j^T s) V_j

Each program owns one (batch, head) pair and BLOCK_M query rows. It loads its Q tile once,
runs a flash-style online softmax over the text keys and then over every image context in
turn (each context keeps its own running max / sum / accumulator, so the softmaxes stay
separate), folds each normalised term into one fp32 output tile and writes O once. Only one
context accumulator is live at a time, so register use does not grow with the number of
contexts.

The kernel and its launcher live together in this file; the image contexts it reads are packed
by `packing.py`, and `dispatch.py` decides when to use it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Union

import torch

from .contexts import ImageContext
from .packing import PackedContexts, _bhld_strides, _check_context, _split_heads_shape, pack_image_contexts

try:  # Triton is optional: CPU / MPS / Windows installs run the torch path only.
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # a broken install can raise more than ImportError
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Weights change every sampling step (schedules over sigma), so they travel as scalar kernel
# arguments: a device tensor of weights would need a host->device copy per call. A fixed number
# of scalar slots, picked by scalar selects inside the runtime loop over contexts, hence a
# maximum. 8 covers every stacking workflow we know of; more falls back to torch.
MAX_IMAGE_CONTEXTS = 8
# The padded head dim is held in registers for Q, the output tile and one context accumulator;
# past 256 the tile no longer fits and the kernel would spill.
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Grid axis 1 carries batch*heads; CUDA caps grid y at 65535.
_MAX_GRID_Y = 65535
_LOG2E = 1.4426950408889634

ContextsArg = Union[Sequence[ImageContext], "PackedContexts"]


# --------------------------------------------------------------------------------------------
# Support test
# --------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when the kernel was built for the Triton CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and type(_decoupled_attn_fwd).__name__ == "InterpretedFunction"


def fused_unsupported_reason(
    q: torch.Tensor,
    k_text: Optional[torch.Tensor],
    v_text: Optional[torch.Tensor],
    contexts: ContextsArg,
    heads: int,
    layout: str = "blc",
) -> Optional[str]:
    """None when the fused kernel can evaluate this call, else why not (a sentence)."""
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if q.device.type != "cuda" and not interpreting():
        return f"q is on {q.device.type}; the Triton kernel runs on CUDA, or on CPU only under TRITON_INTERPRET=1"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"q dtype {q.dtype} is not one of fp16, bf16, fp32"
    try:
        batch, lq, head_dim = _split_heads_shape(q, layout, heads, "q")
    except ValueError as exc:
        return str(exc)
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} exceeds {MAX_HEAD_DIM}"
    if head_dim < 1 or lq < 1 or batch < 1:
        return "empty query"
    if batch * heads > _MAX_GRID_Y:
        return f"batch*heads = {batch * heads} exceeds the grid limit {_MAX_GRID_Y}"
    if (k_text is None) != (v_text is None):
        return "k_text and v_text must both be given or both be None"
    if k_text is not None:
        if k_text.shape != v_text.shape:
            return f"text k {tuple(k_text.shape)} and v {tuple(v_text.shape)} differ in shape"
        try:
            bt, lt, dt = _split_heads_shape(k_text, layout, heads, "text k")
        except ValueError as exc:
            return str(exc)
        if dt != head_dim or bt not in (1, batch) or lt < 1:
            return f"text k/v shape {tuple(k_text.shape)} does not match q {tuple(q.shape)}"
        if k_text.device != q.device or v_text.device != q.device:
            return "text k/v live on another device than q"
    if len(contexts) > MAX_IMAGE_CONTEXTS:
        return f"{len(contexts)} image contexts exceed the kernel's {MAX_IMAGE_CONTEXTS}"
    if isinstance(contexts, PackedContexts):
        if contexts.batch != batch or contexts.heads != heads or contexts.head_dim != head_dim:
            return "packed contexts were built for another batch, head count or head dim"
        if contexts.layout != layout:
            return f"packed contexts were built for layout {contexts.layout!r}"
        if contexts.device != q.device:
            return "packed contexts live on another device than q"
        if contexts.mask_len is not None and contexts.mask_len != lq:
            return f"context masks cover {contexts.mask_len} query rows, q has {lq}"
        return None
    for c in contexts:
        try:
            _check_context(c, batch, heads, head_dim, layout)
        except ValueError as exc:
            return str(exc)
        if c.k.device != q.device or c.v.device != q.device:
            return "an image context lives on another device than q"
        if c.mask is not None and c.mask.shape[1] != lq:
            return f"a context mask covers {c.mask.shape[1]} query rows, q has {lq}"
    return None


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, F32: tl.constexpr):
        # fp32 inputs would run as plain tf32 on GPU (10-bit mantissa) and drift from the torch
        # path. "ieee" (FMA) spilled kilobytes of registers per thread in ptxas -v for sm_90;
        # tf32x3 (three tf32 products) keeps fp32-level accuracy on the tensor cores and
        # compiles without spills at D <= 64. fp16/bf16 inputs take the plain fast path.
        if F32:
            return tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _pick(j, w0, w1, w2, w3, w4, w5, w6, w7):
        # Scalar selects on a runtime index: the contexts loop stays a real loop (one copy of
        # its code, no cross-context scheduling that keeps every context's values live).
        w = tl.where(j == 1, w1, w0)
        w = tl.where(j == 2, w2, w)
        w = tl.where(j == 3, w3, w)
        w = tl.where(j == 4, w4, w)
        w = tl.where(j == 5, w5, w)
        w = tl.where(j == 6, w6, w)
        w = tl.where(j == 7, w7, w)
        return w

    @triton.jit
    def _attend(
        q, K, V, stride_kl, stride_kd, stride_vl, stride_vd, length, qk_scale,
        offs_d, d_ok,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):
        """softmax(q K^T s) V for one context, normalised, fp32 (BLOCK_M, BLOCK_D)."""
        offs_n0 = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, length, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < length
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k.to(q.dtype)), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32)
            # Scale after the dot, in fp32: pre-scaling q would round it once more in fp16/bf16.
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            # Every block holds at least one valid key (length >= 1), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
            v = v.to(q.dtype)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], F32)
            m_i = m_new
        return acc / l_i[:, None]

    @triton.jit
    def _decoupled_attn_fwd(
        Q, KT, VT, KI, VI, META, MASKS, O,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_ktb, stride_kth, stride_ktl, stride_ktd,
        stride_vtb, stride_vth, stride_vtl, stride_vtd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_img_row, stride_meta, stride_mask,
        H, LQ, LT, n_ctx, qk_scale,
        w0, w1, w2, w3, w4, w5, w6, w7,
        HEAD_DIM: tl.constexpr,
        HAS_TEXT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        UPCAST: tl.constexpr,
        F32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N_TEXT: tl.constexpr,
        BLOCK_N_IMG: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 before multiplying by strides: B*L*H*D passes 2**31 for large video batches.
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < LQ
        d_ok = offs_d < HEAD_DIM
        q_ok = m_ok[:, None] & d_ok[None, :]

        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=q_ok, other=0.0,
        )
        if UPCAST:
            # The interpreter's bf16 tl.dot returns garbage; fp32 dots are exact there.
            q = q.to(tl.float32)

        out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_TEXT:
            out += _attend(
                q,
                KT + b * stride_ktb + h * stride_kth,
                VT + b * stride_vtb + h * stride_vth,
                stride_ktl, stride_ktd, stride_vtl, stride_vtd, LT, qk_scale, offs_d, d_ok,
                BLOCK_M, BLOCK_N_TEXT, BLOCK_D, F32,
            )
        for j in range(0, n_ctx):
            row = META + j * stride_meta
            seg = tl.load(row + 0)
            lk = tl.load(row + 1)
            crow = tl.load(row + 4 + b)
            first = (seg + crow * lk).to(tl.int64) * stride_img_row + h * HEAD_DIM
            term = _attend(
                q, KI + first, VI + first,
                stride_img_row, 1, stride_img_row, 1, lk, qk_scale, offs_d, d_ok,
                BLOCK_M, BLOCK_N_IMG, BLOCK_D, F32,
            )
            w = _pick(j, w0, w1, w2, w3, w4, w5, w6, w7)
            if HAS_MASK:
                mask_first = tl.load(row + 2)
                mask_step = tl.load(row + 3)
                mrow = (mask_first + mask_step * b).to(tl.int64)
                # A context without a mask has mask_first = -1: nothing is read, the factor is 1.
                mv = tl.load(MASKS + mrow * stride_mask + offs_m, mask=m_ok & (mask_first >= 0), other=1.0)
                out += term * (w * mv)[:, None]
            else:
                out += term * w

        tl.store(
            O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
            out.to(O.dtype.element_ty),
            mask=q_ok,
        )

else:  # pragma: no cover - exercised only where triton is missing
    _decoupled_attn_fwd = None


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_config(block_d: int, max_img_len: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps. A heuristic, not autotuning: the interpreter needs exactly one
    config, and autotuning 16-70 attention sites at the first sampling step costs seconds.

    Each program holds Q, two fp32 (BLOCK_M, BLOCK_D) tiles (the output and the current
    context's accumulator) and the score tile in registers. The table is the largest tile
    found to compile with no or negligible spills (ptxas -v, sm_90, masks on, widest image
    block): D<=64 and D=128 without spills at 240-252 registers, D=256 (head dim 160) with
    <= 52 bytes spilled. fp32 (tf32x3 dots) spills more; it is a rare path. Whether fewer rows
    with more CTAs per SM would hide memory latency better is a question for GPU benchmarks
    (bench/bench_attention.py), which should tune this table."""
    if dtype == torch.float32:
        block_m, num_warps = {64: (128, 8), 128: (64, 8)}.get(max(block_d, 64), (32, 8))
    elif block_d <= 64:
        block_m, num_warps = 128, 8
    else:
        block_m, num_warps = 64, 8
    # Image contexts are short (4-257 tokens); a 64-wide block over 4 tokens wastes 15/16 of
    # the dot. 16 is tl.dot's minimum; 32 caps it at head dim 160, where 64 spilled.
    cap = 32 if block_d > 128 else 64
    block_n_img = min(cap, max(16, _next_pow2(max(1, max_img_len))))
    # num_stages made no difference to the compiled kernels (the loops have runtime bounds).
    return dict(BLOCK_M=block_m, BLOCK_N_TEXT=64, BLOCK_N_IMG=block_n_img, num_warps=num_warps, num_stages=2)


def fused_decoupled_attention(
    q: torch.Tensor,
    k_text: Optional[torch.Tensor],
    v_text: Optional[torch.Tensor],
    contexts: ContextsArg,
    heads: int,
    layout: str = "blc",
    *,
    weights: Optional[Sequence[float]] = None,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """The decoupled sum in one kernel launch. Same contract as decoupled_attention_torch.

    contexts: a list of ImageContext (packed here, a few small copies per call) or a
      PackedContexts from pack_image_contexts (no per-call work).
    weights: per-context weights for this call, overriding the contexts' own.
    scale: softmax scale, default 1/sqrt(D).
    out: optional output tensor of q's shape and dtype (any strides).
    block_m / block_n / num_warps: override the launch heuristic (tests, tuning).
    """
    reason = fused_unsupported_reason(q, k_text, v_text, contexts, heads, layout)
    if reason is not None:
        raise ValueError(f"fused decoupled attention cannot run this call: {reason}")
    batch, lq, head_dim = _split_heads_shape(q, layout, heads, "q")
    n_ctx = len(contexts)

    packed = None
    if n_ctx:
        if isinstance(contexts, PackedContexts):
            packed = contexts
        else:
            packed = pack_image_contexts(contexts, batch, heads, layout, dtype=q.dtype, device=q.device, validate=False)
        ws = tuple(float(w) for w in (weights if weights is not None else packed.weights))
        if len(ws) != n_ctx:
            raise ValueError(f"got {len(ws)} weights for {n_ctx} image contexts")
    else:
        ws = ()
    ws = ws + (0.0,) * (MAX_IMAGE_CONTEXTS - len(ws))

    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError("out must match q in shape, dtype and device")

    block_d = max(16, _next_pow2(head_dim))
    cfg = _launch_config(block_d, max(packed.lengths) if packed is not None else 1, q.dtype)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N_TEXT"] = block_n
        cfg["BLOCK_N_IMG"] = block_n
    if num_warps is not None:
        cfg["num_warps"] = num_warps
    if interpreting():
        cfg.pop("num_warps")
        cfg.pop("num_stages")

    # Absent inputs still need a pointer argument; q is a valid one that is never read.
    if k_text is not None:
        kt_strides = _bhld_strides(k_text, layout, heads, batch)
        vt_strides = _bhld_strides(v_text, layout, heads, batch)
        lt = k_text.shape[1] if layout == "blc" else k_text.shape[2]
        kt, vt = k_text, v_text
    else:
        kt_strides = vt_strides = (0, 0, 0, 0)
        lt, kt, vt = 0, q, q
    if packed is not None:
        ki, vi, meta = packed.k, packed.v, packed.meta
        stride_img_row, stride_meta = packed.k.stride(0), packed.meta.stride(0)
        masks = packed.masks if packed.masks is not None else q
        stride_mask = packed.masks.stride(0) if packed.masks is not None else 0
        has_mask = packed.masks is not None
    else:
        # The context loop's body is compiled even when it runs zero times, so META must
        # still be an int32 pointer (an fp16 one would make its loop bounds floats).
        meta = torch.empty((1, 4), dtype=torch.int32, device=q.device)
        ki = vi = masks = q
        stride_img_row = stride_meta = stride_mask = 0
        has_mask = False

    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(head_dim)) * _LOG2E
    grid = (triton.cdiv(lq, cfg["BLOCK_M"]), batch * heads)
    launch = _decoupled_attn_fwd[grid]
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        launch(
            q, kt, vt, ki, vi, meta, masks, out,
            *_bhld_strides(q, layout, heads, batch),
            *kt_strides,
            *vt_strides,
            *_bhld_strides(out, layout, heads, batch),
            stride_img_row, stride_meta, stride_mask,
            heads, lq, lt, n_ctx, qk_scale,
            *ws,
            HEAD_DIM=head_dim,
            HAS_TEXT=k_text is not None,
            HAS_MASK=has_mask,
            UPCAST=interpreting() and q.dtype == torch.bfloat16,
            F32=q.dtype == torch.float32,
            BLOCK_D=block_d,
            **cfg,
        )
    return out

