"""Fixtures for the tiny DiTs of dit_models.py (registered by tests/host/conftest.py).

  tiny_flux / tiny_chroma / tiny_sd3   factories: f(seed=0, **config_overrides) -> a fresh ModelPatcher clone
                                       (TINY_*_CONFIG in tools/ipaf_runner/tiny_models.py; built once, cached)
  dit_cond     dit_models.make_dit_cond(kind, patcher=None, seed=0, tokens=8, batch=1, guidance=None)
  dit_sampler  dit_models.sample_dit(patcher, kind, seed=0, steps=3, cfg=1.0, latent_size=8, ...) -> latent
"""
from __future__ import annotations

import pytest

import dit_models


def _factory(kind):
    def make(seed=0, **config):
        return dit_models.build_dit(kind, seed, **config)
    return make


@pytest.fixture
def tiny_flux(host):
    return _factory("flux")


@pytest.fixture
def tiny_chroma(host):
    return _factory("chroma")


@pytest.fixture
def tiny_sd3(host):
    return _factory("sd3")


@pytest.fixture
def dit_cond(host):
    return dit_models.make_dit_cond


@pytest.fixture
def dit_sampler(host):
    return dit_models.sample_dit
