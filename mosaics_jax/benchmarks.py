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


@dataclasses.dataclass(frozen=True)
class TrainRow:
  experiment: str
  batch_size: int
  seq_len: int
  dtype: str
  step_seconds: float  # Median over repeats of one jitted training step.
  tokens_per_second: float
  train_flops_per_token: float  # 3 x forward FLOPs per token (flops.count at context seq_len).
  model_gflops: float  # Achieved: tokens/s x train FLOPs per token.
  matmul_gflops: float  # fp32 matmul_size^3, timed in the same process.
  matmul_size: int
  mfu: float  # model_gflops / matmul_gflops.


def _synthetic_batch(experiment, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One training batch of random tokens, shaped and typed as `mosaics_jax.data` yields them."""
  shape = (experiment.train.batch_size, experiment.data.seq_len)
  vocab = experiment.model.vocab_size
  ones = np.ones(shape, np.float32)
  return {
      "tokens": rng.integers(0, vocab, shape, dtype=np.int32),
      "targets": rng.integers(0, vocab, shape, dtype=np.int32),
      "segment_ids": np.zeros(shape, np.int32),  # One document per row, like a text file.
      "loss_mask": ones,
      "answer_mask": np.zeros(shape, np.float32),
  }


def train_throughput(
    experiment, steps: int = 5, repeats: int = 3, matmul_size: int = 2048
) -> TrainRow:
  """Tokens/s of the jitted training step on synthetic batches, against an fp32 matmul.

  The step is `train.make_train_step` with the experiment's optimizer, compiled once and warmed up
  by one step; each repeat times `steps` consecutive steps on fresh random batches, then the
  matmul, so both see the same load on a shared machine. Medians over repeats. Model FLOPs follow
  the paper convention: 3 x the forward FLOPs of `flops.count(model, context=seq_len)`.
  """
  # Imported here: `ops` needs only the kernels, and the model stack is slower to import.
  from mosaics_jax import flops, models, optim, train

  model = models.build_model(experiment.model)
  tx = optim.make_optimizer(experiment.train)
  step_fn = train.make_train_step(experiment, model, tx)
  state = train.init_state(experiment, model, tx)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(_synthetic_batch(experiment, rng)) for _ in range(steps + 1)]
  # Compile and warm up; the step donates its state, so always go on from the returned one.
  state, stats = step_fn(state, batches[-1])
  jax.block_until_ready((state, stats))
  a = jnp.ones((matmul_size, matmul_size), jnp.float32)
  matmul = jax.jit(jnp.matmul).lower(a, a).compile()
  jax.block_until_ready(matmul(a, a))

  step_times, matmul_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    for batch in batches[:steps]:
      state, stats = step_fn(state, batch)
    jax.block_until_ready((state, stats))
    step_times.append((time.perf_counter() - start) / steps)
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(matmul(a, a))
      matmul_times.append(time.perf_counter() - start)
  step_seconds = statistics.median(step_times)

  seq_len = experiment.data.seq_len
  tokens_per_second = experiment.train.batch_size * seq_len / step_seconds
  train_flops = 3 * flops.count(experiment.model, context=seq_len).flops_per_token
  model_rate = tokens_per_second * train_flops
  matmul_rate = 2 * matmul_size**3 / statistics.median(matmul_times)
  return TrainRow(
      experiment=experiment.name,
      batch_size=experiment.train.batch_size,
      seq_len=seq_len,
      dtype=experiment.model.dtype,
      step_seconds=step_seconds,
      tokens_per_second=tokens_per_second,
      train_flops_per_token=train_flops,
      model_gflops=model_rate / 1e9,
      matmul_gflops=matmul_rate / 1e9,
      matmul_size=matmul_size,
      mfu=model_rate / matmul_rate,
  )


def format_train(row: TrainRow) -> str:
  lines = [
      f"training step of {row.experiment}: batch {row.batch_size} x {row.seq_len} tokens,"
      f" {row.dtype}, synthetic data",
      "model FLOPs/token = 3 x forward FLOPs (mosaics-info convention at context"
      f" {row.seq_len}; backward = 2 x forward); MFU = model GFLOP/s / fp32 matmul"
      f" ({row.matmul_size}^3) GFLOP/s in this process",
      "",
      "| experiment | step (s) | tokens/s | train FLOPs/token | model GFLOP/s | matmul GFLOP/s |"
      " MFU |",
      "|---|---:|---:|---:|---:|---:|---:|",
      f"| {row.experiment} | {row.step_seconds:.3f} | {row.tokens_per_second:.0f} |"
      f" {row.train_flops_per_token / 1e6:.2f}M | {row.model_gflops:.1f} |"
      f" {row.matmul_gflops:.1f} | {row.mfu:.1%} |",
  ]
  return "\n".join(lines)
