"""The face nodes: models/insightface registration, the pack list and its diagnosis before a run, the
loader's options, and the aligned crops output."""
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ipaf_runner import tiny_faces  # noqa: E402


def _fake_folder_paths(monkeypatch, models_dir, known=None):
    fake = types.ModuleType("folder_paths")
    fake.models_dir = str(models_dir)
    fake.folder_names_and_paths = dict(known or {})

    def add_model_folder_path(name, path, is_default=False):
        paths, _ = fake.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.append(path)

    fake.add_model_folder_path = add_model_folder_path
    fake.get_folder_paths = lambda name: list(fake.folder_names_and_paths[name][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return fake


def test_insightface_folder_is_registered_keeping_user_paths(monkeypatch, tmp_path):
    from ipadapter_fused.nodes.face_nodes import register_folder
    models = tmp_path / "models"
    fake = _fake_folder_paths(monkeypatch, models, {"insightface": (["/shared/insightface"], {".onnx"})})
    register_folder()
    register_folder()
    assert fake.folder_names_and_paths["insightface"][0] == ["/shared/insightface", str(models / "insightface")]
    assert (models / "insightface" / "models").is_dir()
    fake = _fake_folder_paths(monkeypatch, models)
    register_folder()
    assert fake.folder_names_and_paths["insightface"][0] == [str(models / "insightface")]


@pytest.fixture
def host_models(monkeypatch, tmp_path):
    from ipadapter_fused.nodes.face_nodes import register_folder
    user = tmp_path / "user_insightface"          # an extra_model_paths.yaml entry
    fake = _fake_folder_paths(monkeypatch, tmp_path / "models", {"insightface": ([str(user)], {".onnx"})})
    register_folder()
    return fake, user, tmp_path / "models" / "insightface"


def test_pack_list_and_diagnosis_before_the_run(host_models):
    pytest.importorskip("onnx")
    from ipadapter_fused.nodes.face_nodes import IPAdapterFusedInsightFaceLoader as Loader
    _, user, default = host_models
    pack = tiny_faces.write_pack(user, "buffalo_l")
    nested = default / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for f in pack.glob("*.onnx"):
        shutil.copy(f, nested / f.name)
    required = Loader.INPUT_TYPES()["required"]
    assert required["model_pack"][0] == ["antelopev2", "buffalo_l"]
    assert required["provider"][0][:3] == ["auto", "CPU", "CUDA"]
    assert Loader.VALIDATE_INPUTS("buffalo_l", "auto", 640) is True
    msg = Loader.VALIDATE_INPUTS("antelopev2", "CPU", 640)
    assert "one folder too deep" in msg and nested.as_posix() in msg
    assert "multiple of 32" in Loader.VALIDATE_INPUTS("buffalo_l", "auto", 600)
    # a provider this onnxruntime does not offer (saved elsewhere) passes: it runs on the CPU at load
    assert "TensorRT" not in required["provider"][0]
    assert Loader.VALIDATE_INPUTS("buffalo_l", "TensorRT", 640) is True


def test_no_pack_anywhere_still_offers_the_known_names(host_models):
    from ipadapter_fused.nodes.face_nodes import IPAdapterFusedInsightFaceLoader as Loader
    assert Loader.INPUT_TYPES()["required"]["model_pack"][0] == ["buffalo_l", "antelopev2"]
    assert "does not download itself" in Loader.VALIDATE_INPUTS("buffalo_l", "auto", 640)


def test_loader_and_crops_nodes(host_models):
    pytest.importorskip("insightface.app")
    from ipadapter_fused.face.analysis import FaceAnalysisModel
    from ipadapter_fused.nodes.face_nodes import IPAdapterFusedFaceCrops as Crops
    from ipadapter_fused.nodes.face_nodes import IPAdapterFusedInsightFaceLoader as Loader
    _, user, _ = host_models
    tiny_faces.write_pack(user, "buffalo_l")
    face, = Loader().load("buffalo_l", "CPU", 320, "by index", 1, "skip image")
    assert isinstance(face, FaceAnalysisModel) and face.provider == "CPU"
    assert (face.options.pick, face.options.index, face.options.on_missing, face.options.det_size) == \
        ("index", 1, "skip", 320)
    assert Path(face.model_dir) == user / "models" / "buffalo_l"
    big, small = (60, 70, 48), (220, 150, 24)
    images = torch.from_numpy(np.stack([tiny_faces.draw_faces(256, 320, [big, small]),
                                        tiny_faces.draw_faces(256, 320, [big])])).float() / 255
    crops, = Crops().crop(face, images, 224)
    assert crops.shape == (1, 224, 224, 3)   # image 2 has no second face: skipped
    faces = face.find_faces(images)
    torch.testing.assert_close(crops, face.aligned_crops(images, faces, 224))
    # the crop is of the smaller square (index 1): the aligned face's bright area matches its keypoints
    kps = faces[0].kps
    assert small[0] <= kps[:, 0].min() and kps[:, 0].max() <= small[0] + small[2]
    assert Crops.VALIDATE_INPUTS(256) is True and Crops.VALIDATE_INPUTS(336) is True
    assert "multiple of 112 or 128" in Crops.VALIDATE_INPUTS(240)
