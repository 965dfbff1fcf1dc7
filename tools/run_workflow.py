#!/usr/bin/env python3
"""Run a ComfyUI workflow headless, with this pack loaded, and fetch its images.

    python tools/run_workflow.py --comfyui ComfyUI workflows/sd15_basic.json --image reference.png --out ipaf_outputs --cpu
    python tools/run_workflow.py --comfyui ComfyUI --selfcheck --cpu

Run it with ComfyUI's Python. The work is done by the package tools/ipaf_runner (see its __init__).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ipaf_runner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
