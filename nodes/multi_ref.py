"""Several reference objects on one UNet adapter, merged per position instead of summed.

"The cat from image 1 wearing the jacket from image 2": with plain stacking both terms act
everywhere and the objects blend. A `MergedPrompt` holds one set of image tokens per object
and, at every cross-attention layer, weights each object's term per query position:

- routing "attention": by where the object's entity word attends in that layer (MIP-Adapter's
  routing). With a MIP-Adapter checkpoint its learned gate sigmoid(text_to_weight(O_text)),
  normalised by its mean over positions, multiplies the weights, as the reference does;
  other adapters get the same routing without the gate.
- routing "masks": by user masks, one per object, on the layer's token grid.

The math lives in attention/merge.py; this module gathers its inputs inside the attn2 patch:
the layer's q, its text attention output O_text (before to_out), the object terms, and the
entity keys, i.e. the layer's own to_k applied to each entity word encoded on its own
(computed once at apply time: a few rows per layer)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..attention import ImageContext, decoupled_attention, mask_to_tokens
from ..attention.merge import attention_routed_merge, entity_attention_map, mask_routed_merge, mip_merge
from .prompt import ImagePrompt

ROUTINGS = ("attention", "masks")
_END_OF_TEXT = 49407  # CLIP's end-of-text token id (the SD1.5 and SDXL tokenizers share it)


class MergedPrompt(ImagePrompt):
    """N objects' image tokens and how to route them. tokens: (N, 2, T, C) (per object:
    positive, negative rows). entity_k: per layer, per object, (2, count, width) text keys of
    the object's entity word (positive rows) and of the empty prompt (negative rows)."""

    def __init__(self, weights, tokens, site_weights, sigma_start, sigma_end, window, routing: str,
                 entity_k: Optional[Sequence[Sequence[torch.Tensor]]] = None,
                 masks: Optional[torch.Tensor] = None, object_weights: Optional[Sequence[float]] = None):
        # per-object masks route the objects; they are not a region mask of the whole prompt
        self.object_masks = masks
        self.routing = routing
        super().__init__(weights, tokens, site_weights, sigma_start, sigma_end, "V only", window=window)
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of: {', '.join(ROUTINGS)}")
        self.routing = routing
        self.entity_k = entity_k
        self.object_weights = None if object_weights is None else tuple(float(w) for w in object_weights)
        self.gated = routing == "attention" and bool(getattr(weights.spec, "mip_gate", False))

    def _content_key(self) -> str:
        import hashlib

        h = hashlib.sha1(super()._content_key().encode())
        h.update(self.routing.encode())
        if self.object_masks is not None:
            h.update(self.object_masks.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def objects(self) -> int:
        return self.tokens.shape[0]

    def _object_kv(self, layer: int, device, dtype):
        key = ("objects", layer, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = []
            with torch.no_grad():
                for obj in self.tokens:  # (2, T, C)
                    kv = [self.weights.layer_kv(layer, row[None]) for row in obj]
                    hit.append((torch.cat([x[0] for x in kv]).to(device, dtype),
                                torch.cat([x[1] for x in kv]).to(device, dtype)))
            self._cache[key] = hit
        return hit

    def _entity_k(self, layer: int, device, dtype):
        key = ("entity", layer, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = [k.to(device, dtype) for k in self.entity_k[layer]]
        return hit

    def merged_term(self, layer: int, q: torch.Tensor, text_out: torch.Tensor, extra_options: dict,
                    attention_fn, backend: str) -> Optional[torch.Tensor]:
        """The merged image term of this call, (B, Lq, C), to add to O_text before to_out."""
        sw = self.site_weights[layer]
        if sw.weight == 0:
            return None
        heads = extra_options["n_heads"]
        cond_or_uncond = tuple(extra_options["cond_or_uncond"])
        batch = q.shape[0]
        rows = self.batch_index(cond_or_uncond, batch, q.device)
        terms = []
        for k, v in self._object_kv(layer, q.device, q.dtype):
            ctx = ImageContext(k=k, v=v, weight=sw.weight, batch_index=rows)
            terms.append(decoupled_attention(q, None, None, [ctx], heads, "blc", backend, attention_fn))
        if self.routing == "masks":
            lh, lw = extra_options["original_shape"][2:]
            key = ("object_masks", lh, lw, q.shape[1], q.device)
            grid = self._cache.get(key)
            if grid is None:  # once per run and layer resolution
                grid = self._cache[key] = mask_to_tokens(self.object_masks.to(q.device), lh, lw, q.shape[1])
            return mask_routed_merge(terms, [g[None] for g in grid], self.object_weights)
        maps = [entity_attention_map(q, k.index_select(0, rows), heads) for k in self._entity_k(layer, q.device, q.dtype)]
        if self.gated:
            gate = self.weights.gate_logits(layer, text_out)
            return mip_merge(terms, maps, gate.to(q.device), self.object_weights)
        return attention_routed_merge(terms, maps, self.object_weights)


# ---------------------------------------------------------------------------------------------
# Entity words


def _ids(tokens: dict) -> list[int]:
    """Token ids of the first tokenizer of a host CLIP tokenization ({"l": [[(id, weight), ...]], ...})."""
    name = "l" if "l" in tokens else next(iter(tokens))
    return [int(t[0]) for chunk in tokens[name] for t in chunk]


def _word_ids(clip, word: str) -> list[int]:
    """The word's token ids: after the start token, up to CLIP's end-of-text token."""
    out = []
    for t in _ids(clip.tokenize(word))[1:]:
        if t == _END_OF_TEXT:
            break
        out.append(t)
    return out


def entity_rows(clip, words: Sequence[str], prompt: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per word: (positive rows, negative rows) of the text encoding, each (count, width): the word
    encoded on its own and the empty prompt, rows 1..count (MIP-Adapter's convention). Raises when a
    word is not in the prompt."""
    prompt_ids = _ids(clip.tokenize(prompt))
    empty = clip.encode_from_tokens(clip.tokenize(""))
    out = []
    for word in words:
        ids = _word_ids(clip, word)
        if not ids:
            raise ValueError(f"the entity word {word!r} has no tokens; name each reference by a word of the prompt")
        n = len(ids)
        if not any(prompt_ids[i:i + n] == ids for i in range(len(prompt_ids) - n + 1)):
            raise ValueError(f"the entity word {word!r} is not in the prompt {prompt!r}; each reference is named by a "
                             "word of the prompt (it routes the reference to where that word is drawn)")
        cond = clip.encode_from_tokens(clip.tokenize(word))
        out.append((cond[0, 1:1 + n].float(), empty[0, 1:1 + n].float()))
    return out


def split_words(text: str) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]
