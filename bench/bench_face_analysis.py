"""Face analysis time per image on the CPU provider at the default detection size (640), through the real
insightface package: detection, the pick, the embedding, and the aligned crop, plus what the retries at
smaller detection sizes cost when the first try finds nothing.

The real buffalo_l / antelopev2 packs are not on this machine (and nothing downloads them), so this runs
the tiny SCRFD- and ArcFace-signature models of tools/ipaf_runner/tiny_faces.py: the figures are the
pipeline's own cost (image conversion, insightface's resize/pad, decoding, NMS, alignment, onnxruntime
calls) plus tiny nets. det_10g.onnx adds roughly 10 GFLOPs per 640x640 detection and w600k_r50 about
6 GFLOPs per face on top of these; rerun with `--pack <folder of a real pack>` where one is installed.

    python bench/bench_face_analysis.py                 # JSON: bench/results/face_analysis_cpu_<arch>.json
    python bench/bench_face_analysis.py --quick --out x.json

Each case runs `--repeats` times after one warm-up call (the first call of a detection size builds its
onnxruntime session; that cost is reported apart as `cold`); times are medians, with the process CPU time
(time.process_time, which leaves out waits for a core) beside the wall time."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tools", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_regions import BUSY_LOAD, _load_pack  # noqa: E402  (the pack imported by path, the quiet-machine bound)
from bench_server import cpu_model  # noqa: E402


def _timed(fn, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"ms": 1000 * statistics.median(walls), "ms_min": 1000 * min(walls), "cpu_ms": 1000 * statistics.median(cpus),
            "repeats": repeats}


def run(pack_dir: Path | None, repeats: int, height: int, width: int, det_size: int) -> dict:
    import numpy as np
    import torch
    import insightface
    import onnxruntime
    from ipaf_runner import tiny_faces
    _load_pack()
    from ipadapter_fused.face.analysis import DetectOptions, detection_sizes, load_face_analysis

    tiny = pack_dir is None
    if tiny:
        pack_dir = tiny_faces.write_pack(Path(tempfile.mkdtemp(prefix="ipaf_face_bench_")))
    t0 = time.perf_counter()
    model = load_face_analysis(str(pack_dir), "CPU", DetectOptions(det_size=det_size))
    load_ms = 1000 * (time.perf_counter() - t0)

    def image(squares):
        return torch.from_numpy(tiny_faces.draw_faces(height, width, squares))[None].float() / 255

    scale = min(det_size / height, det_size / width)
    side = int(96 / scale)                              # a face of 96 px at the detection size
    face_img = image([(width // 3, height // 4, side), (2 * width // 3, height // 2, side // 2)])
    big = int(min(height, width) * 0.62)                # too large for the tiny detector at det_size
    big_img = image([((width - big) // 2, (height - big) // 2, big)])
    blank = image([])
    sizes = detection_sizes(det_size)
    bgr = np.ascontiguousarray((face_img[0] * 255).to(torch.uint8).numpy()[..., ::-1])
    skip = model.with_options(DetectOptions(det_size=det_size, on_missing="skip"))

    def no_face():
        try:
            model.find_faces(blank)
        except ValueError:
            pass

    cold = {}
    for s in sizes:                                      # the first call per size builds its session
        t0 = time.perf_counter()
        model.detect(bgr, s)
        cold[s] = 1000 * (time.perf_counter() - t0)
    big_found = model.find_faces(big_img)[0].det_size if not tiny else None
    if tiny:
        big_found = model.find_faces(big_img)[0].det_size
    faces = model.find_faces(face_img)
    cases = {
        f"find_faces, face found at {det_size}": _timed(lambda: model.find_faces(face_img), repeats),
        f"  of which detection at {det_size}": _timed(lambda: model.detect(bgr, det_size), repeats),
        "  of which embedding (align 112 + recognizer)":
            _timed(lambda: model.embed(bgr, faces[0].bbox, faces[0].kps, faces[0].det_score), repeats),
        "aligned crop 224 (Face Crops)": _timed(lambda: model.aligned_crops(face_img, faces, 224), repeats),
        f"find_faces, face found at {big_found} (retries)": _timed(lambda: model.find_faces(big_img), repeats),
        f"no face: all {len(sizes)} sizes tried, error": _timed(no_face, repeats),
        "no face, skip image (next to a face)": _timed(lambda: skip.find_faces(torch.cat([face_img, blank])), repeats),
    }
    load = os.getloadavg()
    return {
        "device": "cpu", "provider": model.provider, "cpu": cpu_model(), "cores": os.cpu_count(),
        "python": platform.python_version(), "insightface": insightface.__version__,
        "onnxruntime": onnxruntime.__version__, "torch_threads": torch.get_num_threads(),
        "models": "tiny (tools/ipaf_runner/tiny_faces.py)" if tiny else str(pack_dir),
        "image": [height, width], "det_size": det_size, "detection_sizes": sizes,
        "load_ms": load_ms, "cold_detect_ms": cold, "cases": cases, "loadavg_end": list(load),
    }


def format_table(result: dict) -> str:
    lines = [f"face analysis per image, {result['provider']} provider, {result['models']}, image "
             f"{result['image'][0]}x{result['image'][1]}, det_size {result['det_size']}",
             f"{result['cpu']} ({result['cores']} cores), insightface {result['insightface']}, onnxruntime "
             f"{result['onnxruntime']}, load average {result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}",
             "", "| case | ms (median) | ms (min) | CPU ms |", "|---|---|---|---|"]
    for name, c in result["cases"].items():
        lines.append(f"| {name} | {c['ms']:.1f} | {c['ms_min']:.1f} | {c['cpu_ms']:.1f} |")
    lines.append("")
    lines.append(f"load {result['load_ms']:.0f} ms; first call per detection size (session build): "
                 + ", ".join(f"{s}: {ms:.0f} ms" for s, ms in result["cold_detect_ms"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path, default=None, help="a real pack folder (e.g. .../models/buffalo_l); "
                                                            "default: the tiny models")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--det-size", type=int, default=640)
    ap.add_argument("--quick", action="store_true", help="2 repeats on a 256x320 image")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="", help="a note on the machine kept in the JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.height, args.width = 2, 256, 320
    warnings.filterwarnings("ignore", category=FutureWarning)   # scikit-image's estimate() in norm_crop
    load_start = os.getloadavg()
    result = run(args.pack, args.repeats, args.height, args.width, args.det_size)
    result["loadavg_start"] = list(load_start)
    busy = max(load_start[0], result["loadavg_end"][0]) > BUSY_LOAD
    note = args.note
    if busy:
        note = (note + "; " if note else "") + (f"machine busy: load average {load_start[0]:.2f} -> "
                                                f"{result['loadavg_end'][0]:.2f}; read the CPU ms column")
    result["busy"], result["note"] = busy, note
    print(format_table(result))
    out = args.out or ROOT / "bench" / "results" / f"face_analysis_cpu_{platform.machine().lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
