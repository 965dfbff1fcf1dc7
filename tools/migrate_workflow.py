#!/usr/bin/env python3
"""Convert a workflow's ComfyUI_IPAdapter_plus nodes to this pack's nodes and print what changed.

    python tools/migrate_workflow.py old.json new.json

Plain Python (no ComfyUI needed). The work is done by tools/ipaf_runner/migrate.py, which the
front-end action "Convert IPAdapter_plus nodes" also uses (through POST /ipadapter_fused/migrate).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ipaf_runner.migrate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
