"""bench/bench_face_analysis.py runs end to end (its quick settings) and records what it measured on."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("insightface.app")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quick_run_writes_the_table_and_json(tmp_path, capsys):
    import bench_face_analysis
    out = tmp_path / "face.json"
    assert bench_face_analysis.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["provider"] == "CPU" and result["det_size"] == 640 and result["cores"] >= 1
    assert result["cpu"] and result["insightface"] and result["onnxruntime"]
    assert result["detection_sizes"] == [640, 576, 512, 448, 384, 320, 256]
    names = list(result["cases"])
    assert names[0] == "find_faces, face found at 640"
    retry = [n for n in names if n.endswith("(retries)")]
    assert retry and int(retry[0].split(" at ")[1].split()[0]) < 640   # the big face needed a smaller size
    for case in result["cases"].values():
        assert case["ms"] > 0 and case["repeats"] == 2
    # one detection per try: trying all 7 sizes costs more than the one that finds the face at once
    assert result["cases"]["no face: all 7 sizes tried, error"]["cpu_ms"] > \
        result["cases"]["  of which detection at 640"]["cpu_ms"]
    assert "| find_faces, face found at 640 |" in capsys.readouterr().out
