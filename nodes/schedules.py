"""Per-layer weights of one applied adapter: the weight types users know from
ComfyUI_IPAdapter_plus, resolved once at apply time into a weight (and a token swap
flag) for every cross-attention site, so nothing is decided inside the sampling loop.

Layer indices in the tables below are *transformer indices*: the order in which the
UNet runs its SpatialTransformers (input blocks, middle, output blocks), 16 of them in
SD1.5 and 11 in SDXL. That is what the established implementation keys its tables on,
so the same numbers give the same pictures."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
    "custom",
)

EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")

# SDXL-shaped UNets have 11 transformers, SD1.5-shaped ones 16.
_SDXL_TRANSFORMERS = 11


@dataclass(frozen=True)
class Site:
    """One cross-attention layer of the host model, in checkpoint order."""
    key: tuple              # the host's attn2 patch key, e.g. ("input", 4, 1)
    block: str              # "input" | "middle" | "output"
    transformer_index: int  # order of its SpatialTransformer in the forward pass
    width: int              # inner width of attn2 (heads * head dim)
    context_dim: int        # in-features of attn2.to_k
    heads: int


@dataclass(frozen=True)
class SiteWeight:
    weight: float
    swap: bool = False  # positive tokens moved to the negative rows, positives zeroed


def _table(weight_type: str, w: float, wc: float, sdxl: bool) -> dict[int, float] | None:
    if weight_type == "style transfer":
        return {6: w} if sdxl else {i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
    if weight_type == "composition":
        return {3: w} if sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong style transfer":
        idx = (0, 1, 2, 4, 5, 6, 7, 8, 9, 10) if sdxl else (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        return {i: w for i in idx}
    if weight_type in ("style and composition", "style transfer precise"):
        if weight_type == "style transfer precise":
            wc = w
        if sdxl:
            return {3: wc, 6: w}
        t = {i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
        t.update({4: wc * 0.25, 5: wc})
        return t
    if weight_type == "composition precise":
        if sdxl:
            t = {i: w * 0.1 for i in range(11)}
            t.update({3: w, 6: w})
            return t
        t = {i: w for i in range(16)}
        t.update({4: w * 0.25, 5: w})
        t.update({i: w * 0.1 for i in (6, 7, 8)})
        return t
    return None


# Factor of layer t of n for the depth ramps (the established pack's formulas).
_RAMPS = {
    "ease in": lambda t, n: 0.05 + 0.95 * (1 - t / n),
    "ease out": lambda t, n: 0.05 + 0.95 * (t / n),
    "ease in-out": lambda t, n: 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)),
    "reverse in-out": lambda t, n: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2)),
}


def parse_layer_weights(text: str, n_transformers: int) -> dict[int, float]:
    """'0:1.0, 6:0.5' (transformer index: factor) or a plain list '1.0, 0.5, ...'."""
    text = (text or "").strip()
    if not text:
        raise ValueError(
            "weight_type 'custom' needs layer_weights, e.g. '0:1.0, 3:0.5' (transformer index: factor)"
        )
    parts = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    out: dict[int, float] = {}
    try:
        if all(":" in p for p in parts):
            for p in parts:
                i, f = p.split(":", 1)
                out[int(i)] = float(f)
        elif not any(":" in p for p in parts):
            out = {i: float(f) for i, f in enumerate(parts)}
        else:
            raise ValueError("mixed")
    except ValueError:
        raise ValueError(
            f"layer_weights {text!r} is not understood: write 'index:factor' pairs separated by commas "
            f"(e.g. '0:1.0, 6:0.5') or {n_transformers} comma-separated factors"
        ) from None
    if not all(math.isfinite(f) for f in out.values()):
        raise ValueError(f"layer_weights {text!r} holds a factor that is not a finite number (NaN or inf)")
    bad = sorted(i for i in out if not 0 <= i < n_transformers)
    if bad:
        raise ValueError(
            f"layer_weights names transformer indices {bad}, but this model has {n_transformers} "
            f"cross-attention transformers (valid indices 0..{n_transformers - 1})"
        )
    return out


def resolve_site_weights(
    sites: Sequence[Site],
    weight_type: str,
    weight: float,
    weight_composition: float = 1.0,
    layer_weights: str = "",
) -> list[SiteWeight]:
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight_type {weight_type!r}; choose one of: {', '.join(WEIGHT_TYPES)}")
    n = 1 + max(s.transformer_index for s in sites)
    sdxl = n == _SDXL_TRANSFORMERS

    table = _table(weight_type, weight, weight_composition, sdxl)
    if layer_weights and layer_weights.strip():
        table = {i: f * weight for i, f in parse_layer_weights(layer_weights, n).items()}
    elif weight_type == "custom":
        parse_layer_weights(layer_weights, n)  # raises with the format to use

    # Layers the "precise" types feed through the negative rows instead (the composition
    # layers for style, every other layer for composition).
    comp_layers = {3} if sdxl else {4, 5}

    out = []
    for s in sites:
        t = s.transformer_index
        w = weight
        swap = False
        if table is not None:
            w = table.get(t, 0.0)
            if weight_type == "style transfer precise":
                swap = t in comp_layers
            elif weight_type == "composition precise":
                swap = t not in comp_layers
        elif weight_type in _RAMPS:
            w = weight * _RAMPS[weight_type](t, n)
        elif weight_type == "weak input" and s.block == "input":
            w = weight * 0.2
        elif weight_type == "weak middle" and s.block == "middle":
            w = weight * 0.2
        elif weight_type == "weak output" and s.block == "output":
            w = weight * 0.2
        elif weight_type == "strong middle" and s.block in ("input", "output"):
            w = weight * 0.2
        out.append(SiteWeight(float(w), swap))
    return out


# ---------------------------------------------------------------------------------------
# DiTs
#
# A DiT has no input/middle/output blocks and no layers tuned for style or composition, so
# only the weight types that are shapes over depth carry over: the ramps run over the
# blocks in forward order (double blocks, then single blocks), and "weak input / middle /
# output" and "strong middle" act on the first, middle and last third of that order. The
# style and composition types name SD1.5/SDXL transformer indices; nothing comparable has
# been established for Flux or SD3, so they are refused rather than guessed.
DIT_WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                    "weak middle", "strong middle", "custom")

_DIT_BLOCK_PREFIX = {"double": "d", "joint": "d", "single": "s"}


def parse_dit_layer_weights(text: str, blocks: Sequence[Site]) -> dict[int, float]:
    """'d0:1.0, s3:0.5' (double/joint or single block index: factor), 'i:f' pairs with i the
    block's place in forward order, or one factor per block in forward order. Returns
    forward-order index -> factor."""
    text = (text or "").strip()
    names = {f"{_DIT_BLOCK_PREFIX[s.block]}{s.key[1]}": s.transformer_index for s in blocks}
    n = len(blocks)
    example = "'d0:1.0, d5:0.5, s10:0.0'"
    if not text:
        raise ValueError(f"weight_type 'custom' needs layer_weights, e.g. {example} (d = double block, s = single block)")
    parts = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    out: dict[int, float] = {}
    try:
        if all(":" in p for p in parts):
            for p in parts:
                name, f = (x.strip() for x in p.split(":", 1))
                if name.lower() in names:
                    out[names[name.lower()]] = float(f)
                elif name.isdigit() and int(name) < n:
                    out[int(name)] = float(f)
                else:
                    valid = ", ".join(sorted({f"{_DIT_BLOCK_PREFIX[s.block]}0..{_DIT_BLOCK_PREFIX[s.block]}"
                                              f"{max(b.key[1] for b in blocks if b.block == s.block)}"
                                              for s in blocks}))
                    raise KeyError(f"layer_weights names block {name!r}, which this model does not have "
                                   f"(it has {valid}, or forward-order indices 0..{n - 1})")
        elif not any(":" in p for p in parts):
            factors = [float(f) for f in parts]
            if len(factors) > n:
                raise KeyError(f"layer_weights lists {len(factors)} factors but this model has {n} blocks")
            out = dict(enumerate(factors))
        else:
            raise ValueError("mixed")
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    except ValueError:
        raise ValueError(f"layer_weights {text!r} is not understood: write 'block:factor' pairs separated by commas "
                         f"(e.g. {example}) or up to {n} comma-separated factors, one per block") from None
    if not all(math.isfinite(f) for f in out.values()):
        raise ValueError(f"layer_weights {text!r} holds a factor that is not a finite number (NaN or inf)")
    return out


def resolve_dit_weights(layer_sites: Sequence[Site], blocks: Sequence[Site], weight_type: str, weight: float,
                        layer_weights: str = "") -> list[SiteWeight]:
    """One SiteWeight per adapter layer (layer_sites: the block each layer sits on; blocks:
    every block of the model, in forward order)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight_type {weight_type!r}; choose one of: {', '.join(WEIGHT_TYPES)}")
    if weight_type not in DIT_WEIGHT_TYPES:
        raise ValueError(
            f"weight_type {weight_type!r} selects SD1.5/SDXL UNet layers and has no meaning on a DiT; "
            f"on Flux, Chroma and SD3 use one of: {', '.join(DIT_WEIGHT_TYPES)}")
    n = len(blocks)
    custom = None
    if (layer_weights and layer_weights.strip()) or weight_type == "custom":
        custom = parse_dit_layer_weights(layer_weights, blocks)
    out = []
    for s in layer_sites:
        t = s.transformer_index
        third = 3 * t // n  # 0, 1, 2: first, middle, last third of the blocks
        w = weight
        if custom is not None:
            w = weight * custom.get(t, 0.0)
        elif weight_type in _RAMPS:
            w = weight * _RAMPS[weight_type](t, n)
        elif (weight_type, third) in (("weak input", 0), ("weak middle", 1), ("weak output", 2),
                                      ("strong middle", 0), ("strong middle", 2)):
            w = weight * 0.2
        out.append(SiteWeight(float(w)))
    return out
