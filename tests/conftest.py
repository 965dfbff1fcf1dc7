import os

# Triton kernels run on CPU through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The pack is a ComfyUI custom node folder whose directory name is not a Python identifier
# in general; load it under a fixed package name so relative imports work in tests.
if "ipadapter_fused" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "ipadapter_fused", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ipadapter_fused"] = module
    spec.loader.exec_module(module)
