"""Face analysis through the real insightface package (detection decoding, NMS, alignment, recognition)
on the tiny ONNX models of tools/ipaf_runner/tiny_faces.py: a detector with SCRFD's signature that finds
bright squares, and a recognizer with ArcFace's signature computing a known linear map.

References are computed independently: where the squares were drawn, the map applied in numpy to a crop
aligned here with insightface's norm_crop."""
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("insightface.app")

from insightface.utils import face_align  # noqa: E402

from ipadapter_fused.face.analysis import (  # noqa: E402
    DetectOptions, FaceAnalysisModel, detection_sizes, load_face_analysis)
from ipadapter_fused.face.install import FaceSetupError, available_providers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ipaf_runner import tiny_faces  # noqa: E402
from ipaf_runner.tiny_faces import draw_faces  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-image's estimate() in norm_crop


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return tiny_faces.write_pack(tmp_path_factory.mktemp("insightface"))


@pytest.fixture(scope="module")
def model(pack) -> FaceAnalysisModel:
    return load_face_analysis(str(pack), "CPU", DetectOptions())


def _batch(*images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).float() / 255.0


def _assert_box(face, x0, y0, side):
    cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
    tol = 0.04 * side + 2
    assert abs(cx - (x0 + side / 2)) < tol and abs(cy - (y0 + side / 2)) < tol, (face.bbox, (x0, y0, side))
    w, h = face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1]
    assert 0.9 * side < w < 1.12 * side and 0.9 * side < h < 1.12 * side, (face.bbox, side)


# Two "faces" of different sizes in a 256x320 image (at detection size 640: scale 2)
BIG, SMALL = (60, 70, 48), (220, 150, 24)
TWO = draw_faces(256, 320, [BIG, SMALL])


def test_faces_are_found_where_they_were_drawn(model):
    faces = model.detect(np.ascontiguousarray(TWO[..., ::-1]), 640)
    assert len(faces) == 2
    for (bbox, kps, score), where in zip(faces, (BIG, SMALL)):   # largest first
        assert score >= 0.5
        _assert_box(type("F", (), {"bbox": bbox})(), *where)
        x0, y0, side = where
        # the five keypoints lie inside the square, eyes above the nose above the mouth
        assert np.all((kps >= [x0, y0]) & (kps <= [x0 + side, y0 + side]))
        assert kps[0, 1] < kps[2, 1] < kps[3, 1] and kps[0, 0] < kps[1, 0]


def test_one_box_per_square_across_the_detectors_size_range(model):
    # BLOB_SIZE_RANGE (detection pixels) is what callers size their pictures by
    lo, hi = tiny_faces.BLOB_SIZE_RANGE
    for side in (lo, 33, 57, 90, 131, hi):
        for off in (0, 11):
            x0, y0 = 200 + off, 150 + 2 * off
            bgr = np.ascontiguousarray(draw_faces(640, 640, [(x0, y0, side)])[..., ::-1])
            found = model.detect(bgr, 640)
            assert len(found) == 1, (side, off, [f[0] for f in found])
            _assert_box(type("F", (), {"bbox": found[0][0]})(), x0, y0, side)
    for side in (lo - 8, int(hi * 1.2)):
        assert model.detect(np.ascontiguousarray(draw_faces(640, 640, [(150, 150, side)])[..., ::-1]), 640) == []


def test_largest_face_by_default_or_the_index(model):
    images = _batch(TWO, draw_faces(256, 320, [SMALL, (150, 20, 64)]))
    largest = model.find_faces(images)
    assert [f.image_index for f in largest] == [0, 1]
    _assert_box(largest[0], *BIG)
    _assert_box(largest[1], 150, 20, 64)
    second = model.with_options(DetectOptions(pick="index", index=1)).find_faces(images)
    _assert_box(second[0], *SMALL)
    _assert_box(second[1], *SMALL)
    assert all(f.det_size == 640 for f in largest + second)


def test_embedding_is_the_recognizer_on_the_aligned_crop(model):
    # squares of two colours: aligned, plain squares of one colour would give the same crop
    two = draw_faces(256, 320, [BIG + ((250, 250, 250),), SMALL + ((255, 205, 230),)])
    faces = model.find_faces(_batch(two)) + model.with_options(DetectOptions(pick="index", index=1)).find_faces(_batch(two))
    bgr = np.ascontiguousarray(two[..., ::-1])
    refs = []
    for face in faces:
        crop = face_align.norm_crop(bgr, landmark=face.kps, image_size=112)
        ref = tiny_faces.recognizer_reference(crop)
        assert face.embedding.dtype == torch.float32 and face.embedding.shape == (512,)
        np.testing.assert_allclose(face.embedding.numpy(), ref, rtol=1e-4, atol=1e-4)
        assert abs(float(face.embedding.norm()) - 1.0) > 0.05   # raw, not normed
        refs.append(ref)
    cos = float(refs[0] @ refs[1] / np.linalg.norm(refs[0]) / np.linalg.norm(refs[1]))
    assert cos < 0.99   # different crops, different embeddings


def test_a_face_too_large_for_640_is_found_at_a_smaller_detection_size(model):
    big = (48, 48, 160)   # 400 px at 640: larger than the detector's largest window
    image = draw_faces(256, 256, [big])
    bgr = np.ascontiguousarray(image[..., ::-1])
    assert model.detect(bgr, 640) == []
    first_hit = next(s for s in detection_sizes(640) if model.detect(bgr, s))
    assert first_hit < 640
    face, = model.find_faces(_batch(image))
    assert face.det_size == first_hit
    _assert_box(face, *big)


def test_no_face_is_a_clear_error_naming_the_image(model):
    blank = np.full((256, 320, 3), 5, np.uint8)
    images = _batch(TWO, TWO, blank, TWO)
    with pytest.raises(ValueError, match=r"no face found in image 3 of 4 \(tried detection sizes 640, 576, 512, "
                                         r"448, 384, 320, 256\).*'skip image'"):
        model.find_faces(images)


def test_skip_leaves_the_image_out_and_none_at_all_is_still_an_error(model, caplog):
    blank = np.full((256, 320, 3), 5, np.uint8)
    skip = model.with_options(DetectOptions(on_missing="skip"))
    with caplog.at_level(logging.WARNING, logger="ipadapter_fused.face"):
        faces = skip.find_faces(_batch(TWO, TWO, blank, TWO))
    assert [f.image_index for f in faces] == [0, 1, 3]
    assert any("image 3 of 4" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"no usable face in any of the 2 image\(s\)"):
        skip.find_faces(_batch(blank, blank))


def test_face_index_beyond_the_faces_found(model):
    one = draw_faces(256, 320, [BIG])
    with pytest.raises(ValueError, match=r"image 1 of 1 has at most 1 face\(s\) but face index 2"):
        model.with_options(DetectOptions(pick="index", index=2, det_size=320)).find_faces(_batch(one))


def test_aligned_crops_are_norm_crop_of_the_rgb_image(model):
    images = _batch(TWO, draw_faces(256, 320, [(150, 20, 64)]))
    faces = model.find_faces(images)
    crops = model.aligned_crops(images, faces, 224)
    assert crops.shape == (2, 224, 224, 3) and crops.dtype == torch.float32
    rgb = (images * 255).to(torch.uint8).numpy()
    for crop, face in zip(crops, faces):
        ref = face_align.norm_crop(rgb[face.image_index], landmark=face.kps, image_size=224) / 255.0
        np.testing.assert_allclose(crop.numpy(), ref, atol=1e-6)
        assert float(crop[80:150, 80:150].mean()) > 0.9   # the bright "face" fills the middle of the crop
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        model.aligned_crops(images, faces, 200)


def test_rgba_and_options_validation(model):
    rgba = torch.cat([_batch(TWO), torch.ones(1, 256, 320, 1)], dim=-1)
    face, = model.find_faces(rgba)
    _assert_box(face, *BIG)
    for bad in (dict(pick="biggest"), dict(on_missing="ignore"), dict(index=-1), dict(det_size=600)):
        with pytest.raises(ValueError):
            DetectOptions(**bad)
    assert detection_sizes(640) == [640, 576, 512, 448, 384, 320, 256]
    assert detection_sizes(320) == [320, 256] and detection_sizes(224) == [224]


def test_loads_are_shared_and_an_unavailable_provider_runs_on_cpu(pack, model, caplog):
    again = load_face_analysis(str(pack), "CPU", DetectOptions(on_missing="skip"))
    assert again.app is model.app and again.options.on_missing == "skip" and model.options.on_missing == "error"
    missing = next(p for p in ("CUDA", "TensorRT", "ROCM", "OpenVINO")
                   if p + "ExecutionProvider" not in available_providers())
    with caplog.at_level(logging.INFO, logger="ipadapter_fused.face"):
        fallback = load_face_analysis(str(pack), missing, DetectOptions())
    assert fallback.provider == "CPU"
    lines = [r.getMessage() for r in caplog.records if r.name == "ipadapter_fused.face"]
    assert len(lines) == 1 and missing in lines[0] and "running on CPU" in lines[0]
    face, = fallback.find_faces(_batch(draw_faces(256, 320, [BIG])))
    _assert_box(face, *BIG)


def test_wrong_layout_is_refused_before_insightface_runs(pack, tmp_path):
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for f in pack.glob("*.onnx"):
        shutil.copy(f, nested / f.name)
    with pytest.raises(FaceSetupError, match="one folder too deep"):
        load_face_analysis(str(tmp_path / "models" / "antelopev2"), "CPU", DetectOptions())
