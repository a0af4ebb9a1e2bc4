"""Benchmarks: time and peak memory of the retrieval op against a plain matmul in the same process.

Times are medians of several repeats of a compiled function; peak memory is what XLA's buffer
assignment plans for the compiled program (arguments, outputs and temporaries), which is the peak
the device sees, independent of other processes on a shared machine.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas


@dataclasses.dataclass(frozen=True)
class Timing:
  seconds: float  # Median over repeats.
  peak_bytes: int


def measure(fn: Callable, *args, repeats: int = 5) -> Timing:
  """Median wall time of jitted `fn(*args)` after compilation, and its planned peak memory."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  mem = compiled.memory_analysis()
  peak = 0
  if mem is not None:
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
  return Timing(statistics.median(times), peak)


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
  """The float32 rate of an n^3 matmul on this backend: the yardstick of every ratio."""
  a = jnp.ones((n, n), jnp.float32)
  return 2 * n**3 / measure(jnp.matmul, a, a, repeats=repeats).seconds


@dataclasses.dataclass(frozen=True)
class OpsRow:
  band: str
  seq_len: int
  seconds: float
  us_per_token: float
  per_token_vs_first: float  # Time per token relative to the shortest length of the same band.
  useful_gflops: float
  matmul_fraction: float
  peak_mb: float


BANDS = {"short-term (lo=1, hi=255)": (1, 255), "long-term (lo=64, hi=inf)": (64, None)}


def ops(
    seq_lens=(1024, 4096, 16384),
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    impl: str = "xla",
    repeats: int = 3,
) -> tuple[list[OpsRow], float]:
  """Forward+backward of `retrieve` for the short- and long-term bands; returns rows, matmul rate."""
  rate = matmul_flops_per_second()
  rows = []
  for band, (lo, hi) in BANDS.items():
    first = None
    for t in seq_lens:
      keys = jax.random.split(jax.random.key(t), 3)
      q, k, v = (jax.random.normal(key, (batch, t, heads, head_dim)) for key in keys)

      def loss(q, k, v):
        return kernels_pallas.retrieve(q, k, v, lo=lo, hi=hi, impl=impl).sum()

      timing = measure(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, repeats=repeats)
      per_token = timing.seconds / (batch * t)
      first = first or per_token
      pairs = float(np.asarray(kernels_pallas.visible_counts(None, t, lo, hi)).sum())
      # q.k and p.v: 4 * d FLOPs per visible pair and head; backward counted as 2.5 forwards.
      useful = 3.5 * 4 * head_dim * heads * batch * pairs
      rows.append(
          OpsRow(
              band=band,
              seq_len=t,
              seconds=timing.seconds,
              us_per_token=per_token * 1e6,
              per_token_vs_first=per_token / first,
              useful_gflops=useful / timing.seconds / 1e9,
              matmul_fraction=useful / timing.seconds / rate,
              peak_mb=timing.peak_bytes / 2**20,
          )
      )
  return rows, rate


def format_ops(rows: list[OpsRow], rate: float, impl: str) -> str:
  lines = [
      f"retrieve(impl={impl!r}) forward+backward; fp32 matmul (1024^3) here: {rate / 1e9:.1f} GFLOP/s",
      "",
      "| band | T | time (s) | us/token | per token vs shortest | useful GFLOP/s | of matmul |"
      " peak memory (MB) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r.band} | {r.seq_len} | {r.seconds:.3f} | {r.us_per_token:.1f} |"
        f" {r.per_token_vs_first:.2f}x | {r.useful_gflops:.1f} | {r.matmul_fraction:.0%} |"
        f" {r.peak_mb:.0f} |"
    )
  return "\n".join(lines)
