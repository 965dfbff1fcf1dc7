"""The optional face packages: what is missing, how to install it, and which onnxruntime provider runs.

insightface and onnxruntime are imported lazily (never at pack import time); every failure names the
pip line that repairs it."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from typing import Optional

log = logging.getLogger("ipadapter_fused.face")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS_FILE = "requirements-face.txt"
EXTRA = "faceid"
# module name -> distribution to install when the module is missing
REQUIRED_MODULES = {"insightface": "insightface", "onnxruntime": "onnxruntime"}
# Distributions that all install the same `onnxruntime` module: with two of them the last one
# installed overwrites the other's files, so e.g. the CUDA provider silently disappears.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-qnn", "onnxruntime-training")
# Node choices -> onnxruntime provider names. "auto" takes the first available of AUTO_ORDER.
AUTO = "auto"
AUTO_ORDER = ("CUDA", "ROCM", "Dml", "CoreML", "CPU")
# Names users (and ComfyUI_IPAdapter_plus) give providers -> onnxruntime's short names
ALIASES = {"directml": "Dml", "dml": "Dml", "rocm": "ROCM", "cuda": "CUDA", "cpu": "CPU", "coreml": "CoreML",
           "openvino": "OpenVINO", "tensorrt": "Tensorrt"}
# Providers that do not run the model on this machine (Azure calls a remote endpoint).
NOT_COMPUTE = {"AzureExecutionProvider"}


class FaceSetupError(RuntimeError):
    """A face feature cannot run: a package, a model file or a provider is missing or broken. The
    message says how to repair it."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_hint() -> str:
    """The pip lines that install the face packages into the Python running ComfyUI."""
    py = sys.executable or "python"
    req = os.path.join(PACK_ROOT, REQUIREMENTS_FILE)
    return (f"Install them into the Python that runs ComfyUI: `{py} -m pip install -r {req}` "
            f"(or the pack's `{EXTRA}` extra: `pip install comfyui-ipadapter-fused[{EXTRA}]`). "
            "With an NVIDIA GPU use onnxruntime-gpu instead of onnxruntime: "
            f"`{py} -m pip uninstall -y onnxruntime onnxruntime-gpu && {py} -m pip install onnxruntime-gpu` "
            "(keep only one of the two).")


def missing_packages() -> list[str]:
    """Distributions to install for face analysis (empty when insightface and onnxruntime are importable)."""
    missing = []
    for module, dist in REQUIRED_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


def installed_onnxruntime_distributions() -> dict[str, str]:
    """{distribution name: version} of the installed onnxruntime builds (read from the package metadata,
    without importing onnxruntime)."""
    found = {}
    for dist in importlib.metadata.distributions():
        try:
            name = _normalize(dist.metadata["Name"] or "")
        except Exception:  # a broken dist-info must not break the check
            continue
        if name in ONNXRUNTIME_DISTRIBUTIONS:
            found[name] = dist.version
    return found


def onnxruntime_mix_problem() -> Optional[str]:
    """A message with the repair when several onnxruntime builds are installed together, else None."""
    dists = installed_onnxruntime_distributions()
    if len(dists) < 2:
        return None
    listed = ", ".join(f"{name} {version}" for name, version in sorted(dists.items()))
    py = sys.executable or "python"
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in dists else sorted(dists)[0]
    lost = ("the GPU build silently loses (the CUDA provider disappears and face analysis runs on the CPU)"
            if "onnxruntime-gpu" in dists else "one of them silently loses")
    return (f"Several onnxruntime builds are installed together ({listed}). They share one `onnxruntime` module, "
            f"the one installed last overwrites the other, and {lost}. Repair: uninstall all of them, then install "
            f"only the one you want: `{py} -m pip uninstall -y {' '.join(sorted(dists))} && "
            f"{py} -m pip install {keep}`. insightface 0.7.x does not need the CPU build; insightface 2.x lists "
            "`onnxruntime` as a dependency, so reinstall it with `--no-deps` after installing onnxruntime-gpu.")


def require_face_packages():
    """Import and return (insightface, onnxruntime), or raise FaceSetupError naming what to install."""
    missing = missing_packages()
    if missing:
        raise FaceSetupError(f"Face analysis (FaceID, InstantID) needs the Python package(s) {', '.join(missing)}, "
                             f"not installed in this Python. {install_hint()}")
    try:
        onnxruntime = importlib.import_module("onnxruntime")
        insightface = importlib.import_module("insightface")
        importlib.import_module("insightface.app")
        importlib.import_module("insightface.utils.face_align")
    except ImportError as exc:
        mix = onnxruntime_mix_problem()
        raise FaceSetupError(f"insightface / onnxruntime are installed but do not import ({exc}). "
                             + (mix if mix else install_hint())) from exc
    return insightface, onnxruntime


def short_name(provider: str) -> str:
    """'CUDAExecutionProvider' -> 'CUDA'."""
    return provider[:-len("ExecutionProvider")] if provider.endswith("ExecutionProvider") else provider


def full_name(choice: str) -> str:
    """'CUDA' -> 'CUDAExecutionProvider', 'DirectML' -> 'DmlExecutionProvider' (a full name is kept)."""
    if choice.endswith("ExecutionProvider"):
        return choice
    return ALIASES.get(choice.lower(), choice) + "ExecutionProvider"


def available_providers() -> list[str]:
    """Full names of the providers this onnxruntime build can run here ([] without onnxruntime)."""
    if "onnxruntime" in missing_packages():
        return []
    try:
        import onnxruntime
        return [p for p in onnxruntime.get_available_providers() if p not in NOT_COMPUTE]
    except Exception:  # a broken install: the loader reports it with the repair
        return []


def provider_choices() -> list[str]:
    """The loader node's provider list: auto, CPU, CUDA, then the others onnxruntime reports."""
    choices = [AUTO, "CPU", "CUDA"]
    for p in available_providers():
        name = short_name(p)
        if name not in choices:
            choices.append(name)
    return choices


def choose_providers(choice: str, available: Optional[list[str]] = None) -> tuple[list[str], str]:
    """(providers for the onnxruntime sessions, short name of the provider that will run).

    An unavailable choice falls back to CPU with one warning line that says why and what runs; a
    provider that is available runs with CPU behind it for the operators it lacks."""
    available = list(available_providers() if available is None else available)
    cpu = "CPUExecutionProvider"
    if choice == AUTO:
        for name in AUTO_ORDER:
            if full_name(name) in available:
                chosen = full_name(name)
                break
        else:
            chosen = cpu
    else:
        wanted = full_name(choice)
        if wanted in available:
            chosen = wanted
        else:
            why = f"onnxruntime here offers {', '.join(short_name(p) for p in available) or 'no provider'}"
            extra = ""
            if wanted == "CUDAExecutionProvider":
                mix = onnxruntime_mix_problem()
                extra = (" " + mix) if mix else (" For CUDA install onnxruntime-gpu in place of onnxruntime "
                                                  "(`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`).")
            log.warning("InsightFace: provider %s is not available (%s); running on CPU.%s",
                        short_name(wanted), why, extra)
            return [cpu], "CPU"
    providers = [chosen] if chosen == cpu else [chosen, cpu]
    return providers, short_name(chosen)
