"""`mosaics-bench train`: tokens/s and model-FLOPs utilisation of an experiment's jitted training
step (the step `mosaics-train` runs, `train.step.make_train_step`) on synthetic batches: MFU as
`mosaics-train` logs it (`analysis.utilisation`), against the device's peak, or on a CPU against
a float32 matmul timed in the same process.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from mosaics_jax.analysis import timing, utilisation
from mosaics_jax.model import families
from mosaics_jax.train import optim, step


@dataclasses.dataclass(frozen=True)
class TrainRow:
  """Throughput and model-FLOPs utilisation of one experiment's training step."""

  experiment: str
  batch_size: int
  seq_len: int
  dtype: str
  step_seconds: float  # Median over repeats of one jitted training step.
  tokens_per_second: float  # Of the one device the step runs on.
  train_flops_per_token: float  # `utilisation.train_flops_per_token`.
  model_gflops: float  # Achieved: tokens/s x train FLOPs per token.
  matmul_gflops: float  # A matmul_size^3 matmul timed in the same process.
  matmul_size: int
  matmul_dtype: str  # `utilisation.matmul_dtype`: float32 on a CPU.
  peak_gflops: float  # The device's peak (`utilisation.of`).
  peak_source: str
  mfu: float  # `metrics.Utilisation.mfu`: model_gflops / peak_gflops.
  peak_mb: float  # XLA's planned peak memory of the compiled step (`timing.planned_peak_bytes`).
  max_rss_mb: float  # The process's peak resident memory so far, compilation included.
  # The official nanoMosaics step (`--official`), timed interleaved with ours: its name and
  # tokens/s, None when not compared.
  baseline: str | None = None
  baseline_tokens_per_second: float | None = None


def synthetic_batch(experiment, rng: np.random.Generator) -> dict[str, np.ndarray]:
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


def compiled_train_step(experiment, num_batches: int):
  """(compiled step, state after one warm-up step, `num_batches` distinct synthetic batches)."""
  model = families.build_model(experiment.model)
  tx = optim.make_optimizer(experiment.train)
  step_fn = step.make_train_step(experiment, model, tx)
  state = step.init_state(experiment, model, tx)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(synthetic_batch(experiment, rng)) for _ in range(num_batches)]
  compiled = step_fn.lower(state, batches[-1]).compile()
  # Warm up; the step donates its state, so always go on from the returned one.
  state = run_steps(compiled, state, batches[-1:])
  return compiled, state, batches


def run_steps(step_fn, state, batches):
  """Runs one training step per batch and waits for the result; returns the new state."""
  for batch in batches:
    state, stats = step_fn(state, batch)
  jax.block_until_ready((state, stats))
  return state


def train_throughput(
    experiment,
    steps: int = 5,
    repeats: int = 3,
    matmul_size: int = timing.MATMUL_SIZE,
    baseline: tuple[str, Callable[[], None]] | None = None,
) -> TrainRow:
  """Tokens/s and MFU of the jitted training step on synthetic batches.

  The step is `train.make_train_step` with the experiment's optimizer, compiled once and warmed up
  by one step; each repeat times `steps` consecutive steps on distinct random batches, then the
  matmul, so both see the same load on a shared machine. Medians over repeats. MFU is
  `utilisation.of`'s, as `mosaics-train` logs it: against the device's peak, or where the table
  has none (a CPU) against this matmul.
  `baseline` = (name, one training step of another implementation of the same model and batch,
  e.g. `port.official.train_step`): warmed up by one step, then timed for `steps` steps in each
  repeat, between ours and the matmul.
  """
  step_fn, state, batches = compiled_train_step(experiment, steps + 1)
  baseline_times = []
  if baseline is not None:
    baseline[1]()
  device = jax.devices()[0]
  matmul = timing.Matmul(
      matmul_size, utilisation.matmul_dtype(device.platform, experiment.model.dtype)
  )

  step_times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = run_steps(step_fn, state, batches[:steps])
    step_times.append((time.perf_counter() - start) / steps)
    if baseline is not None:
      start = time.perf_counter()
      for _ in range(steps):
        baseline[1]()
      baseline_times.append((time.perf_counter() - start) / steps)
    matmul.sample(3)
  step_seconds = statistics.median(step_times)
  baseline_seconds = statistics.median(baseline_times) if baseline_times else None

  seq_len = experiment.data.seq_len
  tokens_per_second = experiment.train.batch_size * seq_len / step_seconds
  basis = utilisation.of(experiment, device, matmul=lambda: matmul)
  model_rate = tokens_per_second * basis.train_flops_per_token
  return TrainRow(
      experiment=experiment.name,
      batch_size=experiment.train.batch_size,
      seq_len=seq_len,
      dtype=experiment.model.dtype,
      step_seconds=step_seconds,
      tokens_per_second=tokens_per_second,
      train_flops_per_token=basis.train_flops_per_token,
      model_gflops=model_rate / 1e9,
      matmul_gflops=matmul.rate() / 1e9,
      matmul_size=matmul_size,
      matmul_dtype=str(matmul.dtype),
      peak_gflops=basis.peak_flops_per_second / 1e9,
      peak_source=basis.peak_source,
      mfu=basis.mfu(tokens_per_second),
      peak_mb=timing.planned_peak_bytes(step_fn) / 2**20,
      # ru_maxrss is in KiB on Linux.
      max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      baseline=None if baseline is None else baseline[0],
      baseline_tokens_per_second=(
          None if baseline_seconds is None else tokens_per_second * step_seconds / baseline_seconds
      ),
  )


def format_train(row: TrainRow) -> str:
  lines = [
      f"training step of {row.experiment}: batch {row.batch_size} x {row.seq_len} tokens,"
      f" {row.dtype}, synthetic data; peak memory: XLA's planned peak of the compiled step",
      "model FLOPs/token = 3 x forward FLOPs (mosaics-info convention at context"
      f" {row.seq_len}; backward = 2 x forward); MFU = model GFLOP/s / peak GFLOP/s, the peak"
      f" being the {row.peak_source}, as mosaics-train logs it; matmul = {row.matmul_dtype}"
      f" {row.matmul_size}^3 timed in this process",
      "",
      "| experiment | step (s) | tokens/s | train FLOPs/token | model GFLOP/s | matmul GFLOP/s |"
      " peak GFLOP/s | MFU | peak memory (MB) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
      f"| {row.experiment} | {row.step_seconds:.3f} | {row.tokens_per_second:.0f} |"
      f" {row.train_flops_per_token / 1e6:.2f}M | {row.model_gflops:.1f} |"
      f" {row.matmul_gflops:.1f} | {row.peak_gflops:.1f} | {row.mfu:.1%} | {row.peak_mb:.0f} |",
  ]
  notes = [f"process peak RSS: {row.max_rss_mb:.0f} MB (compilation included)"]
  if row.baseline is not None:
    ratio = row.baseline_tokens_per_second / row.tokens_per_second
    lines.append(
        f"| {row.baseline} | {row.step_seconds / ratio:.3f} | {row.baseline_tokens_per_second:.0f}"
        f" | {row.train_flops_per_token / 1e6:.2f}M | {row.model_gflops * ratio:.1f} |"
        f" {row.matmul_gflops:.1f} | {row.peak_gflops:.1f} | {row.mfu * ratio:.1%} | - |"
    )
    notes.append(
        f"ours / {row.baseline}: {1 / ratio:.2f}x the tokens/s (medians of repeats timed"
        " interleaved: ours, theirs, the matmul); the process's RSS includes theirs"
    )
  return "\n".join([*lines, "", *notes])
