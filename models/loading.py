"""Reading adapter files without trusting them.

An adapter arrives either as safetensors (flat keys such as ``ip_adapter.1.to_k_ip.weight``)
or as a torch pickle (usually nested: ``{"image_proj": {...}, "ip_adapter": {...}}``).
Both end up in the same grouped form, ``{group: {key: tensor}}``, so that detection and
loading never care which container a file used."""
from __future__ import annotations

import os
import pickle
import re
import struct
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "AdapterFormatError",
    "load_adapter_state",
    "group_state",
    "flatten_state",
    "GROUP_ALIASES",
]


class AdapterFormatError(ValueError):
    """The file is not an adapter this pack can use; the message says what was found and
    what was expected, phrased for the person who picked the file."""


# Training scripts of the original project saved the per-layer weights under
# `adapter_modules`; the published files renamed them `ip_adapter`. Both mean the same.
GROUP_ALIASES = {"adapter_modules": "ip_adapter"}

_MAX_LISTED = 5


def _example_list(items, limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    if len(items) > limit:
        shown += f" (and {len(items) - limit} more)"
    return shown


def _looks_like_safetensors(path: str, size: int) -> bool:
    # safetensors starts with a little-endian u64 header length followed by a JSON object;
    # checking the bytes (not the extension) lets a misnamed file still load correctly.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= size


def _looks_like_torch_pickle(path: str) -> bool:
    # torch.save writes a zip archive; its legacy format and plain pickle.dump (protocol >= 2)
    # start with the PROTO opcode. Anything else is not a checkpoint, whatever the unpickler
    # would say about it.
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refusal_detail(message: str) -> str:
    # torch's own message recommends weights_only=False, which is exactly the advice we must
    # not pass on; keep only the line naming the object it refused.
    for line in message.splitlines():
        if re.search(r"unsupported|GLOBAL", line, re.IGNORECASE):
            return line.strip()
    return ""


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise AdapterFormatError(
            f"could not read {os.path.basename(path)!r} as safetensors ({e}); "
            "the file may be truncated or damaged — download it again"
        ) from e


def _read_pickle(path: str) -> Any:
    name = os.path.basename(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # The restricted unpickler signals a refused object with an UnpicklingError whose text
        # starts "Weights only load failed"; everything else (damaged archives, stray bytes)
        # surfaces as assorted low-level errors from the zip reader or the unpickler.
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            detail = _refusal_detail(str(e))
            raise AdapterFormatError(
                f"{name!r} is a pickle that contains non-tensor Python objects, so it was refused for "
                f"safety: loading it could run arbitrary code{' (' + detail + ')' if detail else ''}. "
                "Use a .safetensors version of this adapter instead (or convert it on a machine you trust)."
            ) from e
        raise AdapterFormatError(
            f"could not read {name!r} as a torch checkpoint or safetensors file "
            f"({type(e).__name__}: {e}); the file may be truncated or damaged"
        ) from e


def _flatten(obj: Mapping, prefix: str, out: dict[str, Any]) -> None:
    for key, value in obj.items():
        if not isinstance(key, str):
            raise AdapterFormatError(
                f"the file holds a dictionary key of type {type(key).__name__} ({key!r}) "
                "where an IP-Adapter has weight names"
            )
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, full + ".", out)
        else:
            out[full] = value


def group_state(flat: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Split dotted keys at their first component: ``image_proj.proj.weight`` ->
    ``{"image_proj": {"proj.weight": ...}}``. Keys without a dot land in group ``""``.
    Values that are not tensors raise AdapterFormatError naming them."""
    bad = [(k, type(v).__name__) for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterFormatError(
            "the file holds values that are not tensors: "
            + ", ".join(f"{k!r} ({t})" for k, t in bad[:_MAX_LISTED])
            + (f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else "")
            + "; an IP-Adapter file holds only weight tensors"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        head, dot, rest = key.partition(".")
        if not dot:
            head, rest = "", key
        head = GROUP_ALIASES.get(head, head)
        group = groups.setdefault(head, {})
        if rest in group:
            raise AdapterFormatError(f"the weight {key!r} appears twice (under two group names)")
        group[rest] = value
    return groups


def flatten_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of group_state: nested or grouped dicts to flat dotted keys."""
    out: dict[str, Any] = {}
    _flatten(state, "", out)
    return out


def load_adapter_state(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read an adapter file into ``{"image_proj": {...}, "ip_adapter": {...}, ...}``.

    Safetensors files are read directly; pickles only through torch's weights-only
    unpickler (weights_only=True), so a pickle that would construct arbitrary objects is refused
    (AdapterFormatError) instead of executed. Any other top-level groups in the file are
    returned too, so that detection can say what the file really is."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size == 0:
        raise AdapterFormatError(f"{name!r} is empty (0 bytes); the download probably failed")
    ext = os.path.splitext(path)[1].lower()

    if _looks_like_safetensors(path, size):
        raw: Any = _read_safetensors(path)
    elif ext == ".safetensors":
        raise AdapterFormatError(
            f"{name!r} is named .safetensors but does not start with a safetensors header; "
            "it is damaged, truncated, or a different kind of file renamed"
        )
    elif _looks_like_torch_pickle(path):
        raw = _read_pickle(path)
    else:
        raise AdapterFormatError(
            f"{name!r} is neither a safetensors file nor a torch checkpoint (unrecognised first bytes); "
            "it is damaged, truncated, or a different kind of file"
        )

    if not isinstance(raw, Mapping):
        raise AdapterFormatError(
            f"{name!r} holds a {type(raw).__name__}, not a dictionary of weights; "
            "an IP-Adapter file is a dictionary with 'image_proj' and 'ip_adapter' weights"
        )
    if not raw:
        raise AdapterFormatError(f"{name!r} holds no weights at all")
    return group_state(flatten_state(raw))
