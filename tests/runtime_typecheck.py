"""The run-time type checker of the test suite: beartype with Python's numeric tower (an int is a
valid float, as PEP 484 says), applied by jaxtyping's import hook to every function and dataclass of
mosaics_jax and kernels_pallas, jaxtyping shapes included (`conftest.py`)."""

from __future__ import annotations

import beartype

_CONF = beartype.BeartypeConf(is_pep484_tower=True)


def beartype_tower(obj):
  """`beartype.beartype(obj)` with the numeric tower."""
  return beartype.beartype(obj, conf=_CONF)
