"""Tiny InsightFace model packs with the real ONNX signatures, for tests and headless workflow runs.

insightface routes a model by its inputs and outputs, so these files go through the real
FaceAnalysis / SCRFD / ArcFaceONNX code paths (detection decoding, NMS, alignment, recognition):

- `det_10g.onnx`, a detector with SCRFD's signature (input 1x3xHxW, dynamic H and W; 9 outputs: scores,
  box distances and keypoint distances for strides 8/16/32, 2 anchors per position). It finds bright
  square "faces" on a dark background: at each anchor it compares the mean brightness of a window
  (the anchor's size) with the ring around it (twice the size), so a blob is found where it is, at the
  scale that matches its size; a blank image gives nothing, and a blob much larger than the largest
  window (BLOB_SIZE_RANGE at the detection size) is only found when the image is detected at a
  smaller size. The box comes from the outer window: half-size = window * sqrt(mean), offset from the
  anchor from the mean of its right (bottom) half, so every anchor on one square gives the same box;
  the 5 keypoints sit where ArcFace's template puts eyes, nose and mouth in it.
- `w600k_r50.onnx`, a recognizer with ArcFace's signature (Nx3x112x112 -> Nx512): a fixed random
  linear map of the 8x8-average-pooled aligned crop, so different crops give different embeddings
  and a test can recompute it (`recognizer_matrix`).

Images made with them are not faces, and these models know nothing about faces."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DETECTOR_FILE = "det_10g.onnx"
RECOGNIZER_FILE = "w600k_r50.onnx"
TINY_PACK = "ipaf_tiny_faces"
# Bump when the generated graphs change: callers cache packs by it.
TINY_FACES_VERSION = 2

STRIDES = (8, 16, 32)
# Window (anchor) sizes per stride in detection pixels, two anchors each, ratio about 1.5 so every blob
# size between the smallest and largest is matched by one window.
WINDOWS = {8: (16, 24), 16: (40, 64), 32: (96, 144)}
# Windows are averaged from CELL x CELL cell means (every half-window is a whole number of cells).
CELL = 4
# Scores: sigmoid(GAIN * (inner mean - ring mean - CONTRAST)) with brightness 0..1; insightface keeps
# scores >= 0.5, so a "face" is a near-white square on a near-black background (contrast > 0.6).
GAIN = 12.0
CONTRAST = 0.6
# Side lengths (detection pixels) of the squares found, one box each, centre within 2 px and size within
# 7 %, for draw_faces' default colours at every position (measured by sweeping sizes and offsets); a
# dimmer square or a brighter background narrows it.
BLOB_SIZE_RANGE = (20, 200)
# ArcFace's 5-point template in a 112 crop (eyes, nose, mouth corners); keypoints are placed the same
# way inside the estimated box.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
EMBED_DIM = 512
REC_SIZE = 112
REC_POOL = 8
REC_SEED = 1234
OPSET = 17


def _helpers():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - the test requirements include onnx
        raise RuntimeError("the tiny face models are built with the `onnx` package: pip install onnx") from exc
    return onnx, TensorProto, helper, numpy_helper


def detector_model():
    """The SCRFD-signature detector as an onnx ModelProto."""
    onnx, TensorProto, helper, numpy_helper = _helpers()
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    # brightness 0..1 from insightface's blob ((pixel - 127.5) / 128); the zero padding it adds is 0.
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["mean_c"], axes=[1], keepdims=1, name="bright_mean"))
    const("b_scale", 128.0 / 255.0)
    const("b_shift", 127.5 / 255.0)
    nodes.append(helper.make_node("Mul", ["mean_c", "b_scale"], ["bright_s"], name="bright_scale"))
    nodes.append(helper.make_node("Add", ["bright_s", "b_shift"], ["bright"], name="bright_shift"))
    nodes.append(helper.make_node("AveragePool", ["bright"], ["cells"], kernel_shape=[CELL, CELL],
                                  strides=[CELL, CELL], name="cell_means"))
    const("ring_four", 4.0)
    const("ring_third", 1.0 / 3.0)
    const("contrast", CONTRAST)
    const("gain", GAIN)
    const("eps", 1e-6)
    kps_unit = (ARCFACE_TEMPLATE / 112.0 - 0.5) * 2.0   # in units of the box half-size
    score_outs, box_outs, kps_outs = [], [], []
    for stride in STRIDES:
        scores, boxes, kpss = [], [], []
        for a, w in enumerate(WINDOWS[stride]):
            p = f"s{stride}a{a}_"
            # window centred on the anchor: rows [y*s - w/2, y*s + w/2); output size H/s
            # (pooled from the 4x4 cell means: the same averages, far fewer operations)
            k, cs = w // CELL, stride // CELL
            nodes.append(helper.make_node("AveragePool", ["cells"], [p + "inner"], kernel_shape=[k, k],
                                          strides=[cs, cs], pads=[k // 2, k // 2, k // 2 - cs, k // 2 - cs],
                                          count_include_pad=1, name=p + "inner_pool"))
            nodes.append(helper.make_node("AveragePool", ["cells"], [p + "outer"], kernel_shape=[2 * k, 2 * k],
                                          strides=[cs, cs], pads=[k, k, k - cs, k - cs],
                                          count_include_pad=1, name=p + "outer_pool"))
            # ring mean = (4 * outer - inner) / 3; score = sigmoid(gain * (inner - ring - contrast))
            nodes.append(helper.make_node("Mul", [p + "outer", "ring_four"], [p + "outer4"], name=p + "o4"))
            nodes.append(helper.make_node("Sub", [p + "outer4", p + "inner"], [p + "ring3"], name=p + "r3"))
            nodes.append(helper.make_node("Mul", [p + "ring3", "ring_third"], [p + "ring"], name=p + "ring_mean"))
            nodes.append(helper.make_node("Sub", [p + "inner", p + "ring"], [p + "contrast_raw"], name=p + "c"))
            nodes.append(helper.make_node("Sub", [p + "contrast_raw", "contrast"], [p + "c0"], name=p + "c0"))
            nodes.append(helper.make_node("Mul", [p + "c0", "gain"], [p + "logit"], name=p + "logit"))
            nodes.append(helper.make_node("Sigmoid", [p + "logit"], [p + "score"], name=p + "sig"))
            scores.append(p + "score")
            # box half-size in stride units: (w / stride) * sqrt(outer mean)
            const(p + "w_over_s", float(w) / stride)
            nodes.append(helper.make_node("Sqrt", [p + "outer"], [p + "sqrt_o"], name=p + "sqrt"))
            nodes.append(helper.make_node("Mul", [p + "sqrt_o", p + "w_over_s"], [p + "half"], name=p + "half"))
            # the blob's offset from the anchor, from the outer window's right (bottom) half: a b x b blob at
            # dx gives right-half mean - left-half mean = b * dx / w^2, with left = 2 * outer - right and
            # b = 2 w sqrt(outer): dx = (right - outer) * w / sqrt(outer). Every anchor on one blob then gives
            # the same box, and NMS keeps one.
            offsets = []
            for axis, pads, kernel in (("x", [k, 0, k - cs, k - cs], [2 * k, k]),
                                       ("y", [0, k, k - cs, k - cs], [k, 2 * k])):
                q = p + axis
                nodes.append(helper.make_node("AveragePool", ["cells"], [q + "hi"], kernel_shape=kernel,
                                              strides=[cs, cs], pads=pads, count_include_pad=1, name=q + "hi_pool"))
                nodes.append(helper.make_node("Sub", [q + "hi", p + "outer"], [q + "diff"], name=q + "diff"))
                nodes.append(helper.make_node("Mul", [q + "diff", p + "w_over_s"], [q + "diff_w"], name=q + "diff_w"))
                nodes.append(helper.make_node("Add", [p + "sqrt_o", "eps"], [q + "den"], name=q + "den"))
                nodes.append(helper.make_node("Div", [q + "diff_w", q + "den"], [q + "off"], name=q + "off"))
                offsets.append(q + "off")
            dx, dy = offsets
            # distances left, top, right, bottom from the anchor
            for name, a_, b_ in (("l", p + "half", dx), ("t", p + "half", dy)):
                nodes.append(helper.make_node("Sub", [a_, b_], [p + name], name=p + name))
            for name, a_, b_ in (("r", p + "half", dx), ("b", p + "half", dy)):
                nodes.append(helper.make_node("Add", [a_, b_], [p + name], name=p + name))
            nodes.append(helper.make_node("Concat", [p + "l", p + "t", p + "r", p + "b"], [p + "box"], axis=1,
                                          name=p + "box"))
            boxes.append(p + "box")
            const(p + "kps_unit", kps_unit.reshape(1, 10, 1, 1))
            nodes.append(helper.make_node("Mul", [p + "half", p + "kps_unit"], [p + "kps_c"], name=p + "kps_c"))
            nodes.append(helper.make_node("Concat", [dx, dy] * 5, [p + "kps_off"], axis=1, name=p + "kps_off"))
            nodes.append(helper.make_node("Add", [p + "kps_c", p + "kps_off"], [p + "kps"], name=p + "kps"))
            kpss.append(p + "kps")
        # (1, 2*k, H, W) -> (H*W*2, k): rows ordered by position then anchor, as SCRFD decodes them
        for group, width, outs in ((scores, 1, score_outs), (boxes, 4, box_outs), (kpss, 10, kps_outs)):
            tag = {1: "score", 4: "bbox", 10: "kps"}[width]
            cat = f"{tag}_{stride}_cat"
            nodes.append(helper.make_node("Concat", group, [cat], axis=1, name=cat))
            nodes.append(helper.make_node("Transpose", [cat], [cat + "_t"], perm=[0, 2, 3, 1], name=cat + "_t"))
            shape = f"{tag}_{stride}_shape"
            inits.append(numpy_helper.from_array(np.array([-1, width], dtype=np.int64), shape))
            out = f"{tag}_{stride}"
            nodes.append(helper.make_node("Reshape", [cat + "_t", shape], [out], name=out))
            outs.append((out, width))
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n_{name}", width])
                     for name, width in score_outs + box_outs + kps_outs]
    graph = helper.make_graph(nodes, "ipaf_tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ipadapter_fused")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def recognizer_matrix(seed: int = REC_SEED) -> np.ndarray:
    """The recognizer's (3 * 14 * 14, 512) float32 map, regenerated from its seed."""
    feats = 3 * (REC_SIZE // REC_POOL) ** 2
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((feats, EMBED_DIM)) / np.sqrt(feats)).astype(np.float32)


def recognizer_model(seed: int = REC_SEED):
    """The ArcFace-signature recognizer as an onnx ModelProto: embedding = flatten(avgpool8(x)) @ M."""
    onnx, TensorProto, helper, numpy_helper = _helpers()
    inits = [numpy_helper.from_array(recognizer_matrix(seed), "proj_weight")]
    # Node names must not start with Sub/Mul: insightface would take the model for an mxnet export and
    # feed it 0..255 pixels instead of (pixel - 127.5) / 127.5.
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[REC_POOL, REC_POOL],
                         strides=[REC_POOL, REC_POOL], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["flat", "proj_weight"], ["683"], name="proj"),
    ]
    graph = helper.make_graph(nodes, "ipaf_tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, REC_SIZE, REC_SIZE])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", EMBED_DIM])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ipadapter_fused")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def recognizer_reference(aligned_bgr: np.ndarray, seed: int = REC_SEED) -> np.ndarray:
    """The recognizer's output computed in numpy from a 112x112 BGR uint8 aligned crop (what ArcFaceONNX
    feeds: RGB, (pixel - 127.5) / 127.5, NCHW)."""
    x = (aligned_bgr[..., ::-1].astype(np.float32) - 127.5) / 127.5          # HWC RGB
    n = REC_SIZE // REC_POOL
    pooled = x.reshape(n, REC_POOL, n, REC_POOL, 3).mean(axis=(1, 3))         # (14, 14, 3)
    return pooled.transpose(2, 0, 1).reshape(-1) @ recognizer_matrix(seed)


def write_pack(folder, name: str = TINY_PACK) -> Path:
    """Write the tiny pack as <folder>/models/<name>/{det_10g,w600k_r50}.onnx (the layout of
    models/insightface) and return the pack folder. Reuses files written by the same version."""
    onnx, *_ = _helpers()
    pack = Path(folder) / "models" / name
    pack.mkdir(parents=True, exist_ok=True)
    stamp = pack / ".ipaf_tiny_faces_version"
    if stamp.is_file() and stamp.read_text().strip() == str(TINY_FACES_VERSION) \
            and (pack / DETECTOR_FILE).is_file() and (pack / RECOGNIZER_FILE).is_file():
        return pack
    for file, model in ((DETECTOR_FILE, detector_model()), (RECOGNIZER_FILE, recognizer_model())):
        tmp = pack / (file + f".tmp{os.getpid()}")
        onnx.save(model, str(tmp))
        os.replace(tmp, pack / file)
    stamp.write_text(str(TINY_FACES_VERSION))
    return pack


def draw_faces(height: int, width: int, squares, background: int = 5, value=250) -> np.ndarray:
    """An RGB uint8 image: dark background with bright squares [(x0, y0, side) or (x0, y0, side, rgb), ...],
    the "faces" the tiny detector finds. Aligned, two plain squares give the same crop; a colour of its own
    (mean brightness above ~0.85) gives a square an embedding of its own."""
    img = np.full((height, width, 3), background, dtype=np.uint8)
    for square in squares:
        x0, y0, side = square[:3]
        img[y0:y0 + side, x0:x0 + side] = square[3] if len(square) > 3 else value
    return img
