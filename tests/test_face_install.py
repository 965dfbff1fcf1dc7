"""The optional face packages: package-mix detection, install hints, provider choice and fallback, and
the pack importing (other nodes working) without insightface / onnxruntime."""
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipadapter_fused.face import install
from ipadapter_fused.face.install import FaceSetupError, choose_providers

ROOT = Path(__file__).resolve().parents[1]


class _FakeDist:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


def _fake_distributions(monkeypatch, *dists):
    fakes = [_FakeDist(n, v) for n, v in dists] + [_FakeDist("numpy", "2.0"), _FakeDist("insightface", "0.7.3")]
    monkeypatch.setattr(install.importlib.metadata, "distributions", lambda: iter(fakes))


def test_mix_of_cpu_and_gpu_builds_is_reported_with_the_repair(monkeypatch):
    _fake_distributions(monkeypatch, ("onnxruntime", "1.18.0"), ("onnxruntime_gpu", "1.18.1"))
    msg = install.onnxruntime_mix_problem()
    assert msg is not None
    assert "onnxruntime 1.18.0" in msg and "onnxruntime-gpu 1.18.1" in msg
    assert "GPU build silently loses" in msg
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in msg
    assert msg.rstrip(".").split("&&")[1].strip().split("`")[0].endswith("pip install onnxruntime-gpu")


@pytest.mark.parametrize("dists", [[("onnxruntime", "1.18.0")], [("onnxruntime-gpu", "1.18.0")], []])
def test_one_build_is_no_mix(monkeypatch, dists):
    _fake_distributions(monkeypatch, *dists)
    assert install.onnxruntime_mix_problem() is None


def test_other_build_pairs_are_a_mix_too(monkeypatch):
    _fake_distributions(monkeypatch, ("onnxruntime-directml", "1.17"), ("onnxruntime", "1.17"))
    msg = install.onnxruntime_mix_problem()
    assert "onnxruntime-directml 1.17" in msg and "pip uninstall -y onnxruntime onnxruntime-directml" in msg


def test_mix_is_read_from_the_real_metadata():
    # Whatever this environment holds, the check agrees with its own listing.
    found = install.installed_onnxruntime_distributions()
    assert (install.onnxruntime_mix_problem() is None) == (len(found) < 2)


def test_missing_packages_name_what_to_install(monkeypatch):
    real = install.importlib.util.find_spec
    monkeypatch.setattr(install.importlib.util, "find_spec",
                        lambda name, *a: None if name == "insightface" else real(name, *a))
    assert install.missing_packages() == ["insightface"] or install.missing_packages() == ["insightface", "onnxruntime"]
    with pytest.raises(FaceSetupError) as err:
        install.require_face_packages()
    msg = str(err.value)
    assert "insightface" in msg and "requirements-face.txt" in msg and "[faceid]" in msg and "onnxruntime-gpu" in msg


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def test_unavailable_provider_falls_back_to_cpu_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="ipadapter_fused.face"):
        providers, running = choose_providers("CUDA", available=[CPU])
    assert providers == [CPU] and running == "CPU"
    lines = [r for r in caplog.records if r.name == "ipadapter_fused.face"]
    assert len(lines) == 1
    assert "CUDA" in lines[0].getMessage() and "running on CPU" in lines[0].getMessage()
    assert "onnxruntime-gpu" in lines[0].getMessage()


def test_auto_prefers_the_gpu_and_keeps_cpu_behind_it(caplog):
    with caplog.at_level(logging.INFO, logger="ipadapter_fused.face"):
        assert choose_providers("auto", available=[CPU, CUDA]) == ([CUDA, CPU], "CUDA")
        assert choose_providers("auto", available=[CPU]) == ([CPU], "CPU")
        assert choose_providers("CPU", available=[CPU, CUDA]) == ([CPU], "CPU")
        assert choose_providers("OpenVINO", available=["OpenVINOExecutionProvider", CPU]) == \
            (["OpenVINOExecutionProvider", CPU], "OpenVINO")
        # ComfyUI_IPAdapter_plus's names for the same providers
        assert choose_providers("DirectML", available=["DmlExecutionProvider", CPU]) == \
            (["DmlExecutionProvider", CPU], "Dml")
        assert choose_providers("auto", available=["DmlExecutionProvider", CPU]) == \
            (["DmlExecutionProvider", CPU], "Dml")
    assert not [r for r in caplog.records if r.name == "ipadapter_fused.face"]


def test_provider_choices_list_what_onnxruntime_reports(monkeypatch):
    monkeypatch.setattr(install, "available_providers", lambda: ["TensorrtExecutionProvider", CUDA, CPU])
    assert install.provider_choices() == ["auto", "CPU", "CUDA", "Tensorrt"]
    monkeypatch.setattr(install, "available_providers", lambda: [])
    assert install.provider_choices() == ["auto", "CPU", "CUDA"]


def test_pack_imports_and_face_nodes_explain_without_the_face_packages(tmp_path):
    """A Python where insightface, onnxruntime and onnx do not import: the pack imports with all its nodes,
    and the face loader says what to install."""
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    for f in ("det_10g.onnx", "w600k_r50.onnx"):
        (pack / f).write_bytes(b"not used")
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        BLOCK = {{"insightface", "onnxruntime", "onnx"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCK:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location("ipadapter_fused", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["ipadapter_fused"] = mod; spec.loader.exec_module(mod)
        names = mod.NODE_CLASS_MAPPINGS
        assert "IPAdapterFusedLoader" in names and "IPAdapterFusedApply" in names, sorted(names)
        loader = names["IPAdapterFusedInsightFaceLoader"]
        assert "model_pack" in loader.INPUT_TYPES()["required"]
        from ipadapter_fused.face.install import missing_packages, FaceSetupError
        assert missing_packages() == ["insightface", "onnxruntime"], missing_packages()
        from ipadapter_fused.face.analysis import DetectOptions, load_face_analysis
        try:
            load_face_analysis({str(pack)!r}, "auto", DetectOptions())
        except FaceSetupError as exc:
            print("ERROR:", exc)
        msg = loader.VALIDATE_INPUTS("buffalo_l", "auto", 640)
        print("VALIDATE:", msg)
        assert not any(m.split(".")[0] in BLOCK for m in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    err_line = [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR:")]
    assert err_line and "insightface, onnxruntime" in err_line[0] and "requirements-face.txt" in err_line[0]
    validate = [ln for ln in out.stdout.splitlines() if ln.startswith("VALIDATE:")][0]
    assert "pip install -r" in validate and "requirements-face.txt" in validate
