"""The test suite's run-time type checks and hardware markers.

- Every function and dataclass of mosaics_jax and kernels_pallas is checked against its annotations
  at run time, jaxtyping shapes included (under jit, at trace time): jaxtyping's import hook with
  beartype (`runtime_typecheck.py`). `--no-typecheck` turns it off. The configs are left out: they
  check their own fields (`config.check_types`), with errors that name the field.
- Markers that skip themselves where the hardware is missing: `gpu` (needs a CUDA GPU) and `tpu`
  (needs libtpu, which compiles for TPU topologies on any host). `slow` tests are deselected by the
  default `-m "not slow"`; `python -m pytest -m slow` runs them (`.ci/run` does).
- Compiling is most of the suite's time: XLA's CPU backend runs LLVM at -O0, and XLA's persistent
  compilation cache (in the session's temp dir) lets a program compiled by one test, worker or
  `mosaics-train` subprocess be reused by the next.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import jax
import jaxtyping
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The hook only checks modules imported after it is installed: this file must not import them.
CHECKED = ("kernels_pallas",) + tuple(
    f"mosaics_jax.{path.stem}"
    for path in sorted((ROOT / "mosaics_jax").iterdir())
    if path.stem not in ("__init__", "__pycache__", "config") and not path.name.startswith(".")
)


def pytest_addoption(parser):
  parser.addoption(
      "--no-typecheck",
      action="store_true",
      help="do not check the annotations of mosaics_jax and kernels_pallas at run time",
  )


def pytest_configure(config):
  # The tests' models are tiny: compiling them takes longer than running them. At -O0, LLVM
  # compiles XLA's code about 30% faster; the operations are the same (only rounding may differ,
  # e.g. without fused multiply-adds), far below the tests' tolerances.
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()
  if config.getoption("--no-typecheck"):
    return
  imported = [name for name in ("mosaics_jax", *CHECKED) if name in sys.modules]
  if imported:
    raise pytest.UsageError(
        f"{imported} imported before the type-check hook: run with --no-typecheck"
    )
  jaxtyping.install_import_hook(CHECKED, "runtime_typecheck.beartype_tower")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """XLA's persistent compilation cache, shared by the session's workers: the many small runs
  compile the same programs (a tiny train step, a tiny model's forward) from fresh jit objects,
  and each compiles once."""
  shared = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    shared = shared.parent  # The workers' temp dirs sit side by side in the session's.
  settings = {
      "jax_compilation_cache_dir": str(shared / "xla-cache"),
      "jax_persistent_cache_min_compile_time_secs": 0.2,
      "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)  # For the tests' `mosaics-train` subprocesses.
  yield


def pytest_collection_modifyitems(config, items):
  del config
  has_gpu = jax.default_backend() == "gpu"
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if "tpu" in item.keywords and not has_libtpu:
      item.add_marker(pytest.mark.skip(reason="needs libtpu: pip install 'jax[tpu]'"))
