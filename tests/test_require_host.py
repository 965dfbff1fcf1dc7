"""$IPADAPTER_FUSED_REQUIRE_HOST=1 (set by .ci/run) turns a skipped host test into a failure, including
a host module skipped while it is imported (pytest.importorskip at module level), which used to pass
as one quiet "skipped" (issue 6: a run in which host tests were expected but skipped is a failure).

Checked on the real case: tests/host/test_property_apply.py skips itself when hypothesis is missing.
A subprocess runs it with a stand-in `hypothesis` that is not importable; collection stops before any
host code runs, so this needs no host."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collect_without_hypothesis(tmp_path, require):
    hidden = tmp_path / "hidden" / "hypothesis"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError('No module named hypothesis (hidden by the test)', name='hypothesis')\n")
    env = dict(os.environ, PYTHONPATH=str(hidden.parent), IPADAPTER_FUSED_REQUIRE_HOST=require)
    # hypothesis' own pytest plugin would fail to load without it: leave it out
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q", "-rs",
           "--collect-only", "tests/host/test_property_apply.py"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_host_module_skipped_at_import_fails_when_the_host_is_required(tmp_path):
    proc = _collect_without_hypothesis(tmp_path, "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 5), out
    assert "host test module skipped while IPADAPTER_FUSED_REQUIRE_HOST is set" in out, out
    assert "could not import 'hypothesis'" in out, out
