"""What the front end sees: every node input has a tooltip, defaults are valid choices,
all nodes sit under one category, and no node keeps state on its class."""
import sys
import types

import pytest


@pytest.fixture
def nodes(monkeypatch):
    fake = types.ModuleType("folder_paths")
    fake.get_filename_list = lambda folder: [f"example.{folder}.safetensors"]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    from ipadapter_fused.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    return NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def test_every_input_has_a_tooltip(nodes):
    classes, names = nodes
    assert set(classes) == set(names)
    for name, cls in classes.items():
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for inp, decl in section.items():
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{name}.{inp} has no tooltip"
                kind, opts = decl
                if isinstance(kind, list) and "default" in opts:
                    assert opts["default"] in kind, f"{name}.{inp}: default not among the choices"
                if "default" in opts and "min" in opts:
                    assert opts["min"] <= opts["default"] <= opts["max"]


def test_one_category_and_no_class_state(nodes):
    classes, _ = nodes
    assert {cls.CATEGORY for cls in classes.values()} == {"ipadapter_fused"}
    for cls in classes.values():
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.DESCRIPTION
        own = {k for k, v in vars(cls).items() if not k.startswith("__") and not callable(v)
               and not isinstance(v, (classmethod, staticmethod))}
        assert own <= {"DESCRIPTION", "CATEGORY", "RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "FUNCTION"}, own


def test_weight_types_cover_the_established_list(nodes):
    classes, _ = nodes
    choices = classes["IPAdapterFusedApply"].INPUT_TYPES()["required"]["weight_type"][0]
    established = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                   "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                   "style and composition", "style transfer precise", "composition precise"]
    assert all(w in choices for w in established) and "custom" in choices


def _fake_folder_paths(monkeypatch, known, models_dir="/models"):
    fake = types.ModuleType("folder_paths")
    fake.models_dir = models_dir
    fake.folder_names_and_paths = dict(known)

    def add_model_folder_path(name, path, is_default=False):
        paths, exts = fake.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.append(path)

    fake.add_model_folder_path = add_model_folder_path
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return fake


def test_folder_registration_keeps_user_paths(monkeypatch, tmp_path):
    from ipadapter_fused.nodes.loaders import register_folder

    models = tmp_path / "models"
    fake = _fake_folder_paths(monkeypatch, {"ipadapter": (["/shared/ipadapter"], {".safetensors"})}, str(models))
    register_folder()
    paths, exts = fake.folder_names_and_paths["ipadapter"]
    assert paths == ["/shared/ipadapter", str(models / "ipadapter")]
    assert {".safetensors", ".bin"} <= set(exts)
    assert (models / "ipadapter").is_dir()  # created at startup, where the user looks for it

    fake = _fake_folder_paths(monkeypatch, {}, str(models))
    register_folder()
    register_folder()  # loading twice adds nothing
    assert fake.folder_names_and_paths["ipadapter"][0] == [str(models / "ipadapter")]


def test_folder_registration_survives_a_read_only_models_dir(monkeypatch, tmp_path):
    from ipadapter_fused.nodes.loaders import register_folder

    blocker = tmp_path / "models"
    blocker.write_text("a file where the models folder would be")  # makedirs fails as on a read-only install
    fake = _fake_folder_paths(monkeypatch, {"ipadapter": (["/shared/ipadapter"], {".safetensors"})}, str(blocker))
    register_folder()
    assert fake.folder_names_and_paths["ipadapter"][0] == ["/shared/ipadapter", str(blocker / "ipadapter")]
