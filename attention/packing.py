"""Image contexts packed for the fused kernel: every adapter's K/V of one attention call in one
buffer, laid out once per run, plus the layout helpers (blc / bhld) the launcher shares.

Pure torch: the torch path reads views of a pack, the kernel reads the buffer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from .contexts import ImageContext

# Strides and offsets travel as int32 kernel arguments.
_INT32_MAX = 2**31 - 1

@dataclass(frozen=True, eq=False)
class PackedContexts:
    """All image contexts of one attention site in one K buffer and one V buffer.

    Why pack: Triton cannot index a Python list of pointers, and one pointer + stride set per
    context (8 contexts x ~16 arguments) makes every launch pay for ~150 arguments. Packed, the
    kernel takes two pointers and a tiny int32 table, whatever the number of contexts. Image
    K/V depend only on the embeddings and the layer, so the patcher packs once per run and
    layer (and per batch pattern, since `meta` holds the batch routing); each call then costs
    nothing beyond the launch. `with_weights` swaps the per-step weights without touching the
    buffers.

    The buffers are laid out (rows, H*D), rows = context tokens of every context row back to
    back. That choice lets `contexts` hold plain views into the same memory in the caller's
    layout, so the torch fallback reads the packed buffers and nothing is stored twice.

    meta: (N, 4 + B) int32 on the device, one row per context:
      [first packed row of the context, Lk, first mask row or -1, mask row step (0 or 1),
       context row used by query batch row 0, ..., by row B-1]
    masks: (M, Lq) float32, all contexts' mask rows back to back, or None.
    """

    contexts: tuple[ImageContext, ...]
    k: torch.Tensor
    v: torch.Tensor
    meta: torch.Tensor
    masks: Optional[torch.Tensor]
    weights: tuple[float, ...]
    batch: int
    heads: int
    head_dim: int
    layout: str
    lengths: tuple[int, ...]
    mask_len: Optional[int]

    def __len__(self) -> int:
        return len(self.contexts)

    def __iter__(self) -> Iterator[ImageContext]:
        # Iterating yields ImageContexts, so a pack can go wherever a list of contexts goes
        # (the torch reference included).
        return iter(self.contexts)

    def __getitem__(self, i):
        return self.contexts[i]

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone(); a pack is immutable and may hold
        # large buffers, so copies share it.
        return self

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def with_weights(self, weights: Sequence[float]) -> "PackedContexts":
        """Same buffers, new per-context weights (cheap: no tensor is touched)."""
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(self.contexts):
            raise ValueError(f"got {len(weights)} weights for {len(self.contexts)} image contexts")
        contexts = tuple(dataclasses.replace(c, weight=w) for c, w in zip(self.contexts, weights))
        return dataclasses.replace(self, contexts=contexts, weights=weights)


def _split_heads_shape(t: torch.Tensor, layout: str, heads: int, what: str) -> tuple[int, int, int]:
    """(rows, length, head_dim) of a q/k/v tensor in either layout, with shape checks."""
    if layout == "blc":
        if t.dim() != 3:
            raise ValueError(f"{what} must be (B, L, H*D) in layout 'blc', got shape {tuple(t.shape)}")
        if t.shape[2] % heads != 0:
            raise ValueError(f"{what} channel count {t.shape[2]} is not divisible by heads={heads}")
        return t.shape[0], t.shape[1], t.shape[2] // heads
    if layout == "bhld":
        if t.dim() != 4 or t.shape[1] != heads:
            raise ValueError(f"{what} must be (B, H={heads}, L, D) in layout 'bhld', got shape {tuple(t.shape)}")
        return t.shape[0], t.shape[2], t.shape[3]
    raise ValueError(f"layout must be 'blc' or 'bhld', got {layout!r}")


def _bhld_strides(t: torch.Tensor, layout: str, heads: int, batch: int) -> tuple[int, int, int, int]:
    """Strides (batch, head, position, dim) of t seen as (B, H, L, D), without copying.

    A one-row tensor gets batch stride 0 so every query row reads it (broadcast)."""
    if layout == "blc":
        d = t.shape[2] // heads
        sb, sl, sc = t.stride()
        strides = (sb, d * sc, sl, sc)
    else:
        strides = tuple(t.stride())
    if t.shape[0] == 1 and batch != 1:
        strides = (0,) + strides[1:]
    return strides


def _to_rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(Bc, Lk, H*D) or (Bc, H, Lk, D) -> (Bc*Lk, H*D)."""
    if layout == "blc":
        return t.reshape(t.shape[0] * t.shape[1], t.shape[2])
    bc, h, lk, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(bc * lk, h * d)


def _from_rows(rows: torch.Tensor, layout: str, bc: int, lk: int, heads: int) -> torch.Tensor:
    """Inverse of _to_rows, as a view of the packed buffer."""
    x = rows.view(bc, lk, rows.shape[1])
    if layout == "blc":
        return x
    return x.view(bc, lk, heads, rows.shape[1] // heads).permute(0, 2, 1, 3)


def _context_rows(ctx: ImageContext, batch: int) -> int:
    bc = ctx.k.shape[0]
    if ctx.batch_index is not None:
        if ctx.batch_index.dim() != 1 or ctx.batch_index.shape[0] != batch:
            raise ValueError(
                f"batch_index must be ({batch},) for a query batch of {batch}, got {tuple(ctx.batch_index.shape)}"
            )
    elif bc not in (1, batch):
        raise ValueError(
            f"image context has {bc} rows but the query batch is {batch}; "
            "pass batch_index to say which context row each query row uses"
        )
    return bc


def _check_context(ctx: ImageContext, batch: int, heads: int, head_dim: int, layout: str) -> tuple[int, int]:
    """(Bc, Lk) of one context after shape checks shared by the packer and the support test."""
    if ctx.k.shape != ctx.v.shape:
        raise ValueError(f"image context k {tuple(ctx.k.shape)} and v {tuple(ctx.v.shape)} differ in shape")
    bc, lk, d = _split_heads_shape(ctx.k, layout, heads, "image context k")
    if d != head_dim:
        raise ValueError(f"image context head dim {d} differs from the query's {head_dim}")
    if lk < 1:
        raise ValueError("image context has no tokens")
    _context_rows(ctx, batch)
    if ctx.mask is not None and (ctx.mask.dim() != 2 or ctx.mask.shape[0] not in (1, batch)):
        raise ValueError(f"context mask must be (B, Lq) or (1, Lq) with B={batch}, got {tuple(ctx.mask.shape)}")
    return bc, lk


def pack_image_contexts(
    contexts: Sequence[ImageContext],
    batch: int,
    heads: int,
    layout: str = "blc",
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    validate: bool = True,
) -> PackedContexts:
    """Pack image contexts once for reuse across calls (see PackedContexts).

    batch: the query batch the pack will serve (batch_index routing is baked in).
    dtype: storage dtype of the packed K/V; default: the contexts' own (promoted) dtype. Pass
      the model's dtype to store them at the precision the attention reads them (the reference
      casts image K/V to q's dtype anyway).
    validate: check batch_index values against the context rows. That reads them on the host
      (a device sync when they live on the GPU), so the per-call path turns it off and clamps
      instead; a pack built once per run should keep it on.
    """
    contexts = tuple(contexts)
    if layout not in ("blc", "bhld"):
        raise ValueError(f"layout must be 'blc' or 'bhld', got {layout!r}")
    if not contexts:
        raise ValueError("nothing to pack: no image contexts")
    device = torch.device(device) if device is not None else contexts[0].k.device
    if dtype is None:
        dtype = contexts[0].k.dtype
        for c in contexts[1:]:
            dtype = torch.promote_types(dtype, c.k.dtype)
    head_dim = _split_heads_shape(contexts[0].k, layout, heads, "image context k")[2]

    shapes = [_check_context(c, batch, heads, head_dim, layout) for c in contexts]
    mask_lens = {c.mask.shape[1] for c in contexts if c.mask is not None}
    if len(mask_lens) > 1:
        raise ValueError(f"context masks cover different query lengths {sorted(mask_lens)}")
    mask_len = mask_lens.pop() if mask_lens else None

    k_rows = torch.cat([_to_rows(c.k, layout).to(device=device, dtype=dtype) for c in contexts], dim=0)
    v_rows = torch.cat([_to_rows(c.v, layout).to(device=device, dtype=dtype) for c in contexts], dim=0)
    if k_rows.numel() > _INT32_MAX:
        raise ValueError("packed image contexts exceed 2**31 elements")

    mask_parts = []
    meta_host = torch.zeros((len(contexts), 4 + batch), dtype=torch.int32)
    device_rows = []
    seg, mask_row = 0, 0
    for j, (c, (bc, lk)) in enumerate(zip(contexts, shapes)):
        meta_host[j, 0] = seg
        meta_host[j, 1] = lk
        if c.mask is not None:
            meta_host[j, 2] = mask_row
            meta_host[j, 3] = 1 if c.mask.shape[0] == batch and batch > 1 else 0
            mask_parts.append(c.mask.to(device=device, dtype=torch.float32))
            mask_row += c.mask.shape[0]
        else:
            meta_host[j, 2] = -1
        if c.batch_index is not None:
            if validate:
                idx = c.batch_index.detach().to("cpu", torch.int64)
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bc):
                    raise ValueError(f"batch_index values must lie in [0, {bc}), got {idx.tolist()}")
                meta_host[j, 4:] = idx.to(torch.int32)
            elif c.batch_index.device.type == "cpu":
                meta_host[j, 4:] = c.batch_index.clamp(0, bc - 1).to(torch.int32)
            else:
                device_rows.append((j, c.batch_index, bc))
        elif bc == batch:
            meta_host[j, 4:] = torch.arange(batch, dtype=torch.int32)
        seg += bc * lk
    # non_blocking from pageable memory stages the bytes at once and never waits for the GPU;
    # a blocking copy would stall the host until the queue drains, on every unpacked call.
    meta = meta_host.to(device, non_blocking=True)
    for j, idx, bc in device_rows:
        # Unvalidated indices are clamped so a bad one gives a wrong row, never a stray read.
        meta[j, 4:] = idx.to(device).clamp(0, bc - 1).to(torch.int32)
    masks = torch.cat(mask_parts, dim=0).contiguous() if mask_parts else None

    views = []
    seg, mask_row = 0, 0
    for c, (bc, lk) in zip(contexts, shapes):
        mask_view = None
        if c.mask is not None:
            mask_view = masks[mask_row: mask_row + c.mask.shape[0]]
            mask_row += c.mask.shape[0]
        views.append(
            ImageContext(
                k=_from_rows(k_rows[seg: seg + bc * lk], layout, bc, lk, heads),
                v=_from_rows(v_rows[seg: seg + bc * lk], layout, bc, lk, heads),
                weight=float(c.weight),
                mask=mask_view,
                batch_index=c.batch_index,
            )
        )
        seg += bc * lk
    return PackedContexts(
        contexts=tuple(views),
        k=k_rows,
        v=v_rows,
        meta=meta,
        masks=masks,
        weights=tuple(float(c.weight) for c in contexts),
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        layout=layout,
        lengths=tuple(lk for _, lk in shapes),
        mask_len=mask_len,
    )
