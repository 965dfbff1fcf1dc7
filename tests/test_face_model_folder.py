"""InsightFace model packs on disk: listing, and the wrong layouts users end up with, each diagnosed with
the move that fixes it (files are placeholders: the diagnosis reads names, or ONNX signatures for
unknown names)."""
import zipfile
from pathlib import Path

import pytest

from ipadapter_fused.face.install import FaceSetupError
from ipadapter_fused.face.model_folder import diagnose, diagnose_roots, find_model_packs, model_role, resolve_pack

BUFFALO = ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx")
ANTELOPE = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")


def _files(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"placeholder")
    return folder


def test_good_packs_pass_and_are_listed(tmp_path):
    _files(tmp_path / "models" / "buffalo_l", BUFFALO)
    _files(tmp_path / "models" / "antelopev2", ANTELOPE)
    assert diagnose(str(tmp_path), "buffalo_l") is None
    assert diagnose(str(tmp_path), "antelopev2") is None
    assert find_model_packs([str(tmp_path)]) == ["antelopev2", "buffalo_l"]
    assert resolve_pack([str(tmp_path)], "antelopev2") == str(tmp_path / "models" / "antelopev2")


def test_nested_folder_from_the_zip(tmp_path):
    _files(tmp_path / "models" / "antelopev2" / "antelopev2", ANTELOPE)
    msg = diagnose(str(tmp_path), "antelopev2")
    assert "one folder too deep" in msg and "assert 'detection' in self.models" in msg
    assert f"Move the .onnx files up into {(tmp_path / 'models' / 'antelopev2').as_posix()}/" in msg
    assert find_model_packs([str(tmp_path)]) == ["antelopev2"]


@pytest.mark.parametrize("where", ["models", "root", "inside"])
def test_zip_not_unpacked(tmp_path, where):
    folder = {"models": tmp_path / "models", "root": tmp_path, "inside": tmp_path / "models" / "antelopev2"}[where]
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "antelopev2.zip", "w") as z:
        z.writestr("antelopev2/scrfd_10g_bnkps.onnx", b"x")
    msg = diagnose(str(tmp_path), "antelopev2")
    assert "not unpacked" in msg and "antelopev2.zip" in msg
    assert (tmp_path / "models" / "antelopev2").as_posix() + "/" in msg
    assert "antelopev2" in find_model_packs([str(tmp_path)])


@pytest.mark.parametrize("level", ["models", "root"])
def test_onnx_files_one_level_too_high(tmp_path, level):
    folder = tmp_path / "models" if level == "models" else tmp_path
    _files(folder, BUFFALO)
    msg = diagnose(str(tmp_path), "buffalo_l")
    assert "one level too high" in msg and f"directly in {folder.as_posix()}/" in msg
    assert f"Move them into {(tmp_path / 'models' / 'buffalo_l').as_posix()}/" in msg


def test_pack_folder_missing_the_models_level(tmp_path):
    _files(tmp_path / "buffalo_l", BUFFALO)
    msg = diagnose(str(tmp_path), "buffalo_l")
    assert "move the folder" in msg and (tmp_path / "models" / "buffalo_l").as_posix() in msg
    assert find_model_packs([str(tmp_path)]) == ["buffalo_l"]


def test_pack_without_detection_or_recognition_model(tmp_path):
    _files(tmp_path / "models" / "buffalo_l", ("1k3d68.onnx", "2d106det.onnx", "w600k_r50.onnx"))
    msg = diagnose(str(tmp_path), "buffalo_l")
    assert "no face detection model" in msg and "assert 'detection' in self.models" in msg
    _files(tmp_path / "models" / "antelopev2", ("scrfd_10g_bnkps.onnx", "genderage.onnx"))
    assert "no face recognition model" in diagnose(str(tmp_path), "antelopev2")
    (tmp_path / "models" / "empty").mkdir()
    assert "holds no .onnx files" in diagnose(str(tmp_path), "empty")


def test_missing_pack_never_downloads(tmp_path):
    msg = diagnose(str(tmp_path), "buffalo_l")
    assert "does not download itself" in msg and (tmp_path / "models" / "buffalo_l").as_posix() in msg
    assert list(tmp_path.iterdir()) == []


def test_several_roots(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _files(a / "models" / "antelopev2" / "antelopev2", ANTELOPE)
    _files(b / "models" / "antelopev2", ANTELOPE)
    assert diagnose_roots([str(a), str(b)], "antelopev2") is None
    assert resolve_pack([str(a), str(b)], "antelopev2") == str(b / "models" / "antelopev2")
    # only a wrong layout anywhere: its specific diagnosis, not "not found"
    assert "one folder too deep" in diagnose_roots([str(b / "nothing"), str(a)], "antelopev2")
    with pytest.raises(FaceSetupError, match="one folder too deep"):
        resolve_pack([str(a)], "antelopev2")
    assert "any insightface folder" in diagnose_roots([str(a), str(b)], "buffalo_s")


def test_unknown_file_names_are_routed_by_their_onnx_signature(tmp_path):
    pytest.importorskip("onnx")
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from ipaf_runner import tiny_faces
    pack = tmp_path / "models" / "custom"
    pack.mkdir(parents=True)
    import onnx
    onnx.save(tiny_faces.detector_model(), str(pack / "my_detector.onnx"))
    assert model_role(str(pack / "my_detector.onnx")) == "detection"
    assert "no face recognition model" in diagnose(str(tmp_path), "custom")
    onnx.save(tiny_faces.recognizer_model(), str(pack / "my_recognizer.onnx"))
    assert model_role(str(pack / "my_recognizer.onnx")) == "recognition"
    assert diagnose(str(tmp_path), "custom") is None
