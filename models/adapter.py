"""An adapter checkpoint as one plain torch module.

The host keeps adapter weights in a ModelPatcher, which moves a module between devices
and dtypes with the model; so everything lives in parameters of one nn.Module, whose
state dict has exactly the checkpoint's flat key names."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .families import AdapterSpec, _as_groups, detect_family
from .loading import AdapterFormatError, _example_list, load_adapter_state, read_safetensors_header
from .projections import build_projection

if TYPE_CHECKING:
    from .dit_adapter import DiTAdapterWeights

__all__ = ["IPAdapterWeights", "load_adapter_file"]


class _LoRA(nn.Module):
    """One low-rank update W += up @ down of the host's own attention weights (FaceID):
    `down` (r, in) and `up` (out, r), without bias, named as in the checkpoint."""

    def __init__(self, fan_in: int, fan_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(fan_in, rank, bias=False)
        self.up = nn.Linear(rank, fan_out, bias=False)


def _add_lora(module: nn.Module, width: int, kv_in: int, rank: int) -> None:
    module.to_q_lora = _LoRA(width, width, rank)
    module.to_k_lora = _LoRA(kv_in, width, rank)
    module.to_v_lora = _LoRA(kv_in, width, rank)
    module.to_out_lora = _LoRA(width, width, rank)


class _SelfAttentionLoRA(nn.Module):
    """The LoRA of one self-attention (attn1) processor, an even `ip_adapter.N` of a FaceID checkpoint."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        _add_lora(self, width, width, rank)


class _LayerKV(nn.Module):
    """The K/V projections of one cross-attention layer (names as in the checkpoint), for
    MIP-Adapter its gate `text_to_weight` (Linear(width, 1, bias=False)), and for FaceID the
    LoRA of the layer's own q/k/v/out projections."""

    def __init__(self, context_dim: int, width: int, gate: bool = False, lora_rank: Optional[int] = None):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)
        if gate:
            self.text_to_weight = nn.Linear(width, 1, bias=False)
        if lora_rank:
            _add_lora(self, width, context_dim, lora_rank)


def _check_finite(flat: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite weights: they would turn every image black many steps later.
    One tensor at a time, so the check never holds more than one tensor's mask."""
    bad = []
    for key, t in flat.items():
        if t.is_meta or not t.is_floating_point():
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nans = int(torch.isnan(t).sum())
            bad.append(f"{key!r} ({nans} NaN, {int((~finite).sum()) - nans} infinite)")
    if bad:
        raise AdapterFormatError(
            f"weights {', '.join(bad[:3])}{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''} hold NaN or "
            "infinite values; the file is damaged "
            "(or was saved from a diverged training run) — download it again")


def adopt_state(module: nn.Module, flat: Mapping[str, torch.Tensor], family: str) -> nn.Module:
    """Load `flat` into a module built on the meta device, strictly, after the NaN/inf check;
    the checkpoint tensors become the parameters (no second copy). Files that mix float dtypes
    are brought to float32 so the projection runs in one dtype."""
    own = module.state_dict()
    missing = [k for k in own if k not in flat]
    unexpected = [k for k in flat if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_example_list(missing, 4)}")
        if unexpected:
            parts.append(f"unexpected keys {_example_list(unexpected, 4)}")
        raise AdapterFormatError(f"cannot load this {family}: " + "; ".join(parts))

    _check_finite(flat)
    dtypes = {t.dtype for t in flat.values()}
    target = dtypes.pop() if len(dtypes) == 1 else torch.float32
    # assign=True adopts these tensors as the parameters; they must be contiguous for
    # the host's device moves, and .to/.contiguous copy only when something changes.
    flat = {k: t.to(dtype=target).contiguous() for k, t in flat.items()}
    try:
        module.load_state_dict(flat, strict=True, assign=True)
    except RuntimeError as e:  # shapes were checked by detection; this is a last guard
        raise AdapterFormatError(f"cannot load this {family}: {e}") from e
    return module.requires_grad_(False)


class IPAdapterWeights(nn.Module):
    """Projection network + per-layer K/V weights of one adapter.

    Layer i is the checkpoint's ``ip_adapter.{2i+1}.*``, i.e. the i-th cross-attention
    layer in the original processor order (down, up, mid)."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.image_proj = build_projection(spec)
        lora = set(spec.lora.processors) if spec.lora else set()
        rank = spec.lora.rank if spec.lora else None
        layers: dict[str, nn.Module] = {}
        for i, w in enumerate(spec.layer_dims):
            if 2 * i in lora:
                layers[str(2 * i)] = _SelfAttentionLoRA(w, rank)
            layers[str(2 * i + 1)] = _LayerKV(spec.context_dim, w, spec.mip_gate, rank if 2 * i + 1 in lora else None)
        self.ip_adapter = nn.ModuleDict(layers)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "IPAdapterWeights":
        """Detect the family of `state` (grouped or flat) and load it strictly.

        The checkpoint tensors become the parameters (no second copy). Files that mix
        float dtypes are brought to float32 so the projection runs in one dtype."""
        groups = _as_groups(state)
        spec = detect_family(groups)
        if spec.architecture != "unet":
            raise AdapterFormatError(f"this is a {spec.family_name}; load it with DiTAdapterWeights.from_state "
                                     "(load_adapter_file picks the right class)")
        flat = {f"{g}.{k}": t for g, sub in groups.items() for k, t in sub.items()}

        # Built on the meta device: the real storage comes from the checkpoint via assign.
        with torch.device("meta"):
            module = cls(spec)
        return adopt_state(module, flat, spec.family_name)

    # -- use ----------------------------------------------------------------------------

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def image_tokens(self, embeds: torch.Tensor, clip_hidden: Optional[torch.Tensor] = None,
                     shortcut_scale: Optional[float] = None) -> torch.Tensor:
        """Encoder output -> (N, T, C) image tokens, computed in the module's device/dtype.

        base layouts take image_embeds (N, E); plus and full-face take hidden states
        (N, L, E). A missing batch dim is added. Face families (spec.face) take face embeddings
        (N, 512), normed or raw as the caller decided; FaceID Plus also the CLIP hidden states of the
        face crops (N, L, W) in `clip_hidden`, and `shortcut_scale` switches on the V2 shortcut
        (x + s * out; None: V1). Kolors FaceID-Plus always uses the shortcut (None means 1.0, its
        pipeline's default) and gives tokens of width spec.face.token_width: see context_tokens."""
        spec = self.spec
        if spec.face is not None:
            return self._face_tokens(embeds, clip_hidden, shortcut_scale)
        if clip_hidden is not None or shortcut_scale is not None:
            raise ValueError(f"this {spec.family_name} reads one encoder output; clip_hidden and shortcut_scale "
                             "belong to the FaceID Plus family")
        want = 2 if spec.encoder_input == "image_embeds" else 3
        if embeds.dim() == want - 1:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() != want or embeds.shape[-1] != spec.encoder_width:
            shape = "(N, E)" if want == 2 else "(N, tokens, E)"
            raise ValueError(
                f"this adapter expects {spec.encoder_name} {spec.encoder_input} of shape {shape} with "
                f"E = {spec.encoder_width}, got a tensor of shape {tuple(embeds.shape)}"
            )
        p = self._param()
        return self.image_proj(embeds.to(device=p.device, dtype=p.dtype))

    def _face_tokens(self, embeds: torch.Tensor, clip_hidden: Optional[torch.Tensor],
                     shortcut_scale: Optional[float]) -> torch.Tensor:
        spec, face = self.spec, self.spec.face
        e = face.embedding_width
        if embeds.dim() == 1:
            embeds = embeds.unsqueeze(0)
        # the face-embedding resampler reads a sequence: one embedding per image is a 1-token sequence
        ok_dims = (2, 3) if spec.layout == "plus" else (2,)
        if embeds.dim() not in ok_dims or embeds.shape[-1] != e:
            raise ValueError(f"this {spec.family_name} reads InsightFace face embeddings of shape (N, {e}), got a "
                             f"tensor of shape {tuple(embeds.shape)}")
        p = self._param()
        embeds = embeds.to(device=p.device, dtype=p.dtype)
        if not face.uses_clip:
            if clip_hidden is not None or shortcut_scale is not None:
                raise ValueError(f"this {spec.family_name} reads the face embedding alone; clip_hidden and "
                                 "shortcut_scale belong to the FaceID Plus family")
            if spec.layout == "plus":
                return self.image_proj(embeds if embeds.dim() == 3 else embeds.unsqueeze(1))
            return self.image_proj(embeds)
        if clip_hidden is None:
            raise ValueError(f"this {spec.family_name} also reads the {spec.encoder_name} penultimate hidden states "
                             f"of the face crops (clip_hidden, shape (N, L, {spec.encoder_width}))")
        if clip_hidden.dim() == 2:
            clip_hidden = clip_hidden.unsqueeze(0)
        n, m = embeds.shape[0], clip_hidden.shape[0]
        if clip_hidden.dim() != 3 or clip_hidden.shape[-1] != spec.encoder_width or (n != m and 1 not in (n, m)):
            raise ValueError(f"this {spec.family_name} reads {spec.encoder_name} hidden states of shape "
                             f"({n}, L, {spec.encoder_width}) beside {n} face embeddings, got clip_hidden of shape "
                             f"{tuple(clip_hidden.shape)}")
        if face.shortcut == "always" and shortcut_scale is None:
            shortcut_scale = 1.0
        elif face.shortcut == "none" and shortcut_scale is not None:
            raise ValueError(f"this {spec.family_name} has no shortcut")
        return self.image_proj(embeds, clip_hidden.to(device=p.device, dtype=p.dtype),
                               None if shortcut_scale is None else float(shortcut_scale))

    def context_tokens(self, tokens: torch.Tensor, encoder_hid_proj=None) -> torch.Tensor:
        """Tokens as the layers' to_k_ip / to_v_ip read them. Kolors FaceID-Plus makes 4096-wide tokens
        that pass the Kolors UNet's own encoder_hid_proj (Linear 4096 -> 2048, with bias; an nn.Linear or a
        (weight, bias) pair) first, as its text does; every other family's tokens are returned as they are."""
        face = self.spec.face
        if face is None or face.token_width == self.spec.context_dim:
            return tokens
        if encoder_hid_proj is None:
            raise ValueError(f"this {self.spec.family_name} makes {face.token_width}-wide tokens that pass the UNet's "
                             f"encoder_hid_proj ({face.token_width} -> {self.spec.context_dim}); the model has none "
                             "(use a Kolors UNet)")
        weight, bias = (encoder_hid_proj.weight, encoder_hid_proj.bias) if isinstance(encoder_hid_proj, nn.Module) \
            else encoder_hid_proj
        if tuple(weight.shape) != (self.spec.context_dim, face.token_width):
            raise ValueError(f"the UNet's encoder_hid_proj maps {weight.shape[1]} -> {weight.shape[0]}, but this "
                             f"{self.spec.family_name} needs {face.token_width} -> {self.spec.context_dim}")
        tokens = tokens.to(device=weight.device, dtype=weight.dtype)
        return F.linear(tokens, weight, None if bias is None else bias.to(weight.dtype))

    def lora_weights(self) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The FaceID LoRA: processor N -> {"q", "k", "v", "out"} -> (down (r, in), up (out, r)); N even is
        attn1 and N odd attn2 of transformer block N // 2 (processor order). Empty without LoRA."""
        if self.spec.lora is None:
            return {}
        out = {}
        for n in self.spec.lora.processors:
            module = self.ip_adapter[str(n)]
            out[n] = {p: (getattr(module, f"to_{p}_lora").down.weight, getattr(module, f"to_{p}_lora").up.weight)
                      for p in ("q", "k", "v", "out")}
        return out

    def _layer(self, i: int) -> _LayerKV:
        if not 0 <= i < self.spec.num_layers:
            raise IndexError(f"layer {i} out of range: this adapter has {self.spec.num_layers} layers")
        return self.ip_adapter[str(2 * i + 1)]

    def _check_tokens(self, tokens: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens.shape[-1] != self.spec.context_dim:
            face = self.spec.face
            hint = ("; pass them through context_tokens() with the UNet's encoder_hid_proj first"
                    if face is not None and face.token_width == tokens.shape[-1] else "")
            raise ValueError(
                f"image tokens have width {tokens.shape[-1]}, but this adapter's layers read "
                f"width {self.spec.context_dim}{hint}"
            )
        p = self._param() if like is None else like
        return tokens.to(device=p.device, dtype=p.dtype)

    def layer_kv(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer i for tokens (B, T, C): two (B, T, layer_dims[i]) tensors."""
        layer = self._layer(i)
        # the layer's own weight decides: a partially loaded model may hold layers on two devices
        tokens = self._check_tokens(tokens, layer.to_k_ip.weight)
        return F.linear(tokens, layer.to_k_ip.weight), F.linear(tokens, layer.to_v_ip.weight)

    @property
    def has_gate(self) -> bool:
        """True for MIP-Adapter checkpoints (per-layer text_to_weight gates)."""
        return self.spec.mip_gate

    def gate_logits(self, i: int, text_out: torch.Tensor) -> torch.Tensor:
        """MIP-Adapter gate logits of layer i: text_to_weight(text_out), shape (B, Lq, 1).

        text_out is the layer's text attention output before its output projection, i.e.
        softmax(q K_text^T / sqrt(d)) V_text with the heads joined: (B, Lq, layer_dims[i]).
        The merge (attention/merge.py) takes sigmoid and the mean over positions; this returns
        the raw logits in the gate's dtype, on the gate's device."""
        if not self.spec.mip_gate:
            raise ValueError(f"this {self.spec.family_name} has no text_to_weight gates; only MIP-Adapter "
                             "checkpoints do (use the ungated attention-routed merge instead)")
        layer = self._layer(i)
        w = layer.text_to_weight.weight
        if text_out.dim() != 3 or text_out.shape[-1] != w.shape[1]:
            raise ValueError(f"layer {i}'s gate reads (B, Lq, {w.shape[1]}) text attention outputs, "
                             f"got shape {tuple(text_out.shape)}")
        return F.linear(text_out.to(device=w.device, dtype=w.dtype), w)

    def all_layer_kv(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V for every layer, in layer order.

        One matmul per weight, with the tokens cast once: with a handful of tokens this is
        bound by reading the weights, which each matmul does exactly once. Stacking equal-width
        layers into a single matmul would first have to copy those weights (hundreds of MB for
        SDXL), costing more than the launches it saves."""
        tokens = self._check_tokens(tokens)
        out = []
        for i in range(self.spec.num_layers):
            layer = self.ip_adapter[str(2 * i + 1)]
            out.append((F.linear(tokens, layer.to_k_ip.weight), F.linear(tokens, layer.to_v_ip.weight)))
        return out

    def extra_repr(self) -> str:
        return self.spec.describe()


def _header_state(path: str) -> Optional[dict[str, torch.Tensor]]:
    """The file's tensors as meta tensors (names, shapes, dtypes, no data), for safetensors."""
    header = read_safetensors_header(path)
    if header is None:
        return None
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in header.items()}


def load_adapter_file(path: str | os.PathLike) -> "IPAdapterWeights | DiTAdapterWeights":
    """Read, detect and build: the one call the node layer needs.

    A safetensors file is first judged from its header alone (keys, shapes, dtypes), so a
    multi-gigabyte UNet or LoRA put in the adapter folder is refused before its data is read.
    Every AdapterFormatError starts with the file's name. DiT adapters (Flux XLabs / InstantX, SD3.5
    InstantX) come back as DiTAdapterWeights, UNet adapters as IPAdapterWeights."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        preview = _header_state(path) if os.path.isfile(path) else None
    except AdapterFormatError:
        preview = None  # load_adapter_state reports the damaged header
    if preview is not None:
        try:
            detect_family(preview)
        except AdapterFormatError as e:
            raise AdapterFormatError(f"{name}: {e}") from e
    state = load_adapter_state(path)
    from .dit_adapter import DiTAdapterWeights  # that module builds on this one
    from .dit_families import dit_family_of

    weights_cls = DiTAdapterWeights if dit_family_of(state) else IPAdapterWeights
    try:
        return weights_cls.from_state(state)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{name}: {e}") from e
