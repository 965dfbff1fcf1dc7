"""The attn2 replacement that adds image prompts to a UNet's cross-attention.

One `Attn2Patch` per attention key holds every adapter applied to that key (so stacked
apply nodes share it) and, when another pack had already patched the key, that patch
as `previous` (it then computes the text part). The host deep-copies model_options on
every clone(): a patch then gives a shallow copy (its adapters, which hold the tensors,
are shared), so that a pack which adds its own terms to the patch in place
(ComfyUI_IPAdapter_plus's `add`) changes only its own clone.

Each entry is an `ImagePrompt` (prompt.py): one apply node's tokens, per-layer weights,
window and mask. When a run starts, `begin_run` turns every window into sigmas with the
model_sampling of that run (a ModelSampling node may follow the apply node) and lets each
patch see a foreign patch on the 2-element key the host would otherwise fall back to. The
K/V of a layer are computed the first time a run needs them, packed with those of the
other prompts on the same key, kept for the rest of the run and released when sampling
ends."""
from __future__ import annotations

import copy
import weakref
from typing import Optional

import torch

from ..attention import decoupled_attention, mask_to_tokens, pack_image_contexts
from .host import host_attention_fn
from .multi_ref import MergedPrompt
from .prompt import ImagePrompt


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

    def with_entry(self, entry: ImagePrompt) -> "Attn2Patch":
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
        active = [e for e in self.entries if e.active(sigma) and e.site_weights[self.layer].weight != 0
                  and not isinstance(e, MergedPrompt)]
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
            lh, lw = extra_options["original_shape"][2:]
            seq_len = q.shape[1]
            contexts = [e.context(self.layer, q.shape[0], cond_or_uncond, q.device, q.dtype,
                                  to_tokens=lambda m: mask_to_tokens(m, lh, lw, seq_len)) for e in active]
            pack = cache[key] = pack_image_contexts(contexts, q.shape[0], extra_options["n_heads"], "blc",
                                                    dtype=q.dtype, device=q.device)
        return pack

    def __call__(self, q, k, v, extra_options):
        sigma = _step_sigma.get(extra_options.get("sigmas"))
        contexts = self._contexts(q, extra_options, sigma)
        heads = extra_options["n_heads"]
        attention_fn = host_attention_fn(extra_options)
        merged = [e for e in self.entries if isinstance(e, MergedPrompt) and e.active(sigma)]
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        elif contexts is None or merged or "optimized_attention_override" in extra_options:
            # An attention override (SageAttention and other attention nodes) replaces the
            # host's attention wherever transformer_options reach it; the fused kernel would
            # bypass it, so the text term goes through the host and only image terms are fused.
            out = attention_fn(q, k, v, heads)
        else:
            out = decoupled_attention(q, k, v, contexts, heads, "blc", self.backend, attention_fn)
            contexts = None
        text_out = out  # merged prompts read the text attention output (before to_out), as MIP does
        if contexts is not None:
            extra = decoupled_attention(q, None, None, contexts, heads, "blc", self.backend, attention_fn)
            out = out + extra.to(out.dtype)
        for entry in merged:
            term = entry.merged_term(self.layer, q, text_out, extra_options, attention_fn, self.backend)
            if term is not None:
                out = out + term.to(out.dtype)
        for callback, kwargs in self.foreign_terms:
            # the window convention of the pack that added the term
            if sigma is None or kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf")):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def install(model_options: dict, sites, entry: ImagePrompt, skip_keys=frozenset()) -> dict:
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


def begin_run(model_options: dict, model_sampling) -> list[ImagePrompt]:
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
