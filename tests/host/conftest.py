"""Tests inside the real host (ComfyUI) on CPU with tiny models.

Skipped as a whole unless $COMFYUI_PATH points to a ComfyUI folder whose modules import in this
Python. Run them with the host's Python, e.g.

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

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import util  # noqa: E402

HERE = Path(__file__).resolve().parent


def _host_skip_reason():
    if not os.environ.get(util.HOST_ENV):
        return f"host tests need ${util.HOST_ENV} (a ComfyUI folder)"
    try:
        util.prepare_host()
    except RuntimeError as exc:
        return str(exc)
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
    gc.collect()


@pytest.fixture(scope="session")
def host():
    reason = _host_skip_reason()
    if reason:
        pytest.skip(reason)
    h = util.prepare_host()
    h.torch.manual_seed(0)
    return h


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
        pytest.skip(f"ComfyUI_IPAdapter_plus not found (set ${util.IPAPLUS_ENV})")
    return util.load_ipadapter_plus()
