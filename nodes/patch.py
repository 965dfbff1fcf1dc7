"""The attn2 replacement that adds image prompts to a UNet's cross-attention.

One `Attn2Patch` per attention key holds every adapter applied to that key (so stacked
apply nodes share it) and, when another pack had already patched the key, that patch
as `previous` (it then computes the text part). Patch objects are immutable and return
themselves from deepcopy: the host deep-copies model_options on every clone().

An `AppliedAdapter` is one apply node's result: image tokens, per-layer weights, the
sampling window and an optional mask. Its K/V per layer are computed the first time a
run needs them, packed with those of the other adapters on the same key, kept for the
rest of the run and released when sampling ends."""
from __future__ import annotations

import hashlib
import weakref
from typing import Optional, Sequence

import torch

from ..attention import ImageContext, decoupled_attention, mask_to_tokens, pack_image_contexts
from .host import host_attention_fn
from .schedules import SiteWeight


def tensor_to_size(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat the last row or cut, so that x has n rows (the established convention)."""
    if x.shape[0] < n:
        return torch.cat([x, x[-1:].expand(n - x.shape[0], *x.shape[1:])], dim=0)
    return x[:n]


class _StepSigma:
    """sigma of the current step as a Python float, read from the device once per step.

    Every attention call of one step receives the same sigmas tensor; remembering it
    weakly means a new step (a new tensor) is noticed, and a freed tensor whose id is
    reused cannot be mistaken for the old one."""

    def __init__(self):
        self._ref = None
        self._value = None

    def get(self, sigmas: Optional[torch.Tensor]) -> Optional[float]:
        if sigmas is None:
            return None
        if self._ref is not None and self._ref() is sigmas:
            return self._value
        value = float(sigmas.detach().reshape(-1)[0])
        self._ref, self._value = weakref.ref(sigmas), value
        return value


_step_sigma = _StepSigma()


class AppliedAdapter:
    """One application of an adapter to a model. Immutable apart from its run cache."""

    def __init__(
        self,
        weights,                      # models.IPAdapterWeights (kept loaded by the host with the model)
        tokens: torch.Tensor,         # (2, N, T, C): positive and negative tokens of N images
        site_weights: Sequence[SiteWeight],
        sigma_start: float,
        sigma_end: float,
        embeds_scaling: str = "V only",
        mask: Optional[torch.Tensor] = None,  # (M, H, W) in [0, 1]
    ):
        self.weights = weights
        self.tokens = tokens
        self.site_weights = tuple(site_weights)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.embeds_scaling = embeds_scaling
        self.mask = mask
        self._cache: dict = {}
        self.order_key = self._content_key()

    def _content_key(self) -> str:
        """A digest of everything that shapes this adapter's terms. Patches sum their image
        terms sorted by it, so stacked apply nodes give bit-identical results in any order."""
        h = hashlib.sha1()
        for t in (self.tokens, self.mask):
            if t is not None:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.site_weights, self.sigma_start, self.sigma_end, self.embeds_scaling,
                       getattr(self.weights, "spec", None))).encode())
        return h.hexdigest()

    def __deepcopy__(self, memo):
        return self

    def release(self):
        """Drop the packed K/V and masks of a run."""
        self._cache.clear()

    def active(self, sigma: Optional[float]) -> bool:
        return sigma is None or (self.sigma_end <= sigma <= self.sigma_start)

    def layer_kv(self, layer: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This adapter's image K/V at one layer, rows (positive, negative). Called only when
        a patch packs its contexts, i.e. once per run and layer."""
        sw = self.site_weights[layer]
        tokens = self.tokens
        if sw.swap:
            tokens = torch.stack([torch.zeros_like(tokens[0]), tokens[0]])
        with torch.no_grad():
            # One projection per row with the images as the batch, the shapes the established
            # implementation multiplies with, so its results are reproduced bit for bit; the
            # images' tokens are then joined into one context (concat).
            kv = [self.weights.layer_kv(layer, row) for row in tokens]
            k = torch.stack([x[0].reshape(-1, x[0].shape[-1]) for x in kv])
            v = torch.stack([x[1].reshape(-1, x[1].shape[-1]) for x in kv])
            if self.embeds_scaling != "V only":
                w = sw.weight
                if "C penalty" in self.embeds_scaling:
                    w = w * k.shape[-1] / 1280.0
                k = k * w
                if self.embeds_scaling.startswith("K+mean(V)"):
                    mean = v.mean(dim=1, keepdim=True)
                    v = (v - mean) + mean * w
                else:
                    v = v * w
        return k.to(device, dtype), v.to(device, dtype)

    @staticmethod
    def _batch_index(cond_or_uncond: tuple, batch: int, device) -> torch.Tensor:
        per_chunk = batch // len(cond_or_uncond)
        # 1 is the negative (uncond) chunk; every other chunk reads the positive tokens.
        rows = [1 if c == 1 else 0 for c in cond_or_uncond for _ in range(per_chunk)]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def _mask_rows(self, extra_options: dict, cond_or_uncond: tuple, batch: int, seq_len: int, device, dtype):
        _, _, lh, lw = extra_options["original_shape"]
        rows = mask_to_tokens(self.mask.to(device), lh, lw, seq_len)
        return tensor_to_size(rows, batch // len(cond_or_uncond)).repeat(len(cond_or_uncond), 1).to(dtype)

    def context(self, layer: int, q: torch.Tensor, extra_options: dict) -> Optional[ImageContext]:
        sw = self.site_weights[layer]
        if sw.weight == 0:
            return None
        k, v = self.layer_kv(layer, q.device, q.dtype)
        cond_or_uncond = tuple(extra_options["cond_or_uncond"])
        batch = q.shape[0]
        mask = None
        if self.mask is not None:
            mask = self._mask_rows(extra_options, cond_or_uncond, batch, q.shape[1], q.device, q.dtype)
        return ImageContext(
            k=k, v=v,
            weight=sw.weight if self.embeds_scaling == "V only" else 1.0,
            mask=mask,
            batch_index=self._batch_index(cond_or_uncond, batch, q.device),
        )


class Attn2Patch:
    """The callable registered under one attn2 key: (q, k, v, extra_options) -> out."""

    def __init__(self, layer: int, entries: tuple = (), previous=None, backend: str = "auto"):
        self.layer = layer
        self.entries = tuple(sorted(entries, key=lambda e: e.order_key))
        self.previous = previous
        self.backend = backend

    def __deepcopy__(self, memo):
        return self

    def to(self, device):
        return self  # holds no tensors; K/V are cached per device by the entries

    def with_entry(self, entry: AppliedAdapter) -> "Attn2Patch":
        return Attn2Patch(self.layer, self.entries + (entry,), self.previous, self.backend)

    def _contexts(self, q, extra_options, sigma):
        """The image contexts of this call, packed once per run for each combination of
        active adapters and batch layout (the fused kernel reads one buffer; the torch
        path reads views of it)."""
        active = [e for e in self.entries if e.active(sigma) and e.site_weights[self.layer].weight != 0]
        if not active:
            return None
        cond_or_uncond = tuple(extra_options["cond_or_uncond"])
        masked = any(e.mask is not None for e in active)
        shape = tuple(extra_options["original_shape"][2:]) if masked else None
        key = ("pack", self.layer, tuple(id(e) for e in active), cond_or_uncond, q.shape[0], q.shape[1],
               shape, q.device, q.dtype)
        cache = active[0]._cache  # released with the run like the K/V it packs
        pack = cache.get(key)
        if pack is None:
            contexts = [e.context(self.layer, q, extra_options) for e in active]
            pack = cache[key] = pack_image_contexts(contexts, q.shape[0], extra_options["n_heads"], "blc",
                                                    dtype=q.dtype, device=q.device)
        return pack

    def __call__(self, q, k, v, extra_options):
        contexts = self._contexts(q, extra_options, _step_sigma.get(extra_options.get("sigmas")))
        heads = extra_options["n_heads"]
        attention_fn = host_attention_fn(extra_options)
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
            if contexts is None:
                return out
            extra = decoupled_attention(q, None, None, contexts, heads, "blc", self.backend, attention_fn)
            return out + extra.to(out.dtype)
        if contexts is None:
            return attention_fn(q, k, v, heads)
        return decoupled_attention(q, k, v, contexts, heads, "blc", self.backend, attention_fn)


def install(model_options: dict, sites, entry: AppliedAdapter, skip_keys=frozenset()) -> dict:
    """Return new transformer_options with `entry` added on every site's key.

    Copies the dicts it changes (never mutates what another clone shares). A foreign
    patch found on the 3-element key, or on the 2-element key the host falls back to,
    becomes `previous` so it keeps working."""
    to = dict(model_options.get("transformer_options", {}))
    replace = dict(to.get("patches_replace", {}))
    attn2 = dict(replace.get("attn2", {}))
    for layer, site in enumerate(sites):
        if site.key in skip_keys:
            continue
        existing = attn2.get(site.key)
        if isinstance(existing, Attn2Patch):
            attn2[site.key] = existing.with_entry(entry)
            continue
        if existing is None:
            existing = attn2.get(site.key[:2])
        attn2[site.key] = Attn2Patch(layer, (entry,), previous=existing)
    replace["attn2"] = attn2
    to["patches_replace"] = replace
    return to
