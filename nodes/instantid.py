"""InstantID (SDXL) in one node: the face adapter through the pack's apply path, the keypoint image
for the IdentityNet ControlNet, and the conditioning that makes that ControlNet read the face tokens.

Facts this module follows, from InstantID's SDXL pipeline (instantX-research/InstantID,
pipeline_stable_diffusion_xl_instantid.py: draw_kps, _encode_prompt_image_emb, the ControlNet call) and
its ComfyUI port (cubiq/ComfyUI_InstantID, InstantID.py):
- the adapter is a Plus resampler reading the RAW antelopev2 embedding (N, 1, 512) into 16 tokens;
  the uncond rows read the projection of the zero embedding;
- the IdentityNet ControlNet's cross-attention context is those image tokens, not the text
  (the pipeline calls the ControlNet with encoder_hidden_states=prompt_image_emb);
- in ComfyUI that context travels in a conditioning's `cross_attn_controlnet` entry, which the host
  turns into the model cond `crossattn_controlnet` that its ControlNet reads instead of c_crossattn;
- the ControlNet's picture is the five keypoints drawn on black (see draw_keypoints)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

# Conditioning entry the host hands to its ControlNet as cross-attention context (model_base.extra_conds
# maps it to 'crossattn_controlnet', which ControlNet.get_control reads in place of 'c_crossattn').
CONTROLNET_CONTEXT_KEY = "cross_attn_controlnet"

# Keypoints in insightface's order: left eye, right eye, nose, left mouth corner, right mouth corner.
# One RGB colour per point; a limb joins each other point to the nose and takes that point's colour.
KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
NOSE = 2
LIMB_ENDS = (0, 1, 3, 4)
LIMB_HALF_WIDTH = 4       # the ellipse's short half-axis, in pixels
LIMB_DIM = 0.6            # limbs are dimmed (truncated to 8 bits) before the points are drawn on top
POINT_RADIUS = 10
# The IdentityNet was trained on SDXL: its cross-attention reads 2048-wide tokens.
SDXL_CONTEXT = 2048


# --------------------------------------------------------------------------------------------------
# Keypoint picture
# --------------------------------------------------------------------------------------------------
def draw_keypoints(kps, height: int, width: int) -> torch.Tensor:
    """The IdentityNet's control picture: (1, height, width, 3) float IMAGE in 0..1.

    On a black canvas, each limb (eye or mouth corner -> nose) is a filled ellipse around the limb's
    midpoint, half-axes (limb length / 2, 4 px) along the limb, in the colour of its outer point; the
    limbs are scaled by 0.6 (8-bit, truncated); then each keypoint is a filled disc of radius 10 px in
    its full colour. Coordinates are pixels (x right, y down), as insightface gives them."""
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise ValueError(f"keypoints must be 5 finite (x, y) points, got an array of shape {kps.shape}")
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"the keypoint picture needs a positive size, got {width}x{height}")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.float64)

    for end in LIMB_ENDS:
        (x0, y0), (x1, y1) = kps[end], kps[NOSE]
        length = math.hypot(x0 - x1, y0 - y1)
        # whole-pixel centre and half-axes, like an integer raster ellipse
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        a, b = max(int(length / 2), 0.5), LIMB_HALF_WIDTH
        angle = math.atan2(y0 - y1, x0 - x1)
        c, s = math.cos(angle), math.sin(angle)
        u = (xs - cx) * c + (ys - cy) * s       # along the limb
        v = -(xs - cx) * s + (ys - cy) * c      # across it
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        canvas[inside] = KPS_COLOURS[end]
    canvas = np.floor(canvas * LIMB_DIM)

    for point, colour in zip(kps, KPS_COLOURS):
        px, py = int(point[0]), int(point[1])
        canvas[(xs - px) ** 2 + (ys - py) ** 2 <= POINT_RADIUS ** 2] = colour
    return torch.from_numpy(canvas / 255.0).float()[None]


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------
def _host_controlnet_apply():
    import nodes as host_nodes  # the host's nodes.py (the pack's own package is imported relatively)

    return host_nodes.ControlNetApplyAdvanced()


def instantid_conditioning(positive, negative, control_net, kps_image: torch.Tensor, pos_tokens: torch.Tensor,
                           neg_tokens: torch.Tensor, strength: float, start_at: float, end_at: float, vae=None):
    """(positive, negative) with the ControlNet applied as the host's 'Apply ControlNet' node does
    (same hint, strength, window, chaining), and each row's ControlNet context set to image tokens:
    the face tokens on the positive rows, the zero embedding's tokens on the negative rows."""
    for name, tokens in (("pos_tokens", pos_tokens), ("neg_tokens", neg_tokens)):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(f"{name} must be image tokens of shape (B, T, C), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if strength == 0:  # the host's node leaves the conditioning untouched then; so does this
        return positive, negative
    import comfy.model_management as mm

    extra = {} if vae is None else {"vae": vae}  # hosts before the vae input take none
    positive, negative = _host_controlnet_apply().apply_controlnet(
        positive, negative, control_net, kps_image, strength, start_at, end_at, **extra)
    device = mm.intermediate_device()

    def with_context(conditioning, tokens):
        tokens = tokens.to(device)
        return [[t[0], {**t[1], CONTROLNET_CONTEXT_KEY: tokens}] for t in conditioning]

    return with_context(positive, pos_tokens), with_context(negative, neg_tokens)


# --------------------------------------------------------------------------------------------------
# Checks (all before any work)
# --------------------------------------------------------------------------------------------------
def is_instantid_adapter(spec) -> bool:
    face = getattr(spec, "face", None)
    if face is not None:
        return face.kind == "face-resampler"
    return False


def check_instantid_adapter(adapter) -> None:
    spec = getattr(adapter, "spec", None)
    if spec is None:
        raise ValueError("ipadapter must come from 'IPAdapter Loader (Fused)' (got "
                         f"{type(adapter).__name__})")
    if not is_instantid_adapter(spec):
        raise ValueError(
            f"this is a {spec.family_name}, not InstantID's face adapter. 'InstantID (Fused)' needs InstantID's "
            "ip-adapter.bin (a 16-token resampler reading the antelopev2 face embedding); use 'Apply IPAdapter "
            "(Fused)' for other adapters.")
    if spec.context_dim != SDXL_CONTEXT:
        raise ValueError(f"InstantID is an SDXL method; this adapter's tokens are {spec.context_dim} wide "
                         f"(SDXL: {SDXL_CONTEXT})")


def _attn2_context_width(module) -> Optional[int]:
    for name, sub in module.named_modules():
        if name.endswith("attn2") and hasattr(sub, "to_k"):
            return int(sub.to_k.in_features)
    return None


def check_controlnet(control_net, unet, token_width: int) -> None:
    """The IdentityNet is an SDXL ControlNet: its cross-attention reads the adapter's tokens and its
    outputs add onto the model's blocks, so both must fit before sampling."""
    import comfy.controlnet

    if not isinstance(control_net, comfy.controlnet.ControlNet):
        raise ValueError(
            f"control_net must be InstantID's IdentityNet ControlNet (an SDXL ControlNet loaded with 'Load "
            f"ControlNet Model'); got a {type(control_net).__name__}")
    cmodel = getattr(control_net, "control_model", None)
    if cmodel is None:  # built lazily (Control-LoRA): nothing to inspect yet
        return
    width = _attn2_context_width(cmodel)
    if width is None:
        raise ValueError("this ControlNet has no cross-attention, so it cannot read the face tokens; connect "
                         "InstantID's IdentityNet ControlNet")
    if width != token_width:
        raise ValueError(
            f"this ControlNet's cross-attention reads context width {width}, but the face tokens are {token_width} "
            "wide: InstantID's IdentityNet is an SDXL ControlNet (context width 2048); connect it instead")

    def shape(m):
        mult = getattr(m, "channel_mult", None)
        return (getattr(m, "model_channels", None), None if mult is None else tuple(mult),
                len(getattr(m, "input_blocks", [])))

    have, want = shape(cmodel), shape(unet)
    if None not in have + want and have != want:
        raise ValueError(
            f"the ControlNet does not fit the model: it has {have[2]} input blocks of widths {have[0]} x {have[1]}, "
            f"the model {want[2]} of widths {want[0]} x {want[1]}. InstantID's IdentityNet is made for SDXL "
            "models; use it with an SDXL checkpoint")


def _check_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value}; it must be a finite number")


# --------------------------------------------------------------------------------------------------
# Faces
# --------------------------------------------------------------------------------------------------
class _FacesOnce:
    """The face analysis with each batch's detection kept, so the adapter path and this node do not
    detect the same faces twice."""

    def __init__(self, analysis):
        self._analysis = analysis
        self._found = {}

    @staticmethod
    def _key(images: torch.Tensor):
        # the same view of the same pixels; the node changes no pixels (and inference tensors, which the
        # host's executor makes, keep no version counter)
        return (images.data_ptr(), tuple(images.shape), tuple(images.stride()), images.dtype, str(images.device))

    def find_faces(self, images):
        key = self._key(images)
        if key not in self._found:
            self._found[key] = self._analysis.find_faces(images)
        return self._found[key]

    def __getattr__(self, name):
        return getattr(self._analysis, name)


def _check_insightface(insightface) -> None:
    if insightface is None or not hasattr(insightface, "find_faces"):
        raise ValueError("insightface must come from 'InsightFace Loader (Fused)' with the antelopev2 model pack "
                         f"(got {type(insightface).__name__})")


def _find(analysis, images: torch.Tensor, what: str):
    try:
        faces = analysis.find_faces(images)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if not faces:
        raise ValueError(f"{what}: no face found")
    return faces


def keypoint_images(faces, height: int, width: int) -> torch.Tensor:
    """One keypoint picture per face, each the size of the picture it was found in."""
    return torch.cat([draw_keypoints(f.kps, height, width) for f in faces])


# --------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------
def apply_instantid(model, ipadapter, insightface, control_net, image, positive, negative, weight: float = 0.8,
                    cn_strength: float = 0.8, start_at: float = 0.0, end_at: float = 1.0,
                    image_kps: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
    """(model with the face adapter, positive, negative, keypoint pictures). Every check runs before
    any patch; several reference images are averaged (one identity), as InstantID's ComfyUI port does."""
    import comfy.model_management as mm

    from .apply import apply_adapter, check_adapter_fits, image_tokens
    from .encode import check_image
    from .encoders import FaceOptions, encode
    from .unet_sites import unet_attn2_sites

    check_instantid_adapter(ipadapter)
    _check_insightface(insightface)
    for name, value in (("weight", weight), ("cn_strength", cn_strength), ("start_at", start_at), ("end_at", end_at)):
        _check_number(name, value)
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) must not be after end_at ({end_at}); both lie in [0, 1]")
    check_image(image, "image")
    if image_kps is not None:
        check_image(image_kps, "image_kps")
    spec = ipadapter.spec
    unet = model.get_model_object("diffusion_model")
    check_adapter_fits(spec, unet_attn2_sites(unet))
    if cn_strength != 0:
        check_controlnet(control_net, unet, spec.face.token_width)

    faces = _FacesOnce(insightface)
    # detected here first so a missing face names its input; the adapter path reuses these detections
    reference = _find(faces, image[..., :3], "image (the face reference)")
    if image_kps is None:  # the pose of the first reference image that holds a face
        kps_image = keypoint_images(reference[:1], *image.shape[1:3])
    else:
        kps_image = keypoint_images(_find(faces, image_kps[..., :3], "image_kps (the keypoints picture)"),
                                    *image_kps.shape[1:3])
    options = FaceOptions(adapter_name=getattr(ipadapter, "name", ""))
    encoded = encode(spec, None, faces, image, None, options)
    mm.load_models_gpu([ipadapter.patcher])
    tokens = image_tokens(ipadapter, spec, encoded.pos, encoded.neg, "average", options).to(mm.intermediate_device())

    patched = apply_adapter(model, ipadapter, None, image, weight, "linear", start_at, end_at,
                            combine_embeds="average", attn_mask=attn_mask, insightface=faces, face=options)
    positive, negative = instantid_conditioning(positive, negative, control_net, kps_image, tokens[0], tokens[1],
                                                cn_strength, start_at, end_at)
    return patched, positive, negative, kps_image


class IPAdapterFusedInstantID:
    DESCRIPTION = ("InstantID for SDXL in one node: the face adapter on the model (the antelopev2 identity "
                   "embedding through InstantID's resampler), the keypoint picture for the IdentityNet ControlNet, "
                   "and the conditioning that applies that ControlNet with the face tokens as its cross-attention "
                   "context. Connect the outputs to the sampler; the keypoint picture is there to look at.")
    CATEGORY = "ipadapter_fused"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "IMAGE")
    RETURN_NAMES = ("model", "positive", "negative", "keypoints")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SDXL model (InstantID was trained on SDXL)."}),
                "ipadapter": ("IPADAPTER_FUSED", {"tooltip": "InstantID's ip-adapter.bin from 'IPAdapter Loader "
                                                             "(Fused)'. Other adapters are refused; use 'Apply "
                                                             "IPAdapter (Fused)' for them."}),
                "insightface": ("IPAF_INSIGHTFACE", {"tooltip": "Face analysis from 'InsightFace Loader (Fused)' "
                                                                "with the antelopev2 model pack (InstantID was "
                                                                "trained on its raw embedding)."}),
                "control_net": ("CONTROL_NET", {"tooltip": "InstantID's IdentityNet ControlNet "
                                                           "(ControlNetModel/diffusion_pytorch_model.safetensors) from "
                                                           "'Load ControlNet Model'."}),
                "image": ("IMAGE", {"tooltip": "The face reference. Several images are averaged into one identity."}),
                "positive": ("CONDITIONING", {"tooltip": "The positive prompt; the ControlNet is added to it."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt; the ControlNet is added to it too, "
                                                         "reading the tokens of the zero face embedding."}),
                "weight": ("FLOAT", {"default": 0.8, "min": -1.0, "max": 3.0, "step": 0.05,
                                     "tooltip": "Strength of the face adapter in the model's cross-attention "
                                                "(InstantID's ip_adapter_scale; its examples use 0.8)."}),
                "cn_strength": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 10.0, "step": 0.01,
                                          "tooltip": "Strength of the IdentityNet ControlNet (InstantID's "
                                                     "controlnet_conditioning_scale; its examples use 0.8). 0 leaves "
                                                     "the conditioning as it is."}),
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "Fraction of the sampling schedule at which the adapter and the "
                                                  "ControlNet start acting."}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "Fraction of the sampling schedule after which the adapter and the "
                                                "ControlNet stop acting."}),
            },
            "optional": {
                "image_kps": ("IMAGE", {"tooltip": "A picture whose face sets the pose: its keypoints are drawn for "
                                                   "the ControlNet, at its size (give it the output's aspect ratio: "
                                                   "the host crops the centre). Default: the first reference image."}),
                "attn_mask": ("MASK", {"tooltip": "Optional region where the face adapter acts (the ControlNet acts "
                                                  "where the keypoints are)."}),
            },
        }

    def apply(self, model, ipadapter, insightface, control_net, image, positive, negative, weight, cn_strength,
              start_at, end_at, image_kps=None, attn_mask=None):
        return apply_instantid(model, ipadapter, insightface, control_net, image, positive, negative, weight,
                               cn_strength, start_at, end_at, image_kps, attn_mask)


NODE_CLASS_MAPPINGS = {"IPAdapterFusedInstantID": IPAdapterFusedInstantID}
NODE_DISPLAY_NAME_MAPPINGS = {"IPAdapterFusedInstantID": "InstantID (Fused)"}
