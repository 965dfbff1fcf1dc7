"""The apply node's face choices that a checkpoint's keys cannot settle (nodes/encoders.py): which identity
embedding a family reads, and FaceID Plus V1/V2, from the option, the file name, or the family's default."""
from __future__ import annotations

import pytest

from ipadapter_fused.models.synthetic import face_adapter_spec
from ipadapter_fused.nodes.encoders import FACE_STRUCTURE, FaceOptions, _face_embedding_mode, shortcut_scale


@pytest.mark.parametrize("kind,arch,want", [("faceid", "sd15", "normed"), ("portrait", "sdxl", "normed"),
                                            ("faceid-plus", "sdxl", "normed"), ("face-resampler", "sdxl", "raw"),
                                            ("kolors-faceid-plus", "kolors", "raw")])
def test_embedding_follows_the_family_unless_forced(kind, arch, want):
    spec = face_adapter_spec(kind, arch)
    assert _face_embedding_mode(spec, FaceOptions()) == want
    other = "raw" if want == "normed" else "normed"
    assert _face_embedding_mode(spec, FaceOptions(embedding=other)) == other


@pytest.mark.parametrize("name,structure,want", [
    ("ip-adapter-faceid-plusv2_sd15.bin", "auto", 1.5),
    ("ip-adapter-faceid-plus_sd15.bin", "auto", None),
    ("my_face_model.safetensors", "auto", 1.5),          # renamed: the published default, V2
    ("ip-adapter-faceid-plusv2_sd15.bin", FACE_STRUCTURE[2], None),
    ("ip-adapter-faceid-plus_sd15.bin", FACE_STRUCTURE[1], 1.5),
])
def test_faceid_plus_structure(name, structure, want):
    spec = face_adapter_spec("faceid-plus", "sd15")
    options = FaceOptions(structure=structure, structure_weight=1.5, adapter_name=name)
    assert shortcut_scale(spec, options) == want


def test_structure_only_where_the_family_has_a_shortcut():
    assert shortcut_scale(face_adapter_spec("faceid", "sd15"), FaceOptions(structure=FACE_STRUCTURE[1])) is None
    kolors = face_adapter_spec("kolors-faceid-plus", "kolors")
    assert shortcut_scale(kolors, FaceOptions(structure=FACE_STRUCTURE[2], structure_weight=0.7)) == 0.7  # always on
