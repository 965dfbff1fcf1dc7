"""What a file in models/ipadapter is (its AdapterSpec), read from its key names and shapes without
loading its weights, so every file of the folder can be looked at when a preset picks one.

safetensors: the header. Pickles: torch's weights-only unpickler with mmap (the tensors' data stays on
disk); a file that cannot be read so is described as unreadable, not loaded. Cached by (real path, size,
mtime)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .families import AdapterSpec, detect_family
from .loading import FileDescriptions, AdapterFormatError, flatten_state, read_safetensors_header

__all__ = ["AdapterFile", "describe_adapter_file"]


@dataclass(frozen=True)
class AdapterFile:
    spec: Optional[AdapterSpec]
    problem: str = ""  # when spec is None: what the file is instead

    def describe(self) -> str:
        return self.spec.describe() if self.spec is not None else self.problem


def _meta_state(path: str) -> Optional[dict]:
    header = read_safetensors_header(path)
    if header is not None:
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in header.items()}
    if path.lower().endswith((".safetensors", ".sft")):
        raise AdapterFormatError("a damaged .safetensors file (its header is not a table of tensors)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # legacy (non-zip) pickles cannot be mapped; refusals and damage land here too
        raise AdapterFormatError(f"a pickled file whose contents could not be read without loading it "
                                 f"({type(e).__name__}); choose it explicitly, or use its .safetensors version") from e
    if not isinstance(state, dict):
        raise AdapterFormatError(f"the file holds a {type(state).__name__}, not a dictionary of weights")
    flat = flatten_state(state)
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in flat.items()
            if isinstance(v, torch.Tensor)}


def _describe_uncached(path: str) -> AdapterFile:
    name = os.path.basename(path)
    try:
        state = _meta_state(path)
        return AdapterFile(detect_family(state))
    except (AdapterFormatError, OSError) as e:
        return AdapterFile(None, str(e).removeprefix(name + ": "))


# The adapter family of `path` from its keys and shapes. Never raises for a bad file.
describe_adapter_file = FileDescriptions(_describe_uncached, lambda why: AdapterFile(None, why))
