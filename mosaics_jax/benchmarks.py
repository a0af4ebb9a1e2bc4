"""Benchmarks against a plain matmul in the same process: every retrieval implementation side by
side (time, useful FLOP/s and peak memory), and a whole training step (tokens/s and model FLOP
utilisation).

Times are medians of several repeats of a compiled function; peak memory is what XLA's buffer
assignment plans for the compiled program (arguments, outputs and temporaries), which is the peak
the device sees, independent of other processes on a shared machine.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from kernels_pallas import shift


@dataclasses.dataclass(frozen=True)
class Timing:
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


KERNEL_BANDS = {
    "short": ("short-term (lo=1, hi=255)", 1, 255),
    "long": ("long-term (lo=256, hi=inf)", 256, None),
    "v1": ("v1 (lo=1, hi=inf)", 1, None),
}
# Implementations that exist for one backend only. Off it they would not run, or (Pallas kernels on
# CPU) run in interpret mode, which is a correctness tool and not a benchmark.
_BACKEND_ONLY = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu",)}
# Score-sized float32 buffers alive at the peak of a dense forward+backward: the compiled peak of
# "reference" is 4.5 and that of "shift" over XLA attention 5.6 of them at T = 512 on CPU.
DENSE_SCORE_COPIES = 6
# Memory a dense implementation may plan when the device does not report its own (CPU).
DEFAULT_MAX_DENSE_GB = 16.0


def impl_unavailable_reason(impl: str, backend: str) -> str | None:
  """Why `impl` is not benchmarked on `backend` ("cpu", "gpu" or "tpu"), or None if it is."""
  backends = _BACKEND_ONLY.get(impl)
  if backends is None or backend in backends:
    return None
  if backend == "cpu":
    return "interpret mode on CPU is not a benchmark"
  return f"runs on {' and '.join(backends)} only"


def available_impls(backend: str) -> list[str]:
  """The names in `kernels_pallas.IMPLEMENTATIONS` benchmarked on `backend`."""
  names = sorted(kernels_pallas.IMPLEMENTATIONS)
  return [name for name in names if impl_unavailable_reason(name, backend) is None]


def dense_bytes(
    impl: str,
    batch: int,
    heads: int,
    seq_len: int,
    dtype,
    head_dim: int,
    backend: str | None = None,
) -> int | None:
  """Estimated peak memory of an implementation that materialises the [b, h, T, T] scores.

  None for the implementations whose memory grows linearly in T on `backend` (default: JAX's).
  """
  library = shift.default_implementation(dtype, head_dim, packed=False, backend=backend)
  dense = impl == "reference" or (impl == "shift" and library == "xla")
  if not dense:
    return None
  return DENSE_SCORE_COPIES * batch * heads * seq_len**2 * 4


def device_memory_bytes() -> int | None:
  """The memory limit the default device reports, or None (CPU reports none)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("bytes_limit")


@dataclasses.dataclass(frozen=True)
class KernelRow:
  band: str
  seq_len: int
  head_dim: int
  impl: str
  seconds: float | None  # Median over repeats; None when skipped or only compiled.
  useful_tflops: float | None
  matmul_fraction: float | None
  peak_mb: float | None
  skipped: str | None = None  # Why there is no measurement.


def _is_out_of_memory(error: Exception) -> bool:
  message = str(error)
  return "RESOURCE_EXHAUSTED" in message or "Out of memory" in message


def kernels(
    impls: list[str],
    *,
    matmul_rate: float,
    seq_lens=(4096, 8192, 16384, 32768, 65536),
    head_dims=(64, 128),
    bands=("short", "long"),
    batch: int = 1,
    heads: int = 16,
    dtype=jnp.bfloat16,
    repeats: int = 3,
    max_dense_bytes: float = DEFAULT_MAX_DENSE_GB * 2**30,
    target: Any = None,
) -> Iterator[KernelRow]:
  """Forward+backward of every implementation in `impls` over bands, lengths and head dims.

  The timed function is the gradient of sum(y * cotangent) in q, k and v. Useful FLOPs count only
  the pairs inside the band: 4 d per pair and head forward (q . k and p . v), backward 2.5 times
  the forward (the flash-attention convention), 3.5 x 4 d in all; `matmul_rate` (FLOP/s) is the
  yardstick of the "of matmul" ratio. Dense implementations whose
  estimated peak exceeds `max_dense_bytes` are skipped, as is any that runs out of memory. Rows
  are yielded as they are measured, so a long sweep prints as it goes.

  With a `target` device (`mosaics_jax.aot.topology_devices`), every implementation is compiled
  for it and not run: rows hold XLA's planned peak memory on that device and no time.
  """
  backend = None if target is None else target.platform
  for band in bands:
    name, lo, hi = KERNEL_BANDS[band]
    for head_dim in head_dims:
      for t in seq_lens:
        shape = (batch, t, heads, head_dim)
        if target is None:
          keys = jax.random.split(jax.random.key(t), 4)
          args = [jax.random.normal(key, shape, dtype) for key in keys]
        else:
          on_target = jax.sharding.SingleDeviceSharding(target)
          args = [jax.ShapeDtypeStruct(shape, dtype, sharding=on_target)] * 4
        pairs = float(np.asarray(kernels_pallas.visible_counts(None, t, lo, hi)).sum())
        useful = 3.5 * 4 * head_dim * heads * batch * pairs
        for impl in impls:
          row = functools.partial(KernelRow, name, t, head_dim, impl)
          estimate = dense_bytes(impl, batch, heads, t, dtype, head_dim, backend)
          if estimate is not None and estimate > max_dense_bytes:
            yield row(None, None, None, None, skipped=f"does not fit: ~{estimate / 2**30:.3g} GB")
            continue

          def grads(q, k, v, cotangent, impl=impl):
            loss = lambda q, k, v: jnp.sum(
                kernels_pallas.retrieve(q, k, v, lo=lo, hi=hi, impl=impl, backend=backend)
                * cotangent
            )
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

          try:
            if target is not None:
              compiled = jax.jit(grads).trace(*args).lower().compile()
              yield row(None, None, None, planned_peak_bytes(compiled) / 2**20)
              continue
            timing = measure(grads, *args, repeats=repeats)
          except jax.errors.JaxRuntimeError as e:
            if not _is_out_of_memory(e):
              raise
            yield row(None, None, None, None, skipped="does not fit: out of memory")
            continue
          rate = useful / timing.seconds
          yield row(timing.seconds, rate / 1e12, rate / matmul_rate, timing.peak_bytes / 2**20)


def kernels_header(
    matmul_rate: float | None,
    matmul_size: int,
    dtype_name: str,
    batch: int,
    heads: int,
    target: str | None = None,
) -> str:
  """The table's title and column names; `target` names the device of a compile-only sweep."""
  if target is None:
    title = f" {dtype_name} matmul ({matmul_size}^3) here: {matmul_rate / 1e12:.3g} TFLOP/s"
  else:
    title = f" compiled for {target}, not run: XLA's planned peak memory only"
  lines = [
      f"retrieve forward+backward, batch {batch}, {heads} heads, {dtype_name};{title}",
      "",
      "| band | T | head dim | impl | time (ms) | useful TFLOP/s | of matmul | peak memory (MB) |",
      "|---|---:|---:|---|---:|---:|---:|---:|",
  ]
  return "\n".join(lines)


def format_kernel_row(r: KernelRow) -> str:
  cells = [r.band, str(r.seq_len), str(r.head_dim), r.impl]
  if r.skipped is not None:
    cells += [f"skipped ({r.skipped})", "", "", ""]
  elif r.seconds is None:
    cells += ["compiled only", "", "", f"{r.peak_mb:.0f}"]
  else:
    cells += [
        f"{r.seconds * 1e3:.2f}",
        f"{r.useful_tflops:.3g}",
        f"{r.matmul_fraction:.0%}",
        f"{r.peak_mb:.0f}",
    ]
  return "| " + " | ".join(cells) + " |"


def kernels_footer(backend: str, max_dense_bytes: float) -> str:
  lines = [
      "",
      "Useful FLOPs count the pairs inside the band only: 4 d per pair and head forward (q . k and"
      " p . v), backward = 2.5 x forward (flash-attention convention), so 3.5 x 4 d per pair in"
      " all. Peak memory: XLA's planned peak of the compiled forward+backward.",
      f"Dense implementations (T x T scores) run only if ~{DENSE_SCORE_COPIES} float32 score"
      f" matrices fit in {max_dense_bytes / 2**30:.3g} GB.",
  ]
  unavailable = {
      impl: reason
      for impl in sorted(kernels_pallas.IMPLEMENTATIONS)
      if (reason := impl_unavailable_reason(impl, backend))
  }
  if unavailable:
    listed = "; ".join(f"{impl} ({reason})" for impl, reason in unavailable.items())
    lines.append(f"Not run on {backend}: {listed}.")
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


def _compiled_train_step(experiment, num_batches: int):
  """(jitted step, state after one warm-up step, `num_batches` distinct synthetic batches)."""
  from mosaics_jax import models, optim, train

  model = models.build_model(experiment.model)
  tx = optim.make_optimizer(experiment.train)
  step_fn = train.make_train_step(experiment, model, tx)
  state = train.init_state(experiment, model, tx)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(_synthetic_batch(experiment, rng)) for _ in range(num_batches)]
  # Compile and warm up; the step donates its state, so always go on from the returned one.
  state = _run_steps(step_fn, state, batches[-1:])
  return step_fn, state, batches


def _run_steps(step_fn, state, batches):
  """Runs one training step per batch and waits for the result; returns the new state."""
  for batch in batches:
    state, stats = step_fn(state, batch)
  jax.block_until_ready((state, stats))
  return state


def train_throughput(
    experiment, steps: int = 5, repeats: int = 3, matmul_size: int = 2048
) -> TrainRow:
  """Tokens/s of the jitted training step on synthetic batches, against an fp32 matmul.

  The step is `train.make_train_step` with the experiment's optimizer, compiled once and warmed up
  by one step; each repeat times `steps` consecutive steps on distinct random batches, then the
  matmul, so both see the same load on a shared machine. Medians over repeats. Model FLOPs follow
  the paper convention: 3 x the forward FLOPs of `flops.count(model, context=seq_len)`.
  """
  # Imported here: `ops` needs only the kernels, and the model stack is slower to import.
  from mosaics_jax import flops

  step_fn, state, batches = _compiled_train_step(experiment, steps + 1)
  a = jnp.ones((matmul_size, matmul_size), jnp.float32)
  matmul = jax.jit(jnp.matmul).lower(a, a).compile()
  jax.block_until_ready(matmul(a, a))

  step_times, matmul_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    state = _run_steps(step_fn, state, batches[:steps])
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


@dataclasses.dataclass(frozen=True)
class ProfileRow:
  component: str  # The model's submodule, layer indices merged ("h_*/mlp"), or "outside model".
  direction: str  # "forward" or "backward" (ops of the gradient).
  kind: str  # "matmul" (dot products and the fusions around them) or "other".
  seconds_per_step: float  # Summed over the XLA ops of the group, all threads.


def train_profile(experiment, trace_dir: str, steps: int = 2) -> list[ProfileRow]:
  """Where a training step's time goes, by model component, from a JAX profiler trace.

  Traces `steps` steps into `trace_dir` (viewable in TensorBoard or Perfetto), then sums the
  duration of every XLA op by the Flax module that emitted it, read from the op's metadata in
  the compiled program; ops of the gradient carry a transpose(...) in their name. Layers are
  merged (h_3/mlp and h_5/mlp count as h_*/mlp).
  """
  from mosaics_jax import models

  model_name = type(models.build_model(experiment.model)).__name__
  step_fn, state, batches = _compiled_train_step(experiment, steps)
  with jax.profiler.trace(trace_dir):
    state = _run_steps(step_fn, state, batches)
  program = step_fn.lower(state, batches[0]).compile().as_text()
  op_names = dict(re.findall(r'%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', program))
  trace = max(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
  totals: dict[tuple[str, str, str], float] = {}
  for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
    for line in plane.lines:
      for event in line.events:
        hlo_op = dict(event.stats).get("hlo_op")
        if hlo_op is None:
          continue
        key = _op_group(op_names.get(hlo_op, ""), model_name)
        totals[key] = totals.get(key, 0.0) + event.duration_ns * 1e-9 / steps
  rows = [ProfileRow(*key, seconds) for key, seconds in totals.items()]
  return sorted(rows, key=lambda r: -r.seconds_per_step)


def _op_group(op_name: str, model_name: str) -> tuple[str, str, str]:
  """(component, direction, kind) of an XLA op from its metadata op_name."""
  if not op_name:
    # Some fusions XLA forms late (on CPU, its library fusions) carry no source metadata.
    return "unattributed: fusions without source metadata", "-", "other"
  direction = "backward" if "transpose(" in op_name else "forward"
  kind = "matmul" if "dot_general" in op_name else "other"
  # op_name: jit(step)/.../jvp(MosaicV1)/h_3/mlp/... ; the model is the jvp(<model class>) scope.
  match = re.search(rf"jvp\({model_name}\)\)?/(.*)", op_name)
  if match is None:
    return "outside the model: loss, optimizer", "-", kind
  parts = [p for p in match.group(1).split("/") if not p.startswith(("jit(", "while", "body"))]
  parts = [re.sub(r"_\d+$", "_*", p) for p in parts[:2]]
  if len(parts) == 2 and not parts[0].endswith("_*"):
    parts = parts[:1]  # A top-level module (wte, ln_f) and the op inside it.
  return "/".join(parts), direction, kind


def format_profile(rows: list[ProfileRow], trace_dir: str) -> str:
  total = sum(r.seconds_per_step for r in rows)
  lines = [
      f"op time per step, summed over threads: {total:.3f} s (trace: {trace_dir})",
      "",
      "| component | pass | kind | ms/step | share |",
      "|---|---|---|---:|---:|",
  ]
  for r in rows:
    if r.seconds_per_step < 0.001 * total:
      continue
    lines.append(
        f"| {r.component} | {r.direction} | {r.kind} | {r.seconds_per_step * 1e3:.0f} |"
        f" {r.seconds_per_step / total:.1%} |"
    )
  return "\n".join(lines)
