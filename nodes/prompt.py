"""One apply node's image prompt, with nothing in it about where it is injected.

An `ImagePrompt` holds what the user chose (image tokens, one weight per adapter layer,
the sampling window, an optional region mask) and a run cache. The binders decide where
its terms go: `patch.Attn2Patch` on a UNet's cross-attention, `dit_patch.DitBlockPatch`
on a DiT's blocks. Both ask it for the same thing: an `ImageContext` (K/V rows, weight,
mask rows, which batch rows read the positive or the negative tokens) for one layer.

How a layer's K/V come from the tokens is the adapter family's business (`kv_fn`). K/V
are computed the first time a run needs them and kept (packed, by the binder) until the run
ends, unless they depend on the step (SD3.5's time-conditioned resampler): those are kept
for one step."""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import torch

from ..attention import ImageContext
from .schedules import SiteWeight

# kv_fn(prompt, layer, step) -> (k, v): (2, Lk, width) rows (positive, negative) for one layer.
KVFn = Callable[["ImagePrompt", int, Optional[float]], tuple[torch.Tensor, torch.Tensor]]


def tensor_to_size(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat the last row or cut, so that x has n rows (the established convention)."""
    if x.shape[0] < n:
        return torch.cat([x, x[-1:].expand(n - x.shape[0], *x.shape[1:])], dim=0)
    return x[:n]


def unet_layer_kv(prompt: "ImagePrompt", layer: int, step: Optional[float] = None):
    """K/V of a UNet adapter layer, with the established pack's token swap and K/V scaling."""
    sw = prompt.site_weights[layer]
    tokens = prompt.tokens
    if sw.swap:
        tokens = torch.stack([torch.zeros_like(tokens[0]), tokens[0]])
    # One projection per row with the images as the batch, the shapes the established
    # implementation multiplies with, so its results are reproduced bit for bit; the
    # images' tokens are then joined into one context (concat).
    kv = [prompt.weights.layer_kv(layer, row) for row in tokens]
    k = torch.stack([x[0].reshape(-1, x[0].shape[-1]) for x in kv])
    v = torch.stack([x[1].reshape(-1, x[1].shape[-1]) for x in kv])
    if prompt.embeds_scaling != "V only":
        w = sw.weight
        if "C penalty" in prompt.embeds_scaling:
            w = w * k.shape[-1] / 1280.0
        k = k * w
        if prompt.embeds_scaling.startswith("K+mean(V)"):
            mean = v.mean(dim=1, keepdim=True)
            v = (v - mean) + mean * w
        else:
            v = v * w
    return k, v


class ImagePrompt:
    """One application of an adapter to a model. Immutable apart from its run cache."""

    def __init__(
        self,
        weights,                      # the adapter module (kept loaded by the host with the model)
        tokens: torch.Tensor,         # (2, N, T, C) positive/negative tokens of N images, or what kv_fn reads
        site_weights: Sequence[SiteWeight],
        sigma_start: float,
        sigma_end: float,
        embeds_scaling: str = "V only",
        mask: Optional[torch.Tensor] = None,  # (M, H, W) in [0, 1]
        window: Optional[tuple[float, float]] = None,  # (start_at, end_at), fractions of the schedule
        kv_fn: KVFn = unet_layer_kv,
        per_step: bool = False,       # K/V depend on the step: cached per step, not per run
    ):
        """sigma_start / sigma_end: the window in sigmas of the model at apply time, used for
        calls outside a sampling run; `window` (fractions) is resolved again from the
        model_sampling of each run (begin_run)."""
        self.weights = weights
        self.tokens = tokens
        self.site_weights = tuple(site_weights)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.embeds_scaling = embeds_scaling
        self.mask = mask
        self.kv_fn = kv_fn
        self.per_step = per_step
        self._cache: dict = {}
        self._run_sigmas: Optional[tuple[float, float]] = None
        self.model_sampling = None
        self.order_key = self._content_key()

    def _content_key(self) -> str:
        """A digest of everything that shapes this prompt's terms. Binders sum image terms
        sorted by it, so stacked apply nodes give bit-identical results in any order."""
        h = hashlib.sha1()
        for t in (self.tokens, self.mask):
            if t is not None:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.site_weights, self.window or (self.sigma_start, self.sigma_end), self.embeds_scaling,
                       getattr(self.weights, "spec", None))).encode())
        return h.hexdigest()

    def __deepcopy__(self, memo):
        return self

    def begin_run(self, model_sampling) -> None:
        """Resolve the window to sigmas with the model_sampling of the run about to start,
        as the host does for ControlNet (a ModelSampling node after the apply node moves
        the schedule)."""
        self.model_sampling = model_sampling
        if self.window is not None and model_sampling is not None:
            start, end = self.window
            self._run_sigmas = (float(model_sampling.percent_to_sigma(start)),
                                float(model_sampling.percent_to_sigma(end)))

    def release(self):
        """Drop the K/V, packed contexts, masks and window of a run."""
        self._cache.clear()
        self._run_sigmas = None
        self.model_sampling = None

    def active(self, sigma: Optional[float]) -> bool:
        start, end = self._run_sigmas or (self.sigma_start, self.sigma_end)
        return sigma is None or (end <= sigma <= start)

    def layer_kv(self, layer: int, device, dtype, step: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This prompt's image K/V at one layer, rows (positive, negative). Binders call it only
        when they pack their contexts: once per run and layer (once per step and layer where
        the K/V depend on the step, see `cache_step`)."""
        with torch.no_grad():
            k, v = self.kv_fn(self, layer, step)
        return k.to(device, dtype), v.to(device, dtype)

    def cache_step(self, step: Optional[float]) -> Optional[float]:
        """The part of a binder's cache key that depends on the step: None for prompts whose
        K/V hold for the whole run."""
        return step if self.per_step else None

    @staticmethod
    def batch_index(cond_or_uncond: Sequence[int], batch: int, device) -> torch.Tensor:
        per_chunk = batch // len(cond_or_uncond)
        # 1 is the negative (uncond) chunk; every other chunk reads the positive tokens.
        rows = [1 if c == 1 else 0 for c in cond_or_uncond for _ in range(per_chunk)]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def mask_rows(self, to_tokens: Callable[[torch.Tensor], torch.Tensor], cond_or_uncond: Sequence[int],
                  batch: int, device, dtype) -> Optional[torch.Tensor]:
        """(batch, Lq) mask weights, or None without a mask. to_tokens maps the (M, H, W) mask
        to (M, Lq) rows on the layer's token grid (the binder knows the grid)."""
        if self.mask is None:
            return None
        rows = to_tokens(self.mask.to(device))
        return tensor_to_size(rows, batch // len(cond_or_uncond)).repeat(len(cond_or_uncond), 1).to(dtype)

    def context(self, layer: int, batch: int, cond_or_uncond: Sequence[int], device, dtype,
                to_tokens: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                step: Optional[float] = None) -> Optional[ImageContext]:
        sw = self.site_weights[layer]
        if sw.weight == 0:
            return None
        k, v = self.layer_kv(layer, device, dtype, step)
        mask = None if to_tokens is None else self.mask_rows(to_tokens, cond_or_uncond, batch, device, dtype)
        return ImageContext(
            k=k, v=v,
            weight=sw.weight if self.embeds_scaling == "V only" else 1.0,
            mask=mask,
            batch_index=self.batch_index(cond_or_uncond, batch, device),
        )
