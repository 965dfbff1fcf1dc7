"""Choice between the fused Triton kernel and the torch reference, behind one function.

Rules for backend="auto" (first match wins):
  1. the environment variable IPADAPTER_FUSED_ATTENTION=torch|triton|auto replaces "auto";
  2. torch when Triton is not importable, q is not on CUDA, or the kernel runs under the
     Triton interpreter (a test tool, far too slow for real work);
  3. torch when the call is one the kernel does not handle (head dim > 256, > 8 image
     contexts, odd dtypes, mismatched shapes...: see fused_triton.fused_unsupported_reason);
  4. torch when the prefer-torch rule says the fused kernel would be slower (see
     set_prefer_torch_rule);
  5. torch where the kernel variant this call compiles (layout, dtype, head dim, text, masks,
     tile sizes) failed its one-time self-check on this device against the torch reference
     (a warning says why);
  6. triton otherwise.
backend="triton" skips rules 2-4 and raises instead of falling back; backend="torch" always
runs the reference.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from . import fused_triton
from .contexts import ImageContext
from .packing import PackedContexts
from .reference import AttentionFn, decoupled_attention_torch

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "IPADAPTER_FUSED_ATTENTION"

Contexts = Union[Sequence[ImageContext], PackedContexts]


def triton_available() -> bool:
    """Whether the fused kernel can be built at all (Triton imported)."""
    return fused_triton.HAS_TRITON


def available_backends() -> list[str]:
    return ["torch", "triton"] if triton_available() else ["torch"]


@dataclass(frozen=True)
class AttentionShape:
    """What the prefer-torch rule gets to decide on."""

    batch: int
    heads: int
    head_dim: int
    lq: int
    lt: int  # 0 without a text context
    image_lengths: tuple[int, ...]
    has_masks: bool
    layout: str
    dtype: torch.dtype
    device_name: str


def default_prefer_torch(shape: AttentionShape) -> bool:
    """True where the fused kernel is expected to lose.

    With no image context the call is plain attention: SDPA's flash/cuDNN kernels are tuned
    far beyond ours and there is nothing to fuse. Everything else goes to the kernel, which
    moves the ideal bytes. This is a first guess: GPU benchmarks (bench/bench_attention.py)
    should tune it per device, e.g. for very short query lengths where launch overhead rules.
    """
    return len(shape.image_lengths) == 0


_prefer_torch_rule: Callable[[AttentionShape], bool] = default_prefer_torch


def set_prefer_torch_rule(rule: Optional[Callable[[AttentionShape], bool]]) -> Callable[[AttentionShape], bool]:
    """Install the predicate that sends "auto" calls to torch; None restores the default.
    Returns the previous rule so callers (and tests) can put it back."""
    global _prefer_torch_rule
    previous = _prefer_torch_rule
    _prefer_torch_rule = rule if rule is not None else default_prefer_torch
    return previous


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _shape_of(q, k_text, contexts, heads, layout) -> AttentionShape:
    if layout == "blc":
        batch, lq, head_dim = q.shape[0], q.shape[1], q.shape[2] // heads
        lt = 0 if k_text is None else k_text.shape[1]
        lengths = tuple(c.k.shape[1] for c in contexts)
    else:
        batch, lq, head_dim = q.shape[0], q.shape[2], q.shape[3]
        lt = 0 if k_text is None else k_text.shape[2]
        lengths = tuple(c.k.shape[2] for c in contexts)
    device_name = _device_name(q.device)
    return AttentionShape(
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        lq=lq,
        lt=lt,
        image_lengths=lengths,
        has_masks=any(c.mask is not None for c in contexts),
        layout=layout,
        dtype=q.dtype,
        device_name=device_name,
    )


def select_backend(
    q: torch.Tensor,
    requested: str = "auto",
    *,
    k_text: Optional[torch.Tensor] = None,
    v_text: Optional[torch.Tensor] = None,
    contexts: Optional[Contexts] = None,
    heads: Optional[int] = None,
    layout: str = "blc",
) -> str:
    """"torch" or "triton" for this call.

    Without `heads` only the device and Triton's presence are judged; with it (and the other
    tensors) the shape is checked against what the kernel supports and the prefer-torch rule.
    Raises ValueError for an unknown name, RuntimeError when "triton" is requested where it
    cannot run, ValueError when "triton" is requested for a shape it does not support.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip().lower()
        if forced:
            if forced not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND}={forced!r} is not one of {', '.join(BACKENDS)}")
            requested = forced
    if requested == "torch":
        return "torch"
    contexts = () if contexts is None else contexts

    if requested == "triton":
        if not triton_available():
            raise RuntimeError(
                "attention backend 'triton' was requested but triton is not importable "
                f"({fused_triton.TRITON_IMPORT_ERROR}); install triton or use backend='torch'/'auto'"
            )
        if q.device.type != "cuda" and not fused_triton.interpreting():
            raise RuntimeError(
                f"attention backend 'triton' needs CUDA tensors, q is on {q.device.type}; on CPU the kernel "
                "runs only under the Triton interpreter (TRITON_INTERPRET=1, for tests). Use backend='auto' or 'torch'."
            )
        if heads is not None:
            reason = fused_triton.fused_unsupported_reason(q, k_text, v_text, contexts, heads, layout)
            if reason is not None:
                raise ValueError(f"attention backend 'triton' cannot run this call: {reason}")
        return "triton"

    # auto
    if not triton_available() or not _runs_natively(q):
        return "torch"
    if heads is None:
        return "triton"
    if fused_triton.fused_unsupported_reason(q, k_text, v_text, contexts, heads, layout) is not None:
        return "torch"
    if _prefer_torch_rule(_shape_of(q, k_text, contexts, heads, layout)):
        return "torch"
    if not _kernel_verified(q.device, kernel_variant(q, k_text, contexts, heads, layout)):
        return "torch"
    return "triton"


# (device type, device index, kernel variant) -> whether the compiled kernel passed its check
_verified: dict = {}


@dataclass(frozen=True)
class KernelVariant:
    """What makes one compiled kernel differ from another: the compile-time constants of a
    launch (head dim, text or not, masks or not, fp32 dots or not, tile sizes) and the
    memory layout of its tensors. Each variant is its own machine code, so each is checked."""

    layout: str
    dtype: torch.dtype
    head_dim: int
    has_text: bool
    has_mask: bool
    block_m: int
    block_n_img: int
    max_image_len: int  # the call's longest image context (sets block_n_img); the check uses it too

    def describe(self) -> str:
        return (f"{self.dtype}, layout {self.layout}, head dim {self.head_dim}, "
                f"{'text and ' if self.has_text else 'no text, '}{'masked ' if self.has_mask else ''}image contexts, "
                f"tiles {self.block_m}x{self.block_n_img}")


def kernel_variant(q, k_text, contexts, heads: int, layout: str) -> KernelVariant:
    """The variant the fused kernel compiles for this call (mirrors its launcher's choices)."""
    shape = _shape_of(q, k_text, contexts, heads, layout)
    max_len = max(shape.image_lengths) if shape.image_lengths else 1
    block_d = max(16, fused_triton._next_pow2(shape.head_dim))
    cfg = fused_triton._launch_config(block_d, max_len, q.dtype)
    return KernelVariant(layout=layout, dtype=q.dtype, head_dim=shape.head_dim, has_text=k_text is not None,
                         has_mask=shape.has_masks, block_m=cfg["BLOCK_M"], block_n_img=cfg["BLOCK_N_IMG"],
                         max_image_len=max_len)


def _variant_inputs(variant: KernelVariant, device: torch.device, g: torch.Generator):
    """Small tensors that make the kernel compile `variant` and walk all its code paths: two
    query tiles with a ragged tail, text shorter than a tile, an image context as long as
    the call's (cond/uncond rows routed by batch_index, a mask when the variant has masks)
    and a short one with a negative weight."""
    b, h, d = 2, 2, variant.head_dim
    lq, lt = variant.block_m + 5, 9

    def rnd(rows, length):
        t = torch.randn(rows, length, h * d, generator=g)
        if variant.layout == "bhld":
            t = t.reshape(rows, length, h, d).transpose(1, 2).contiguous()
        return t.to(device, variant.dtype)

    q = rnd(b, lq)
    kt, vt = (rnd(b, lt), rnd(b, lt)) if variant.has_text else (None, None)
    mask = torch.rand(b, lq, generator=g).to(device, variant.dtype) if variant.has_mask else None
    long_len = variant.max_image_len
    contexts = [ImageContext(rnd(2, long_len), rnd(2, long_len), weight=0.7, mask=mask,
                             batch_index=torch.tensor([1, 0], device=device)),
                ImageContext(rnd(1, min(5, long_len)), rnd(1, min(5, long_len)), weight=-0.4)]
    return q, kt, vt, contexts, h


def _self_check(device: torch.device, variant: KernelVariant) -> Optional[str]:
    """None when the compiled kernel of `variant` matches the torch reference on `device`,
    else why not.

    A kernel that compiles but computes wrong (a driver, a Triton release, an architecture
    nobody ran it on) must not reach users' pictures. Every variant is its own compiled code,
    so "auto" checks each one the first time a call needs it, on small tensors: the check
    costs one small launch of a kernel the real call compiles anyway."""
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        q, kt, vt, ctxs, h = _variant_inputs(variant, device, g)
        if kernel_variant(q, kt, ctxs, h, variant.layout) != variant:
            return f"internal: the check's inputs do not reproduce the variant ({variant.describe()})"
        # The reference sees the same (rounded) inputs, in fp32.
        up = lambda t: None if t is None else t.float()
        ref = decoupled_attention_torch(
            up(q), up(kt), up(vt),
            [dataclasses.replace(c, k=c.k.float(), v=c.v.float(), mask=up(c.mask)) for c in ctxs], h, variant.layout)
        got = fused_triton.fused_decoupled_attention(q, kt, vt, ctxs, h, variant.layout)
        err = (got.float() - ref).abs().max().item()
        tol = 1e-3 if variant.dtype == torch.float32 else 3e-2
        if not err <= tol:  # also catches NaN
            return f"max error {err:.3g} against the torch reference"
    except Exception as exc:  # compile or launch failure
        return f"{type(exc).__name__}: {exc}"
    return None


def _kernel_verified(device: torch.device, variant: KernelVariant) -> bool:
    key = (device.type, device.index, variant)
    if key not in _verified:
        reason = _self_check(device, variant)
        if reason is not None:
            logging.warning("IPAdapter Fused: the fused attention kernel failed its self-check on %s for %s (%s); "
                            "using the torch path for such calls there. Please report this with your GPU and "
                            "Triton version.", device, variant.describe(), reason)
        _verified[key] = reason is None
    return _verified[key]


def _runs_natively(q: torch.Tensor) -> bool:
    """Compiled kernel on a GPU, as opposed to the interpreter or a CPU tensor. A seam of its
    own so tests can exercise the shape rules of "auto" on CPU."""
    return q.device.type == "cuda" and not fused_triton.interpreting()


def _with_weights(contexts: Contexts, weights: Optional[Sequence[float]]) -> Contexts:
    if weights is None:
        return contexts
    if len(weights) != len(contexts):
        raise ValueError(f"got {len(weights)} weights for {len(contexts)} image contexts")
    if isinstance(contexts, PackedContexts):
        return contexts.with_weights(weights)
    return [dataclasses.replace(c, weight=float(w)) for c, w in zip(contexts, weights)]


def decoupled_attention(
    q: torch.Tensor,
    k_text: Optional[torch.Tensor],
    v_text: Optional[torch.Tensor],
    contexts: Contexts,
    heads: int,
    layout: str = "blc",
    backend: str = "auto",
    attention_fn: Optional[AttentionFn] = None,
    *,
    weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Attn(q, K_text, V_text) + sum_j w_j * m_j * Attn(q, K_j, V_j) on the chosen backend.

    contexts: ImageContexts, or a PackedContexts built once with pack_image_contexts (the
      fast path for the kernel: no per-call work for image contexts; the torch path reads the
      same buffers).
    attention_fn: used by the torch backend only (e.g. ComfyUI's optimized_attention, to
      match the host bit for bit); the fused kernel computes every term itself.
    weights: per-context weights for this call, overriding those stored in the contexts
      (cheap with a PackedContexts: schedules change them every step).
    """
    if isinstance(contexts, PackedContexts) and contexts.batch != q.shape[0]:
        raise ValueError(
            f"packed contexts were built for a query batch of {contexts.batch}, q has {q.shape[0]}; "
            "pack once per batch pattern"
        )
    chosen = select_backend(
        q, backend, k_text=k_text, v_text=v_text, contexts=contexts, heads=heads, layout=layout
    )
    if chosen == "triton":
        return fused_triton.fused_decoupled_attention(q, k_text, v_text, contexts, heads, layout, weights=weights)
    return decoupled_attention_torch(q, k_text, v_text, _with_weights(contexts, weights), heads, layout, attention_fn)
