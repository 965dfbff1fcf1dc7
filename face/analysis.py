"""Face detection, alignment and embedding through the real `insightface` package on onnxruntime.

Uses only API common to insightface 0.7.3 (what most users have) and 2.x:
`FaceAnalysis(name=<absolute pack folder>, root=..., providers=..., allowed_modules=...)` (an absolute
name is used as is, so nothing is ever downloaded), `det_model.detect(bgr, input_size=(s, s))`,
`models["recognition"].get(bgr, face)` and `utils.face_align.norm_crop`."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .install import FaceSetupError, choose_providers, full_name, require_face_packages, short_name
from .model_folder import diagnose

log = logging.getLogger("ipadapter_fused.face")

PICKS = ("largest", "index")
ON_MISSING = ("error", "skip")
DET_SIZE_STEP = 64
MIN_RETRY_SIZE = 256
# SCRFD's coarsest stride: the detection input must be a multiple of it.
DET_SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class DetectOptions:
    pick: str = "largest"      # "largest" | "index" (index into faces sorted by area, largest first)
    index: int = 0
    on_missing: str = "error"  # "error" | "skip"
    det_size: int = 640        # first try; retried at smaller sizes (step 64, down to 256) before giving up

    def __post_init__(self):
        if self.pick not in PICKS:
            raise ValueError(f"face pick must be one of {PICKS}, not {self.pick!r}")
        if self.on_missing not in ON_MISSING:
            raise ValueError(f"if no face must be one of {ON_MISSING}, not {self.on_missing!r}")
        if self.index < 0:
            raise ValueError(f"face index must be >= 0, not {self.index}")
        if self.det_size < DET_SIZE_MULTIPLE or self.det_size % DET_SIZE_MULTIPLE:
            raise ValueError(f"detection size must be a positive multiple of {DET_SIZE_MULTIPLE} (e.g. 640), "
                             f"not {self.det_size}")

    @property
    def face_rank(self) -> int:
        """Which face by size (0 = largest) is wanted."""
        return self.index if self.pick == "index" else 0


def detection_sizes(first: int) -> list[int]:
    """The sizes tried in order: `first`, then 64 smaller each time down to 256."""
    sizes = [first]
    s = first - DET_SIZE_STEP
    while s >= MIN_RETRY_SIZE:
        sizes.append(s)
        s -= DET_SIZE_STEP
    return sizes


def _sizes_text(sizes: list[int]) -> str:
    return f"detection size {sizes[0]}" if len(sizes) == 1 else f"detection sizes {', '.join(map(str, sizes))}"


@dataclass(frozen=True)
class FaceFound:
    image_index: int          # index of the image in the batch it was found in
    bbox: np.ndarray          # (4,) x1, y1, x2, y2 in image pixels
    kps: np.ndarray           # (5, 2) eyes, nose, mouth corners in image pixels
    det_score: float
    embedding: torch.Tensor   # (512,) float32 RAW (not normed); callers norm it where the family wants
    det_size: int             # the detection size that found it

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))


def images_to_uint8(images: torch.Tensor, bgr: bool = False) -> np.ndarray:
    """(N, H, W, C) float 0..1 RGB(A) -> (N, H, W, 3) uint8 RGB (BGR with `bgr`, what insightface reads),
    truncated the way ComfyUI packs convert images."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"face analysis expects an IMAGE batch (N, H, W, 3), got {shape}")
    x = images[..., :3] if images.shape[-1] != 1 else images.expand(*images.shape[:-1], 3)
    # numpy, single-threaded: torch's threaded elementwise ops cost more than they save on images this size
    x = x.detach().to("cpu", torch.float32).numpy()
    x = (x[..., ::-1] if bgr else x) * 255.0     # a new C-contiguous array either way
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


@contextlib.contextmanager
def _quiet_alignment():
    # scikit-image >= 0.26 warns on every SimilarityTransform.estimate() that norm_crop calls; the call still
    # works, and the warning would be printed for every face of every run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\..*")
        yield


class _Loaded:
    """The insightface models of one pack on one provider (shared by every FaceAnalysisModel on it)."""

    def __init__(self, app, provider: str):
        self.app = app
        self.provider = provider
        self.lock = threading.Lock()


class FaceAnalysisModel:
    """What flows on an IPAF_INSIGHTFACE link: a loaded pack, its provider, and the detection options."""

    def __init__(self, loaded: _Loaded, name: str, model_dir: str, options: DetectOptions):
        self._loaded = loaded
        self.name = name
        self.model_dir = model_dir
        self.provider = loaded.provider
        self.options = options

    def __repr__(self):
        return f"FaceAnalysisModel({self.name!r}, provider={self.provider!r}, {self.options})"

    def with_options(self, options: DetectOptions) -> "FaceAnalysisModel":
        return FaceAnalysisModel(self._loaded, self.name, self.model_dir, options)

    @property
    def app(self):
        """The insightface FaceAnalysis object (for callers that need the models themselves)."""
        return self._loaded.app

    def detect(self, bgr: np.ndarray, det_size: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """[(bbox, kps, score)] of every face in one BGR uint8 image at one detection size, largest first."""
        with self._loaded.lock:
            bboxes, kpss = self._loaded.app.det_model.detect(bgr, input_size=(det_size, det_size), max_num=0)
        found = []
        for i in range(bboxes.shape[0]):
            kps = kpss[i] if kpss is not None else None
            if kps is None:
                raise FaceSetupError(f"the detection model of '{self.name}' gives no face keypoints; FaceID needs a "
                                     "keypoint detector (det_10g.onnx / scrfd_10g_bnkps.onnx)")
            found.append((np.asarray(bboxes[i, :4], np.float32), np.asarray(kps, np.float32), float(bboxes[i, 4])))
        found.sort(key=lambda f: -float(max(0.0, f[0][2] - f[0][0]) * max(0.0, f[0][3] - f[0][1])))
        return found

    def embed(self, bgr: np.ndarray, bbox: np.ndarray, kps: np.ndarray, det_score: float) -> np.ndarray:
        """The recognition model's raw embedding of one face (insightface aligns it to 112x112 itself)."""
        from insightface.app.common import Face
        face = Face(bbox=bbox, kps=kps, det_score=det_score)
        with self._loaded.lock, _quiet_alignment():
            self._loaded.app.models["recognition"].get(bgr, face)
        return np.asarray(face.embedding, dtype=np.float32).reshape(-1)

    def find_faces(self, images: torch.Tensor) -> list[FaceFound]:
        """One face per image (the largest, or the index-th largest), retried at smaller detection sizes
        before giving up. Images without the face are left out when options.on_missing == "skip"; otherwise
        a ValueError names the image. No face in any image is always an error."""
        opts = self.options
        bgrs = images_to_uint8(images, bgr=True)
        n = bgrs.shape[0]
        sizes = detection_sizes(opts.det_size)
        want = opts.face_rank
        result, problems = [], []
        for i in range(n):
            bgr = bgrs[i]
            most, chosen = 0, None
            for size in sizes:
                faces = self.detect(bgr, size)
                most = max(most, len(faces))
                if len(faces) > want:
                    chosen = (faces[want], size)
                    break
            if chosen is None:
                where = f"image {i + 1} of {n}"
                if want == 0 or most == 0:
                    problems.append(f"no face found in {where} (tried {_sizes_text(sizes)})")
                else:
                    problems.append(f"{where} has at most {most} face(s) but face index {want} asks for face number "
                                    f"{want + 1} by size (tried {_sizes_text(sizes)})")
                if opts.on_missing == "error":
                    raise ValueError(f"InsightFace ({self.name}): {problems[-1]}. Use a picture where the face is "
                                     "clearly visible, neither tiny nor cut off, or set 'if no face' to 'skip image'"
                                     + (" or a smaller face index" if want else "") + ".")
                log.warning("InsightFace (%s): %s; image skipped.", self.name, problems[-1])
                continue
            (bbox, kps, score), size = chosen
            if size != sizes[0]:
                log.info("InsightFace (%s): face in image %d of %d found at detection size %d.", self.name, i + 1, n, size)
            embedding = self.embed(bgr, bbox, kps, score)
            result.append(FaceFound(image_index=i, bbox=bbox, kps=kps, det_score=score,
                                    embedding=torch.from_numpy(embedding.copy()), det_size=size))
        if not result:
            raise ValueError(f"InsightFace ({self.name}): no usable face in any of the {n} image(s): "
                             + "; ".join(problems) + ". Use pictures where the face is clearly visible.")
        return result

    @staticmethod
    def aligned_crops(images: torch.Tensor, faces: list[FaceFound], size: int) -> torch.Tensor:
        """(len(faces), size, size, 3) float 0..1 RGB: each face aligned to ArcFace's 5-point template, the
        crop the FaceID Plus families show CLIP (224 SD1.5, 256 SDXL, 336 Kolors)."""
        if size <= 0 or (size % 112 and size % 128):
            raise ValueError(f"face crop size must be a multiple of 112 or 128 (e.g. 224, 256, 336), not {size}")
        if not faces:
            raise ValueError("no faces to crop")
        from insightface.utils import face_align
        rgb = images_to_uint8(images)
        with _quiet_alignment():
            crops = [face_align.norm_crop(rgb[f.image_index], landmark=np.asarray(f.kps, np.float32), image_size=size)
                     for f in faces]
        return torch.from_numpy(np.stack(crops)).float().div(255.0)


_cache_lock = threading.Lock()
_cache: dict = {}


def _pack_key(model_dir: str) -> tuple:
    files = sorted(f for f in os.listdir(model_dir) if f.lower().endswith(".onnx"))
    return tuple((f, os.stat(os.path.join(model_dir, f)).st_mtime_ns) for f in files)


def load_face_analysis(model_dir: str, provider_choice: str, options: DetectOptions) -> FaceAnalysisModel:
    """Load the pack in `model_dir` (a folder of .onnx files, e.g. .../insightface/models/buffalo_l) on the
    chosen provider ("auto", "CPU", "CUDA", ...). Loaded models are shared per (folder, provider)."""
    model_dir = os.path.abspath(model_dir)
    name = os.path.basename(model_dir.rstrip(os.sep))
    problem = diagnose(os.path.dirname(os.path.dirname(model_dir)), name)
    if problem is not None:
        raise FaceSetupError(problem)
    require_face_packages()
    providers, chosen = choose_providers(provider_choice)
    key = (model_dir, tuple(providers), _pack_key(model_dir))
    with _cache_lock:
        loaded = _cache.get(key)
        if loaded is None:
            fell_back = provider_choice != "auto" and short_name(full_name(provider_choice)) != chosen  # logged
            loaded = _load(model_dir, name, providers, chosen, quiet=fell_back)
            for old in [k for k in _cache if k[:2] == key[:2]]:  # files changed on disk: drop the old sessions
                del _cache[old]
            _cache[key] = loaded
    return FaceAnalysisModel(loaded, name, model_dir, options)


def _load(model_dir: str, name: str, providers: list[str], chosen: str, quiet: bool = False) -> _Loaded:
    from insightface.app import FaceAnalysis
    try:
        app = FaceAnalysis(name=model_dir, root=os.path.dirname(os.path.dirname(model_dir)), providers=providers,
                           allowed_modules=["detection", "recognition"])
    except AssertionError as exc:  # insightface's `assert 'detection' in self.models`
        raise FaceSetupError(f"insightface found no face detection model in {model_dir} "
                             "(det_10g.onnx in buffalo_l, scrfd_10g_bnkps.onnx in antelopev2).") from exc
    if "recognition" not in app.models:
        raise FaceSetupError(f"insightface found no face recognition model in {model_dir} (w600k_r50.onnx in "
                             "buffalo_l, glintr100.onnx in antelopev2); FaceID needs it for the face embedding.")
    # ctx_id 0: a negative id would make insightface switch every session to the CPU provider.
    app.prepare(ctx_id=0, det_size=(640, 640))
    running = _running_provider(app) or chosen
    if running != chosen:
        log.warning("InsightFace (%s): asked onnxruntime for %s but it runs on %s (its libraries did not load).",
                    name, chosen, running)
    elif not quiet:
        log.info("InsightFace (%s): runs on the %s provider.", name, running)
    return _Loaded(app, running)


def _running_provider(app) -> Optional[str]:
    session = getattr(app.det_model, "session", None)
    try:
        return short_name(session.get_providers()[0])
    except Exception:
        return None


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()



__all__ = ["DetectOptions", "FaceFound", "FaceAnalysisModel", "load_face_analysis", "detection_sizes",
           "images_to_uint8", "clear_cache"]
