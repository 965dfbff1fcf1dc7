import os

# Triton kernels run on CPU through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Host paths given relative to where pytest starts (COMFYUI_PATH=../shared/host/ComfyUI) must mean
# the same in the servers and subprocesses the tests start in other folders.
for _var in ("COMFYUI_PATH", "IPADAPTER_PLUS_PATH"):
    if os.environ.get(_var):
        os.environ[_var] = os.path.abspath(os.environ[_var])

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


# Host-backed test folders. With $IPADAPTER_FUSED_REQUIRE_HOST=1 (CI) a skip there is a failure:
# a run in which the host tests were expected but did not run must not look green.
_HOST_DIRS = (ROOT / "tests" / "host", ROOT / "tests" / "server")
_REQUIRE_HOST = os.environ.get("IPADAPTER_FUSED_REQUIRE_HOST", "") not in ("", "0")

import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (_REQUIRE_HOST and report.skipped):
        return
    path = pathlib.Path(str(item.fspath)).resolve()
    if any(d in path.parents for d in _HOST_DIRS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"host test skipped while IPADAPTER_FUSED_REQUIRE_HOST is set: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # The same for a whole host module skipped while it is imported (pytest.importorskip at module
    # level): that skip never reaches pytest_runtest_makereport.
    outcome = yield
    report = outcome.get_result()
    if not (_REQUIRE_HOST and report.skipped):
        return
    path = pathlib.Path(str(collector.path)).resolve()
    if any(d in path.parents for d in _HOST_DIRS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"host test module skipped while IPADAPTER_FUSED_REQUIRE_HOST is set: {reason}"
