"""Timing compiled functions on a shared machine: medians of repeats, XLA's planned peak memory, and
the matmul rate that every benchmark ratio is measured against in the same process.

Peak memory is what XLA's buffer assignment plans for the compiled program (arguments, outputs and
temporaries), which is the peak the device sees, independent of other processes on the machine.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
  """A compiled function's median wall time and XLA's planned peak memory."""

  seconds: float  # Median over repeats.
  peak_bytes: int


def planned_peak_bytes(compiled: jax.stages.Compiled) -> int:
  """The peak memory XLA plans for a compiled program: arguments, outputs and temporaries."""
  mem = compiled.memory_analysis()
  if mem is None:
    return 0
  return (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
  )


def measure(fn: Callable, *args, repeats: int = 5) -> Timing:
  """Median wall time of jitted `fn(*args)` after compilation, and its planned peak memory."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), planned_peak_bytes(compiled))


def matmul_flops_per_second(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """The rate of an n^3 matmul in `dtype` on this backend: the yardstick of every ratio."""
  a = jnp.ones((n, n), dtype)
  return 2 * n**3 / measure(jnp.matmul, a, a, repeats=repeats).seconds
