"""Tests inside the real host (ComfyUI) on CPU with tiny models.

The host is $COMFYUI_PATH, else the read-only snapshot at <pack>/../shared/host/ComfyUI. These tests
skip only when neither exists; a host that exists but does not import (a missing dependency, a torchvision
that does not load) fails them. With $IPADAPTER_FUSED_REQUIRE_HOST=1 (set by .ci/run) a skip fails too.
Run them with the host's Python, e.g.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/host -x -q

Test modules here must not import `comfy` at module level: they get the host through the fixtures
(or util.prepare_host() inside a test), so that collection works without a host.

Fixtures:
  host                the host modules (util.prepare_host()): torch, mm, model_patcher, sample, samplers,
                      supported_models, clip_vision, attention, folder_paths
  tiny_sd15 / tiny_sdxl   factories: tiny_sd15(model_channels=None, seed=0) -> fresh ModelPatcher clone
                      of a UNet built by the host's own SD15 / SDXL config (real blocks, few channels)
  tiny_clip_vision    factory: tiny_clip_vision(seed=0, **config) -> comfy.clip_vision.ClipVisionModel
  sampler             util.sample (deterministic few-step sampling on CPU, returns the latent)
  cond                util.make_cond (random text conditioning in the host's format)
  ipadapter_plus      ComfyUI_IPAdapter_plus as a package (skips when absent; $IPADAPTER_PLUS_PATH)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import util  # noqa: E402
from dit_fixtures import dit_cond, dit_sampler, tiny_chroma, tiny_flux, tiny_sd3  # noqa: E402,F401  (DiT fixtures)

HERE = Path(__file__).resolve().parent


def _host_skip_reason():
    """Why host tests cannot run at all (no host anywhere), or None."""
    if util.host_path() is None:
        return f"no host: set ${util.HOST_ENV} to a ComfyUI folder (or put the snapshot at {util.HOST_DEFAULT})"
    return None


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    reason = _host_skip_reason()
    if reason:
        marker = pytest.mark.skip(reason=reason)
        for it in mine:
            it.add_marker(marker)


def pytest_sessionfinish(session, exitstatus):
    # drop the cached ModelPatchers while the host's modules are still alive (their __del__ needs them)
    import gc
    util._UNETS.clear()
    sys.modules["dit_models"]._MODELS.clear()
    gc.collect()


@pytest.fixture(scope="session")
def host():
    reason = _host_skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        h = util.prepare_host()
    except RuntimeError as exc:  # a host is there but broken: that is a failure, not a skip
        pytest.fail(str(exc), pytrace=False)
    h.torch.manual_seed(0)
    # The tiny models' ops are far too small to split: with more than one intra-op thread the threads
    # mostly wait on each other, and on shared or busy cores a run takes several times longer.
    h.torch.set_num_threads(1)
    return h


@pytest.fixture(autouse=True)
def _every_host_test_needs_the_host(host):
    return host


@pytest.fixture
def tiny_sd15(host):
    def make(model_channels=None, seed=0):
        return util.build_unet("sd15", model_channels, seed)
    return make


@pytest.fixture
def tiny_sdxl(host):
    def make(model_channels=None, seed=0):
        return util.build_unet("sdxl", model_channels, seed)
    return make


@pytest.fixture
def tiny_clip_vision(host, tmp_path):
    def make(seed=0, **config):
        return util.make_clip_vision(tmp_path, seed=seed, **config)
    return make


@pytest.fixture
def sampler(host):
    return util.sample


@pytest.fixture
def cond(host):
    return util.make_cond


@pytest.fixture(scope="session")
def ipadapter_plus(host):
    if util.ipadapter_plus_path() is None:
        pytest.skip(f"ComfyUI_IPAdapter_plus not found (set ${util.IPAPLUS_ENV} or put it at {util.IPAPLUS_DEFAULT})")
    return util.load_ipadapter_plus()
