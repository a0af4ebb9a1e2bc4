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


# n of the n^3 matmul that `mosaics-bench train` and a run's MFU on CPU are measured against.
MATMUL_SIZE = 2048


class Matmul:
  """An n^3 matmul in `dtype` on the default device, compiled and warmed up once, then timed
  `sample` calls at a time: benchmarks interleave its samples with what they time, so both see
  the same load on a shared machine."""

  def __init__(self, n: int = MATMUL_SIZE, dtype=jnp.float32):
    self.n, self.dtype = n, jnp.dtype(dtype)
    self._a = jnp.ones((n, n), dtype)
    self._compiled = jax.jit(jnp.matmul).lower(self._a, self._a).compile()
    jax.block_until_ready(self._compiled(self._a, self._a))
    self._seconds: list[float] = []

  def sample(self, times: int) -> None:
    """Times `times` more matmuls, one at a time."""
    for _ in range(times):
      start = time.perf_counter()
      jax.block_until_ready(self._compiled(self._a, self._a))
      self._seconds.append(time.perf_counter() - start)

  def rate(self) -> float:
    """FLOP/s: 2 n^3 over the median of the samples so far."""
    if not self._seconds:
      raise ValueError("Matmul.rate before any sample")
    return 2 * self.n**3 / statistics.median(self._seconds)


def matmul_flops_per_second(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """The rate of an n^3 matmul in `dtype` on this backend: the yardstick of every ratio."""
  matmul = Matmul(n, dtype)
  matmul.sample(repeats)
  return matmul.rate()
