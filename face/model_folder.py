"""InsightFace model packs on disk: `<insightface folder>/models/<name>/*.onnx` (buffalo_l, antelopev2).

Lists the packs for the loader node and recognises the common wrong layouts (nested folder from the
zip, zip not unpacked, .onnx files one level too high, missing `models` level, no detection model),
each with the move that fixes it. Nothing is ever downloaded."""
from __future__ import annotations

import glob
import os
from typing import Iterable, Optional

from .install import FaceSetupError

MODELS = "models"
# File names of the detection / recognition models of the published packs. Other names are recognised
# from their ONNX signature when the `onnx` package is installed.
DETECTOR_NAMES = ("det_", "scrfd")
RECOGNIZER_NAMES = ("w600k", "glintr", "arcface", "r100", "r50")
KNOWN_PACKS = ("buffalo_l", "antelopev2")


def _onnx_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*.onnx"))) if os.path.isdir(folder) else []


def _onnx_signature(path: str) -> Optional[tuple[int, list]]:
    """(number of outputs, first input's shape) read from the graph, or None when `onnx` is missing or the
    file does not parse."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        try:
            model = onnx.load_model(path, load_external_data=False)
        except TypeError:
            model = onnx.load_model(path)
        dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        return len(model.graph.output), dims
    except Exception:
        return None


def model_role(path: str) -> Optional[str]:
    """"detection", "recognition" or None (other: landmarks, gender/age, unknown), the way insightface
    routes a model: by its name when it is a published one, else by its inputs and outputs."""
    base = os.path.basename(path).lower()
    if base.startswith(DETECTOR_NAMES):
        return "detection"
    if base.startswith(RECOGNIZER_NAMES):
        return "recognition"
    if base.startswith(("1k3d68", "2d106det", "genderage")):
        return None
    sig = _onnx_signature(path)
    if sig is None:
        return None
    outputs, dims = sig
    if outputs >= 5:
        return "detection"
    if len(dims) == 4 and isinstance(dims[2], int) and dims[2] == dims[3] and dims[2] >= 112 and dims[2] % 16 == 0 \
            and dims[2] not in (192,):
        return "recognition"
    return None


def pack_roles(folder: str) -> set:
    return {r for r in (model_role(p) for p in _onnx_files(folder)) if r}


def find_model_packs(roots: Iterable[str]) -> list[str]:
    """Pack names for the loader's list: folders under <root>/models, plus names seen in a wrong layout
    (an unpacked zip, a pack folder missing the `models` level) so that choosing one shows how to fix it."""
    names = set()
    for root in roots:
        models = os.path.join(root, MODELS)
        for base in (models, root):
            if not os.path.isdir(base):
                continue
            for entry in os.listdir(base):
                full = os.path.join(base, entry)
                if os.path.isdir(full):
                    if base == root and entry == MODELS:
                        continue
                    if base == models or _onnx_files(full) or _onnx_files(os.path.join(full, entry)):
                        names.add(entry)
                elif entry.lower().endswith(".zip"):
                    names.add(entry[:-4])
    return sorted(names)


def _fmt(path: str) -> str:
    return path.replace(os.sep, "/")


def diagnose(root: str, name: str) -> Optional[str]:
    """None when <root>/models/<name> holds a usable pack (a detection and a recognition model), else what
    is wrong and how to fix it."""
    models = os.path.join(root, MODELS)
    pack = os.path.join(models, name)
    want = _fmt(pack) + "/"
    files = _onnx_files(pack)
    if files:
        roles = pack_roles(pack)
        if "detection" not in roles:
            return (f"{want} has {len(files)} .onnx file(s) ({', '.join(os.path.basename(f) for f in files)}) but no "
                    "face detection model (det_10g.onnx in buffalo_l, scrfd_10g_bnkps.onnx in antelopev2); this "
                    "is what insightface reports as `assert 'detection' in self.models`. Copy the complete pack, "
                    "all its .onnx files, into that folder.")
        if "recognition" not in roles:
            return (f"{want} has a detection model but no face recognition model (w600k_r50.onnx in buffalo_l, "
                    "glintr100.onnx in antelopev2), which FaceID needs for the face embedding. Copy the complete "
                    "pack, all its .onnx files, into that folder.")
        return None
    if os.path.isdir(pack):
        for sub in sorted(os.listdir(pack)):
            inner = os.path.join(pack, sub)
            if _onnx_files(inner):
                return (f"The .onnx files of '{name}' are one folder too deep, in {_fmt(inner)}/ (the zip holds a "
                        f"folder of its own; insightface then fails with `assert 'detection' in self.models`). "
                        f"Move the .onnx files up into {want} and delete the empty {_fmt(inner)}/.")
        zips = glob.glob(os.path.join(glob.escape(pack), "*.zip"))
        if zips:
            return (f"{want} holds {os.path.basename(zips[0])}, not unpacked. Unpack it so that the .onnx files lie "
                    f"directly in {want} (not in a folder inside it).")
        return f"{want} holds no .onnx files. Copy the pack's .onnx files into it."
    for zip_dir in (models, root):
        z = os.path.join(zip_dir, name + ".zip")
        if os.path.isfile(z):
            return (f"{_fmt(z)} is not unpacked. Unpack it so that the .onnx files lie in {want} "
                    f"(e.g. {want}{'scrfd_10g_bnkps.onnx' if name == 'antelopev2' else 'det_10g.onnx'}), "
                    "then delete the zip.")
    flat = os.path.join(root, name)
    if _onnx_files(flat) or _onnx_files(os.path.join(flat, name)):
        return (f"The pack folder is {_fmt(flat)}/ but insightface reads packs from {_fmt(models)}/: move the folder "
                f"to {want} (the .onnx files directly inside it).")
    for high in (models, root):
        loose = _onnx_files(high)
        if loose:
            return (f"{len(loose)} .onnx file(s) lie directly in {_fmt(high)}/ ({', '.join(os.path.basename(f) for f in loose[:6])}): "
                    f"one level too high. Move them into {want} (one folder per pack: models/buffalo_l/, "
                    "models/antelopev2/).")
    return (f"No InsightFace model pack '{name}' in {_fmt(models)}/. The pack does not download itself: get "
            f"{' or '.join(KNOWN_PACKS)} and unpack it so that its .onnx files lie in {want}.")


def diagnose_roots(roots: Iterable[str], name: str) -> Optional[str]:
    """None when one of the roots holds a usable pack `name`, else the diagnosis of the first root that shows
    a trace of it (or of all roots when none does)."""
    roots = list(roots)
    if not roots:
        return "No insightface model folder is registered (expected models/insightface)."
    messages = []
    for root in roots:
        msg = diagnose(root, name)
        if msg is None:
            return None
        messages.append(msg)
    specific = [m for m in messages if not m.startswith("No InsightFace model pack")]
    if specific:
        return specific[0]
    if len(roots) == 1:
        return messages[0]
    return (f"No InsightFace model pack '{name}' in any insightface folder ({', '.join(_fmt(r) + '/models/' for r in roots)}). "
            f"The pack does not download itself: unpack {' or '.join(KNOWN_PACKS)} so that its .onnx files lie in "
            f"<insightface folder>/models/{name}/.")


def resolve_pack(roots: Iterable[str], name: str) -> str:
    """The absolute folder of the usable pack `name`, or FaceSetupError with the diagnosis."""
    roots = list(roots)
    for root in roots:
        if diagnose(root, name) is None:
            return os.path.abspath(os.path.join(root, MODELS, name))
    raise FaceSetupError(diagnose_roots(roots, name))
