"""Reading adapter files without trusting them.

An adapter arrives either as safetensors (flat keys such as ``ip_adapter.1.to_k_ip.weight``)
or as a torch pickle (usually nested: ``{"image_proj": {...}, "ip_adapter": {...}}``).
Both end up in the same grouped form, ``{group: {key: tensor}}``, so that detection and
loading never care which container a file used."""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
import threading
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "AdapterFormatError",
    "load_adapter_state",
    "group_state",
    "flatten_state",
    "GROUP_ALIASES",
    "read_safetensors_header",
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


# A real adapter's header is a few kilobytes (a whole SDXL checkpoint's, ~200 KB); this is
# the safetensors library's own ceiling. Anything above it is refused before reading it.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> torch dtypes, for describing a file from its header alone.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


def _fail(name: str, problem: str) -> AdapterFormatError:
    # every message starts with the file's name: the person reading it picked that file
    return AdapterFormatError(f"{name}: {problem}")


def _safetensors_header_length(path: str, size: int) -> int | None:
    """The header length a safetensors file declares, checked against the file size before
    anything is read or allocated; None when the bytes do not look like safetensors."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n <= min(size, 8 + MAX_HEADER_BYTES):
        return n
    # torch checkpoints start with these bytes; a pickle or zip may have '{' at offset 8 by chance
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if n > MAX_HEADER_BYTES and 8 + n <= size:
        raise _fail(name, f"the safetensors header claims {n:,} bytes, more than any model's header "
                          f"({MAX_HEADER_BYTES:,}); the file is damaged or not a model")
    raise _fail(name, f"the safetensors header claims {n:,} bytes, but the whole file has only {size:,}; "
                      "the file is truncated or damaged — download it again")


def _looks_like_torch_pickle(path: str) -> bool:
    # torch.save writes a zip archive; its legacy format and plain pickle.dump (protocol >= 2)
    # start with the PROTO opcode. Anything else is not a checkpoint, whatever the unpickler
    # would say about it.
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refusal_detail(message: str) -> str:
    # torch's own message recommends weights_only=False or allow-listing the refused global,
    # which is exactly the advice we must not pass on; keep only what names the refused object.
    for line in message.splitlines():
        if re.search(r"unsupported|GLOBAL", line, re.IGNORECASE):
            return re.split(r"\.\s+Please use", line.strip())[0].rstrip(".")
    return ""


def _zip_without_pickle(path: str) -> list[str] | None:
    """The member names of a zip that is not a torch checkpoint (no data.pkl), else None.
    Reads only the archive's directory."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None
    return names


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...]]] | None:
    """Key -> (dtype, shape) from a safetensors header, without reading any tensor data.

    None when the file is not safetensors or its header is not the plain layout this
    description needs (the full reader then reports the problem)."""
    path = os.fspath(path)
    n = _safetensors_header_length(path, os.path.getsize(path))
    if n is None:
        return None
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return None
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        shape = entry.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        out[key] = (dtype, tuple(shape))
    return out


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise _fail(os.path.basename(path),
                    f"the file could not be read as safetensors ({e}); the file may be truncated or damaged — "
                    "download it again") from e


def _read_pickle(path: str) -> Any:
    name = os.path.basename(path)
    members = _zip_without_pickle(path)
    if members is not None:
        raise _fail(name, f"the file is a zip archive holding {_example_list(members, 4) or 'nothing'}, not a torch "
                          "checkpoint (no data.pkl); it is not an IP-Adapter")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # The restricted unpickler signals a refused object with an UnpicklingError whose text
        # starts "Weights only load failed"; everything else (damaged archives, stray bytes)
        # surfaces as assorted low-level errors from the zip reader or the unpickler.
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            detail = _refusal_detail(str(e))
            raise _fail(name,
                        f"the file is a pickle that contains non-tensor Python objects, so it was refused for "
                        f"safety: loading it could run arbitrary code{' (' + detail + ')' if detail else ''}. "
                        "Use a .safetensors version of this adapter instead (or convert it on a machine "
                        "you trust).") from e
        raise _fail(name, f"the file could not be read as a torch checkpoint or safetensors file "
                          f"({type(e).__name__}: {e}); the file may be truncated or damaged") from e


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
        raise _fail(name, "the file is empty (0 bytes); the download probably failed")
    ext = os.path.splitext(path)[1].lower()

    if _safetensors_header_length(path, size) is not None:
        raw: Any = _read_safetensors(path)
    elif ext == ".safetensors":
        raise _fail(name, "the file is named .safetensors but does not start with a safetensors header; "
                          "it is damaged, truncated, or a different kind of file renamed")
    elif _looks_like_torch_pickle(path):
        raw = _read_pickle(path)
    else:
        raise _fail(name, "the file is neither a safetensors file nor a torch checkpoint (unrecognised first bytes); "
                          "it is damaged, truncated, or a different kind of file")

    if not isinstance(raw, Mapping):
        raise _fail(name, f"the file holds a {type(raw).__name__}, not a dictionary of weights; "
                          "an IP-Adapter file is a dictionary with 'image_proj' and 'ip_adapter' weights")
    if not raw:
        raise _fail(name, "the file holds no weights at all")
    try:
        return group_state(flatten_state(raw))
    except AdapterFormatError as e:
        raise _fail(name, str(e)) from e


class FileDescriptions:
    """Answers about model files, computed once per file version (path, size, mtime): reading
    headers is cheap, but a folder is listed again on every prompt."""

    def __init__(self, describe, unreadable):
        self._describe, self._unreadable = describe, unreadable
        self._cache: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, path):
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except OSError as e:
            return self._unreadable(f"not readable ({e.strerror})")
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = self._describe(path)
            with self._lock:
                self._cache[key] = hit
        return hit
