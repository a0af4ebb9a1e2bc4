"""Markers that skip themselves where the hardware is missing: `gpu` (needs a CUDA GPU) and `tpu`
(needs libtpu, which compiles for TPU topologies on any host). `slow` tests are deselected by the
default `-m "not slow"`; `python -m pytest -m slow` runs them (`.ci/run` does)."""

from __future__ import annotations

import importlib.util

import jax
import pytest

# This file is imported before the jaxtyping import hook is installed (`addopts` in setup.cfg):
# it must not import mosaics_jax or kernels_pallas, which the hook type-checks.


def pytest_collection_modifyitems(config, items):
  del config
  has_gpu = jax.default_backend() == "gpu"
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if "tpu" in item.keywords and not has_libtpu:
      item.add_marker(pytest.mark.skip(reason="needs libtpu: pip install 'jax[tpu]'"))
