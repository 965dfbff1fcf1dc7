"""Face nodes: the InsightFace loader (model pack, provider, detection options) and the aligned face crops.

The face packages are optional: these nodes declare themselves without them and say what to install
when run. Declarations and thin calls only; the work is in face/."""
from __future__ import annotations

import logging
import os

from ..face.install import FaceSetupError, missing_packages, install_hint, onnxruntime_mix_problem, provider_choices
from ..face.model_folder import KNOWN_PACKS, MODELS, diagnose_roots, find_model_packs, resolve_pack

CATEGORY = "ipadapter_fused"
FOLDER = "insightface"
INSIGHTFACE_TYPE = "IPAF_INSIGHTFACE"
PICK_CHOICES = {"largest": "largest", "by index": "index"}
MISSING_CHOICES = {"error": "error", "skip image": "skip"}
log = logging.getLogger("ipadapter_fused.face")


def register_folder() -> None:
    """Add models/insightface to the host's search paths (creating it when missing), keeping any
    extra_model_paths.yaml entries. Packs live in <folder>/models/<name>/."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:
        os.makedirs(os.path.join(default, MODELS), exist_ok=True)
    except OSError:  # a read-only install still works with extra_model_paths.yaml
        pass
    known = folder_paths.folder_names_and_paths.get(FOLDER)
    if known is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".onnx"})
        return
    if default not in known[0]:
        folder_paths.add_model_folder_path(FOLDER, default)


def insightface_roots() -> list[str]:
    try:
        import folder_paths
        return list(folder_paths.get_folder_paths(FOLDER))
    except Exception:  # not registered (outside ComfyUI): the conventional place
        return []


def _pack_choices() -> list[str]:
    return find_model_packs(insightface_roots()) or list(KNOWN_PACKS)


class IPAdapterFusedInsightFaceLoader:
    DESCRIPTION = ("Loads an InsightFace model pack (buffalo_l for FaceID, antelopev2 for InstantID and Kolors "
                   "FaceID) from models/insightface/models/<name>/ and sets how faces are picked. Runs on onnxruntime; "
                   "nothing is downloaded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (INSIGHTFACE_TYPE,)
    RETURN_NAMES = ("insightface",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_pack": (_pack_choices(), {"tooltip": "The pack folder in models/insightface/models/ (its .onnx files "
                                                        "directly inside): buffalo_l for FaceID / FaceID Plus / Portrait, "
                                                        "antelopev2 for InstantID and Kolors FaceID-Plus."}),
            "provider": (provider_choices(), {"default": "auto",
                         "tooltip": "Where onnxruntime runs the face models. 'auto' takes CUDA (or another GPU provider) "
                                    "when onnxruntime offers it, else the CPU. An unavailable choice runs on the CPU and "
                                    "says so once in the log. CUDA needs the onnxruntime-gpu package."}),
            "det_size": ("INT", {"default": 640, "min": 128, "max": 2048, "step": 32,
                                 "tooltip": "Detection resolution of the first try. When no face is found it is retried "
                                            "at smaller sizes (64 less each time, down to 256), which finds faces that "
                                            "fill most of the picture."}),
            "face": (list(PICK_CHOICES), {"default": "largest",
                     "tooltip": "Which face of each image is used: the largest, or the one 'face_index' names "
                                "(0 = largest, 1 = second largest, ...)."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 63,
                                   "tooltip": "With face 'by index': which face by size, 0 being the largest."}),
            "if_no_face": (list(MISSING_CHOICES), {"default": "error",
                           "tooltip": "When an image has no usable face: stop with an error naming the image, or leave "
                                      "that image out (it is still an error when no image keeps a face)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_pack, provider, det_size):
        # `provider` is named here so that any value passes the host's list check: a workflow saved where
        # onnxruntime offered e.g. TensorRT runs elsewhere on the CPU, saying so once in the log.
        problems = []
        if not isinstance(provider, str) or not provider:
            problems.append("provider must be a name such as auto, CPU or CUDA")
        missing = missing_packages()
        if missing:
            problems.append(f"Face analysis needs the Python package(s) {', '.join(missing)}. {install_hint()}")
        problem = diagnose_roots(insightface_roots(), model_pack)
        if problem:
            problems.append(problem)
        if det_size % 32:
            problems.append(f"det_size must be a multiple of 32 (e.g. 640), not {det_size}")
        return True if not problems else " ".join(problems)

    def load(self, model_pack, provider, det_size, face, face_index, if_no_face):
        from ..face.analysis import DetectOptions, load_face_analysis
        missing = missing_packages()
        if missing:
            raise FaceSetupError(f"Face analysis needs the Python package(s) {', '.join(missing)}. {install_hint()}")
        mix = onnxruntime_mix_problem()
        if mix:
            log.warning("InsightFace: %s", mix)
        options = DetectOptions(pick=PICK_CHOICES[face], index=face_index, on_missing=MISSING_CHOICES[if_no_face],
                                det_size=det_size)
        return (load_face_analysis(resolve_pack(insightface_roots(), model_pack), provider, options),)


class IPAdapterFusedFaceCrops:
    DESCRIPTION = ("The faces the InsightFace loader finds in the images, aligned the way the FaceID adapters read "
                   "them (eyes, nose and mouth on ArcFace's template), so you can see which face was used.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("face_crops",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "insightface": (INSIGHTFACE_TYPE, {"tooltip": "From 'InsightFace Loader (Fused)': the models and which face "
                                                          "of each image to take."}),
            "image": ("IMAGE", {"tooltip": "The reference image(s); one face is taken from each (images without one "
                                           "are left out when the loader says 'skip image')."}),
            "crop_size": ("INT", {"default": 224, "min": 112, "max": 1024, "step": 16,
                                  "tooltip": "Side of the aligned crops: 224 for SD1.5 FaceID Plus, 256 for SDXL, 336 for "
                                             "Kolors. A multiple of 112 or 128."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, crop_size):
        if crop_size % 112 and crop_size % 128:
            return f"crop_size must be a multiple of 112 or 128 (224, 256, 336, ...), not {crop_size}"
        return True

    def crop(self, insightface, image, crop_size):
        faces = insightface.find_faces(image)
        return (insightface.aligned_crops(image, faces, crop_size),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterFusedInsightFaceLoader": IPAdapterFusedInsightFaceLoader,
    "IPAdapterFusedFaceCrops": IPAdapterFusedFaceCrops,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterFusedInsightFaceLoader": "InsightFace Loader (Fused)",
    "IPAdapterFusedFaceCrops": "Face Crops (Fused)",
}
