"""Face analysis for the FaceID family: InsightFace on onnxruntime.

No ComfyUI imports here, and the optional packages (insightface, onnxruntime, onnx) are imported only
when a face model is loaded, so the pack imports and its other nodes run without them."""
from .install import FaceSetupError

__all__ = ["FaceSetupError"]
