"""The DiT binder: image prompts on Flux, Chroma and SD3 blocks through public patch points.

Per block key, one `DitBlockPatch` sits in `patches_replace["dit"]`. When the host calls it,
it calls the block through `original_block` with a copy of `transformer_options` whose
`optimized_attention_override` is a small closure: it lets the block's own attention run
(through any override that was already there), then adds the image terms to the attention
output, or keeps them for the block's output, as the adapter family prescribes. Nothing of
the host's block code is copied, no module is swapped and the shared model is never changed.

Facts this relies on (host 0.3.64, checked by the host tests):
- the host attention called inside a Flux/Chroma block gets q/k/v as (B, H, L, D) after RoPE,
  text rows first, then image rows (then reference-latent rows for Kontext); SD3 joint blocks
  pass (B, L, H*D), context rows first, no RoPE;
- the block's output rows follow the same order;
- no DiT tells a block replacement which step, latent size or text length it runs for: an
  APPLY_MODEL wrapper (`apply_model_wrapper`) puts them into the options of each model call.

The adapters read the image-stream query before RoPE. Flux's RoPE is a rotation of each pair
of channels, so the query is recovered by rotating back with the same angles (`unrotate`):
two multiply-adds per element, where recomputing it would cost a second QKV projection of
the block (hidden x 3*hidden per token)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from ..attention import ImageContext, decoupled_attention, mask_to_patch_tokens, pack_image_contexts, patch_grid
from .patch import _step_sigma
from .prompt import ImagePrompt

RUN_KEY = "ipadapter_fused"


@dataclass
class ModelCall:
    """What the APPLY_MODEL wrapper learns about one model call, for the block patches."""
    latent_hw: tuple[int, int]
    timestep: Optional[float]   # the model's own time input (SD3: sigma * 1000)
    txt_len: Optional[int]      # text tokens (Flux single blocks see text and image rows joined)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    """APPLY_MODEL wrapper: tells the block patches the latent size, the step's timestep and
    the text length of this call, in a copy of the options (the caller's dict is untouched)."""
    options = dict(transformer_options or {})
    timestep = None
    sampling = getattr(executor.class_obj, "model_sampling", None)
    if sampling is not None and torch.is_tensor(t) and t.numel():
        timestep = float(sampling.timestep(t.reshape(-1)[:1]).reshape(-1)[0])
    txt_len = int(c_crossattn.shape[1]) if torch.is_tensor(c_crossattn) and c_crossattn.dim() == 3 else None
    options[RUN_KEY] = ModelCall((int(x.shape[-2]), int(x.shape[-1])), timestep, txt_len)
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def unrotate(q: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Undo Flux's RoPE on q (B, H, L, D): pe (B or 1, 1, L, D/2, 2, 2) holds one 2x2 rotation
    per channel pair; its transpose rotates back."""
    qp = q.to(pe.dtype).reshape(*q.shape[:-1], -1, 2)
    out = torch.stack([pe[..., 0, 0] * qp[..., 0] + pe[..., 1, 0] * qp[..., 1],
                       pe[..., 0, 1] * qp[..., 0] + pe[..., 1, 1] * qp[..., 1]], dim=-1)
    return out.reshape(q.shape).to(q.dtype)


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)"""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class _Call:
    """One call of one patched block: the options, rows and prompts it works with."""

    def __init__(self, patch: "DitBlockPatch", args: dict, active):
        self.patch = patch
        self.args = args
        self.active = active  # ((prompt, layer), ...)
        self.options = args.get("transformer_options") or {}
        self.info: Optional[ModelCall] = self.options.get(RUN_KEY)
        if self.info is None:
            raise RuntimeError("IPAdapter Fused: a DiT block patch ran without its model wrapper; apply the "
                               "adapter with this pack's apply node (the patched model was changed by hand)")
        if "txt" in args and torch.is_tensor(args["txt"]):
            self.info.txt_len = int(args["txt"].shape[1])
        self.cond_or_uncond = tuple(self.options.get("cond_or_uncond") or (0,))
        self.grid = patch_grid(*self.info.latent_hw, patch.patch_size)
        self.n_img = self.grid[0] * self.grid[1]
        self.term = None
        self.seen = False

    @property
    def txt_len(self) -> int:
        if self.info.txt_len is None:
            raise RuntimeError("IPAdapter Fused: the text length of this call is unknown")
        return self.info.txt_len

    def contexts(self, q_rows: torch.Tensor, layout_heads: int, text_rows: int = 0):
        """Image contexts (bhld) of the active prompts for q_rows (B, H, Lq, D), whose first
        `text_rows` rows are text (not covered by masks: they keep the full term)."""
        batch, _, lq, _ = q_rows.shape
        step = self.info.timestep
        masked = any(p.mask is not None for p, _ in self.active)
        key = ("dit", self.patch.key, tuple(id(p) for p, _ in self.active), self.cond_or_uncond, batch, lq,
               text_rows, self.info.latent_hw if masked else None, q_rows.device, q_rows.dtype,
               tuple(p.cache_step(step) for p, _ in self.active))
        cache = self.active[0][0]._cache  # released with the run
        hit = cache.get(key)
        if hit is not None:
            return hit
        if any(p.per_step for p, _ in self.active):  # step-dependent packs: keep only this step's
            for old in [k for k in cache if k[:2] == ("dit", self.patch.key) and k[-1] != key[-1]]:
                del cache[old]

        to_tokens = self.mask_tokens(text_rows)
        contexts = []
        for prompt, layer in self.active:
            ctx = prompt.context(layer, batch, self.cond_or_uncond, q_rows.device, q_rows.dtype, to_tokens=to_tokens,
                                 step=step)
            if ctx is None:
                continue
            heads = layout_heads
            contexts.append(ImageContext(k=_heads_first(ctx.k, heads), v=_heads_first(ctx.v, heads),
                                         weight=ctx.weight, mask=ctx.mask, batch_index=ctx.batch_index))
        if not contexts:
            return None
        pack = cache[key] = pack_image_contexts(contexts, batch, layout_heads, "bhld", dtype=q_rows.dtype,
                                                device=q_rows.device)
        return pack

    def mask_tokens(self, text_rows: int = 0):
        """(M, H, W) mask -> (M, text_rows + image tokens): image rows on the patch grid; text rows,
        which no region covers, keep the whole term."""
        def to_tokens(mask):
            rows = mask_to_patch_tokens(mask, *self.info.latent_hw, self.patch.patch_size)
            return torch.cat([rows.new_ones(rows.shape[0], text_rows), rows], dim=1) if text_rows else rows
        return to_tokens

    def image_term(self, q_rows: torch.Tensor, heads: int, text_rows: int = 0) -> Optional[torch.Tensor]:
        """sum_j w_j m_j Attn(q_rows, K_j, V_j) as (B, Lq, H*D)."""
        contexts = self.contexts(q_rows, heads, text_rows)
        if contexts is None:
            return None
        out = decoupled_attention(q_rows, None, None, contexts, heads, "bhld", self.patch.backend)
        return _heads_last(out)

    # -- the override ------------------------------------------------------------------

    def override(self, previous):
        def attention_override(func, *args, **kwargs):
            out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            if self.seen:  # only the block's first (joint) attention; SD3.5M's second one is image-only
                return out
            self.seen = True
            q, k, v = args[:3]
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            if kwargs.get("skip_output_reshape"):
                raise RuntimeError("IPAdapter Fused: unexpected attention layout in a DiT block")
            return self.patch.injection.on_attention(self, q, k, v, heads, bool(kwargs.get("skip_reshape")), out)
        return attention_override


class Injection:
    """Where one adapter family puts its term. One subclass per family."""
    name = ""
    kinds: tuple[str, ...] = ()

    def on_attention(self, call: _Call, q, k, v, heads: int, bhld: bool, out: torch.Tensor) -> torch.Tensor:
        return out

    def after_block(self, call: _Call, out: dict) -> dict:
        return out


class XLabsInjection(Injection):
    """XLabs Flux IP-Adapter: Attn(image-stream q before RoPE, ip K, ip V), times the weight,
    added to the image stream after the double block (after its MLP)."""
    name = "xlabs"
    kinds = ("double",)

    def on_attention(self, call, q, k, v, heads, bhld, out):
        txt, n = call.txt_len, call.n_img
        pe = call.args["pe"]
        q_img = unrotate(q[:, :, txt:txt + n], pe[:, :, txt:txt + n])
        call.term = call.image_term(q_img, heads)
        return out

    def after_block(self, call, out):
        if call.term is not None:
            img = out["img"]
            n = call.n_img
            out = dict(out)
            out["img"] = torch.cat([img[:, :n] + call.term.to(img.dtype), img[:, n:]], dim=1)
        return out


class InstantXFluxInjection(Injection):
    """InstantX FLUX.1-dev-IP-Adapter: Attn(q before RoPE, ip K, ip V) times the weight, added to
    the attention output before the output projection: on the image rows in double blocks, on
    the text and image rows in single blocks (reference-latent rows are left as they are)."""
    name = "instantx-flux"
    kinds = ("double", "single")

    def on_attention(self, call, q, k, v, heads, bhld, out):
        txt, n = call.txt_len, call.n_img
        pe = call.args["pe"]
        single = call.patch.kind == "single"
        lo = 0 if single else txt
        hi = txt + n
        q_rows = unrotate(q[:, :, lo:hi], pe[:, :, lo:hi])
        term = call.image_term(q_rows, heads, text_rows=txt if single else 0)
        if term is None:
            return out
        return torch.cat([out[:, :lo], out[:, lo:hi] + term.to(out.dtype), out[:, hi:]], dim=1)


class InstantXSD3Injection(Injection):
    """InstantX SD3.5-Large IP-Adapter: the image-stream q attends over [image-stream K; ip K]
    and [image-stream V; ip V]; the result times the weight is added to the image rows of the
    attention output (before the block's post-attention projection).

    The adapter norms the block's raw q and k with its own RMSNorm gains (norm_q, norm_k);
    the host hands over q and k already normed with the block's ln_q / ln_k. Both are RMS
    norms over the head dim with the same eps, so the adapter's version is the host's times
    w_adapter / w_block per channel: exact, and no second QKV projection."""
    name = "instantx-sd3"
    kinds = ("joint",)

    def on_attention(self, call, q, k, v, heads, bhld, out):
        txt = call.txt_len
        if bhld:
            q, k, v = (_heads_last(x) for x in (q, k, v))
        q_img, k_img, v_img = (_heads_first(x[:, txt:], heads) for x in (q, k, v))
        batch = q_img.shape[0]
        ln_q, ln_k = call.patch.block_norms
        terms = None
        for prompt, layer in call.active:  # each adapter norms q/k with its own gains
            ctx = prompt.context(layer, batch, call.cond_or_uncond, q_img.device, q_img.dtype,
                                 to_tokens=call.mask_tokens(0), step=call.info.timestep)
            if ctx is None:
                continue
            norm_q, norm_k = _qk_gains(prompt.weights, layer)
            qa = _renorm(q_img, ln_q, norm_q)
            ka = _renorm(k_img, ln_k, norm_k)
            ik, iv = ctx.rows_for(batch)
            joined = ImageContext(k=torch.cat([ka, _heads_first(ik, heads).to(ka.dtype)], dim=2),
                                  v=torch.cat([v_img, _heads_first(iv, heads).to(v_img.dtype)], dim=2),
                                  weight=ctx.weight, mask=ctx.mask)
            term = decoupled_attention(qa, None, None, [joined], heads, "bhld", call.patch.backend)
            terms = term if terms is None else terms + term
        if terms is None:
            return out
        return torch.cat([out[:, :txt], out[:, txt:] + _heads_last(terms).to(out.dtype)], dim=1)


def _qk_gains(weights, layer: int):
    """The adapter layer's norm_q / norm_k RMSNorm gains."""
    module = weights.ip_adapter[str(layer)]
    return module.norm_q.weight, module.norm_k.weight


def _renorm(x: torch.Tensor, host_norm, gain: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) normed by the host's per-head norm -> the same rows RMS-normed with `gain`."""
    gain = gain.to(device=x.device, dtype=torch.float32)
    w = getattr(host_norm, "weight", None)
    if hasattr(host_norm, "eps") and hasattr(host_norm, "learnable_scale"):  # the host's RMSNorm
        scale = gain if w is None else gain / w.to(device=x.device, dtype=torch.float32)
        return (x.float() * scale).to(x.dtype)
    # no qk norm in the block (nn.Identity): x is raw
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * gain).to(x.dtype)


INJECTIONS = {cls.name: cls() for cls in (XLabsInjection, InstantXFluxInjection, InstantXSD3Injection)}


class DitBlockPatch:
    """The callable under patches_replace["dit"][key]: (args, {"original_block": f}) -> dict.

    entries: ((ImagePrompt, adapter layer), ...), all of one injection family per patch
    kind. previous: a dit replacement another pack had put on this key; it is called with
    this patch's block as its original_block, so both keep working."""

    def __init__(self, key: tuple, kind: str, patch_size: int, injection: str, entries: tuple = (),
                 previous=None, backend: str = "auto", block_norms: tuple = ()):
        self.block_norms = block_norms  # SD3: the block's (ln_q, ln_k) modules, read at call time
        self.key = key
        self.kind = kind
        self.patch_size = patch_size
        self.injection = INJECTIONS[injection]
        self.entries = tuple(sorted(entries, key=lambda e: e[0].order_key))
        self.previous = previous
        self.backend = backend

    def __deepcopy__(self, memo):
        return copy.copy(self)  # prompts (tensors) and a previous patch are shared

    def to(self, device):
        return self

    def with_entry(self, prompt: ImagePrompt, layer: int) -> "DitBlockPatch":
        return DitBlockPatch(self.key, self.kind, self.patch_size, self.injection.name,
                             self.entries + ((prompt, layer),), self.previous, self.backend, self.block_norms)

    def _block(self, original):
        def run(args):
            options = args.get("transformer_options") or {}
            sigma = _step_sigma.get(options.get("sigmas"))
            active = tuple((p, i) for p, i in self.entries if p.active(sigma) and p.site_weights[i].weight != 0)
            if not active:
                return original(args)
            call = _Call(self, args, active)
            patched = dict(options)
            patched["optimized_attention_override"] = call.override(options.get("optimized_attention_override"))
            # The DiTs of this host do not say which block runs; the copy does, for any attention
            # override of another pack that runs inside this block.
            patched.setdefault("block_type", self.key[0].split("_")[0])
            patched.setdefault("block_index", self.key[1])
            out = original({**args, "transformer_options": patched})
            return self.injection.after_block(call, out)
        return run

    def __call__(self, args, extra):
        block = self._block(extra["original_block"])
        if self.previous is not None:
            return self.previous(args, {**extra, "original_block": block})
        return block(args)


def install_dit(model_options: dict, model, spec, prompt: ImagePrompt, block_norms=None) -> dict:
    """New transformer_options with `prompt` on every block its adapter has a layer for.
    Copies what it changes; a foreign replacement found on a key becomes `previous`."""
    to = dict(model_options.get("transformer_options", {}))
    replace = dict(to.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for layer, key in enumerate(spec.layer_blocks):
        site = model.site(tuple(key))
        existing = dit.get(site.key)
        if isinstance(existing, DitBlockPatch) and existing.injection.name == spec.injection:
            dit[site.key] = existing.with_entry(prompt, layer)
        else:  # a foreign replacement, or this pack's patch of another family: chain it
            norms = block_norms(site.key) if block_norms is not None else ()
            dit[site.key] = DitBlockPatch(site.key, site.block, model.patch_size, spec.injection,
                                          ((prompt, layer),), previous=existing, block_norms=norms)
    replace["dit"] = dit
    to["patches_replace"] = replace
    return to


def dit_prompts(model_options: dict) -> list[ImagePrompt]:
    """The image prompts on a model's dit patches (for the run wrapper)."""
    dit = model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit") or {}
    found = {}
    for patch in dit.values():
        while isinstance(patch, DitBlockPatch):
            for p, _ in patch.entries:
                found[id(p)] = p
            patch = patch.previous
    return list(found.values())
