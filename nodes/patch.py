"""The attn2 replacement that adds image prompts to a UNet's cross-attention.

One `Attn2Patch` per attention key holds every adapter applied to that key (so stacked
apply nodes share it) and, when another pack had already patched the key, that patch
as `previous` (it then computes the text part). The host deep-copies model_options on
every clone(): a patch then gives a shallow copy (its adapters, which hold the tensors,
are shared), so that a pack which adds its own terms to the patch in place
(ComfyUI_IPAdapter_plus's `add`) changes only its own clone.

An `AppliedAdapter` is one apply node's result: image tokens, per-layer weights, the
sampling window (fractions of the schedule) and an optional mask. When a run starts,
`begin_run` turns the window into sigmas with the model's model_sampling of that run (a
ModelSampling node may follow the apply node) and lets each patch see a foreign patch on
the 2-element key the host would otherwise fall back to. Its K/V per layer are computed
the first time a run needs them, packed with those of the other adapters on the same key,
kept for the rest of the run and released when sampling ends."""
from __future__ import annotations

import copy
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
        window: Optional[tuple[float, float]] = None,  # (start_at, end_at), fractions of the schedule
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
        self._cache: dict = {}
        self._run_sigmas: Optional[tuple[float, float]] = None
        self.order_key = self._content_key()

    def _content_key(self) -> str:
        """A digest of everything that shapes this adapter's terms. Patches sum their image
        terms sorted by it, so stacked apply nodes give bit-identical results in any order."""
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
        if self.window is not None and model_sampling is not None:
            start, end = self.window
            self._run_sigmas = (float(model_sampling.percent_to_sigma(start)),
                                float(model_sampling.percent_to_sigma(end)))

    def release(self):
        """Drop the packed K/V, masks and window of a run."""
        self._cache.clear()
        self._run_sigmas = None

    def active(self, sigma: Optional[float]) -> bool:
        start, end = self._run_sigmas or (self.sigma_start, self.sigma_end)
        return sigma is None or (end <= sigma <= start)

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
    """The callable registered under one attn2 key: (q, k, v, extra_options) -> out.

    previous: a foreign patch that computes the text term (and its own image terms):
      the one found on this key, or, with `previous_on_fallback_key`, the one on the
      2-element key the host would call if this patch were not there (re-read from the
      model options when each run starts, see begin_run).
    foreign_terms: (callback, kwargs) pairs another pack added to this patch through
      `add` (ComfyUI_IPAdapter_plus does so when it finds a patch on its key): each adds
      callback(out, q, k, v, extra_options, **kwargs) inside its own sigma window."""

    def __init__(self, layer: int, entries: tuple = (), previous=None, backend: str = "auto",
                 previous_on_fallback_key: bool = False, foreign_terms: tuple = ()):
        self.layer = layer
        self.entries = tuple(sorted(entries, key=lambda e: e.order_key))
        self.previous = previous
        self.previous_on_fallback_key = previous_on_fallback_key
        self.backend = backend
        self.foreign_terms = tuple(foreign_terms)

    def _replace(self, **changes) -> "Attn2Patch":
        kw = dict(layer=self.layer, entries=self.entries, previous=self.previous, backend=self.backend,
                  previous_on_fallback_key=self.previous_on_fallback_key, foreign_terms=self.foreign_terms)
        kw.update(changes)
        return Attn2Patch(**kw)

    def __deepcopy__(self, memo):
        # One object per clone, so that `add` from another pack stays on its clone; the
        # entries (tensors) and a previous patch are shared, not copied.
        return copy.copy(self)

    def to(self, device):
        return self  # holds no tensors; K/V are cached per device by the entries

    def with_entry(self, entry: AppliedAdapter) -> "Attn2Patch":
        return self._replace(entries=self.entries + (entry,))

    def add(self, callback, **kwargs) -> None:
        """Take an image term from ComfyUI_IPAdapter_plus applied after this pack: it finds
        this patch on its key and calls add(ipadapter_attention, **patch_kwargs) instead of
        registering its own (that call's model options are never stored back, so the term
        must live in this object, which belongs to that pack's clone alone)."""
        if not callable(callback):
            raise TypeError(f"add() needs a callable attention term, got {type(callback).__name__}")
        self.foreign_terms = self.foreign_terms + ((callback, dict(kwargs)),)

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
        sigma = _step_sigma.get(extra_options.get("sigmas"))
        contexts = self._contexts(q, extra_options, sigma)
        heads = extra_options["n_heads"]
        attention_fn = host_attention_fn(extra_options)
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        elif contexts is None or "optimized_attention_override" in extra_options:
            # An attention override (SageAttention and other attention nodes) replaces the
            # host's attention wherever transformer_options reach it; the fused kernel would
            # bypass it, so the text term goes through the host and only image terms are fused.
            out = attention_fn(q, k, v, heads)
        else:
            out = decoupled_attention(q, k, v, contexts, heads, "blc", self.backend, attention_fn)
            contexts = None
        if contexts is not None:
            extra = decoupled_attention(q, None, None, contexts, heads, "blc", self.backend, attention_fn)
            out = out + extra.to(out.dtype)
        for callback, kwargs in self.foreign_terms:
            # the window convention of the pack that added the term
            if sigma is None or kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf")):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


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
        on_fallback = existing is None and attn2.get(site.key[:2]) is not None
        if on_fallback:
            existing = attn2.get(site.key[:2])
        attn2[site.key] = Attn2Patch(layer, (entry,), previous=existing, previous_on_fallback_key=on_fallback)
    replace["attn2"] = attn2
    to["patches_replace"] = replace
    return to


def begin_run(model_options: dict, model_sampling) -> list[AppliedAdapter]:
    """Prepare the model options of one sampling run (the run's own copy, whose nested dicts
    the host has already copied) and return the adapters in them, to release afterwards.

    - every adapter's window is resolved with the run's model_sampling;
    - a foreign patch put on the 2-element key after this pack (ComfyUI_IPAdapter_plus on
      SD1.5 uses ("input", 1) where this pack uses ("input", 1, 0)) would never be called,
      since the host looks up the 3-element key first: it becomes the `previous` of this
      run's patch. One put there before this pack is re-read too (a clone holds its own
      copy of it, which a later `add` may have extended)."""
    attn2 = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if not attn2:
        return []
    entries = {}
    for key, patch in list(attn2.items()):
        if not isinstance(patch, Attn2Patch):
            continue
        for e in patch.entries:
            entries[id(e)] = e
        if len(key) != 3 or (patch.previous is not None and not patch.previous_on_fallback_key):
            continue
        fallback = attn2.get(key[:2])
        if isinstance(fallback, Attn2Patch):
            fallback = None
        if fallback is not patch.previous:
            attn2[key] = patch._replace(previous=fallback, previous_on_fallback_key=fallback is not None)
    for e in entries.values():
        e.begin_run(model_sampling)
    return list(entries.values())
