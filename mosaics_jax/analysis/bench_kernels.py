"""`mosaics-bench kernels`: every retrieval implementation side by side, forward and backward: time,
useful FLOP/s against a plain matmul in the same process, and peak memory; or, compiled for a TPU
with libtpu (`--compile-for`), XLA's planned peak memory without a TPU. With `--select-blocks`,
the unbounded bands also time `retrieve_selected` (the XLA path reading K + R blocks per query).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from kernels_pallas import pallas_mosaic_gpu, shift
from mosaics_jax.analysis import timing as timing_lib

KERNEL_BANDS = {
    "short": ("short-term (lo=1, hi=255)", 1, 255),
    "long": ("long-term (lo=256, hi=inf)", 256, None),
    "v1": ("v1 (lo=1, hi=inf)", 1, None),
}
# Implementations that exist for one backend only. Off it they would not run, or (Pallas kernels on
# CPU) run in interpret mode, which is a correctness tool and not a benchmark.
_BACKEND_ONLY = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu",), "pallas_mosaic_gpu": ("gpu",)}
# Implementations that take some input dtypes only.
_DTYPES_ONLY = {"pallas_mosaic_gpu": pallas_mosaic_gpu.DTYPES}
# Score-sized float32 buffers alive at the peak of a dense forward+backward: the compiled peak of
# "reference" is 4.5 and that of "shift" over XLA attention 5.6 of them at T = 512 on CPU.
DENSE_SCORE_COPIES = 6
# Memory a dense implementation may plan when the device does not report its own (CPU).
DEFAULT_MAX_DENSE_GB = 16.0


def impl_unavailable_reason(impl: str, backend: str, dtype: Any = None) -> str | None:
  """Why `impl` is not benchmarked on `backend` ("cpu", "gpu" or "tpu") with inputs of `dtype`
  (None: any), or None if it is."""
  dtypes = _DTYPES_ONLY.get(impl)
  if dtype is not None and dtypes is not None and jnp.dtype(dtype) not in dtypes:
    return f"takes {' and '.join(d.name for d in dtypes)} inputs only"
  backends = _BACKEND_ONLY.get(impl)
  if backends is None or backend in backends:
    return None
  if backend == "cpu":
    return "interpret mode on CPU is not a benchmark"
  return f"runs on {' and '.join(backends)} only"


def native_kernels(backend: str) -> tuple[str, ...]:
  """The implementations that exist for `backend` only: its Pallas kernels."""
  return tuple(impl for impl, backends in _BACKEND_ONLY.items() if backend in backends)


def available_impls(backend: str, dtype: Any = None) -> list[str]:
  """The names in `kernels_pallas.IMPLEMENTATIONS` benchmarked on `backend` with `dtype`."""
  names = sorted(kernels_pallas.IMPLEMENTATIONS)
  return [name for name in names if impl_unavailable_reason(name, backend, dtype) is None]


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
  """One implementation at one band, length and head dim: its time, rate and peak memory."""

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
    matmul_rate: float | None,
    seq_lens=(4096, 8192, 16384, 32768, 65536),
    head_dims=(64, 128),
    bands=("short", "long"),
    batch: int = 1,
    heads: int = 16,
    dtype=jnp.bfloat16,
    repeats: int = 3,
    max_dense_bytes: float = DEFAULT_MAX_DENSE_GB * 2**30,
    target: Any = None,
    selections: tuple[kernels_pallas.BlockSelection, ...] = (),
) -> Iterator[KernelRow]:
  """Forward+backward of every implementation in `impls` over bands, lengths and head dims.

  The timed function is the gradient of sum(y * cotangent) in q, k and v. Useful FLOPs count only
  the pairs inside the band: 4 d per pair and head forward (q . k and p . v), backward 2.5 times
  the forward (the flash-attention convention), 3.5 x 4 d in all; `matmul_rate` (FLOP/s) is the
  yardstick of the "of matmul" ratio (None with a `target`, where nothing runs). Dense
  implementations whose
  estimated peak exceeds `max_dense_bytes` are skipped, as is any that runs out of memory. Rows
  are yielded as they are measured, so a long sweep prints as it goes.

  With a `target` device (`mosaics_jax.aot.topology_devices`), every implementation is compiled
  for it and not run: rows hold XLA's planned peak memory on that device and no time.

  Each of `selections` adds a row `select K+R/B` to the unbounded bands: `retrieve_selected`'s XLA
  path, its useful FLOPs counted over the pairs it reads at most, min(n_t, (K + R) B) per query.
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
        counts = np.asarray(kernels_pallas.visible_counts(None, t, lo, hi))
        variants = [
            (impl, functools.partial(kernels_pallas.retrieve, impl=impl, backend=backend), counts)
            for impl in impls
        ]
        if hi is None:
          variants += [
              (
                  f"select {s.blocks}+{s.recent}/{s.block_size}",
                  functools.partial(kernels_pallas.retrieve_selected, selection=s),
                  np.minimum(counts, s.per_query * s.block_size),
              )
              for s in selections
          ]
        for impl, op, read in variants:
          useful = 3.5 * 4 * head_dim * heads * batch * float(read.sum())
          row = functools.partial(KernelRow, name, t, head_dim, impl)
          estimate = dense_bytes(impl, batch, heads, t, dtype, head_dim, backend)
          if estimate is not None and estimate > max_dense_bytes:
            yield row(None, None, None, None, skipped=f"does not fit: ~{estimate / 2**30:.3g} GB")
            continue

          def grads(q, k, v, cotangent, op=op, lo=lo, hi=hi):
            loss = lambda q, k, v: jnp.sum(op(q, k, v, lo=lo, hi=hi) * cotangent)
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

          try:
            if target is not None:
              compiled = jax.jit(grads).trace(*args).lower().compile()
              yield row(None, None, None, timing_lib.planned_peak_bytes(compiled) / 2**20)
              continue
            timing = timing_lib.measure(grads, *args, repeats=repeats)
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


def kernels_footer(backend: str, max_dense_bytes: float, dtype: Any = None) -> str:
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
      if (reason := impl_unavailable_reason(impl, backend, dtype))
  }
  if unavailable:
    listed = "; ".join(f"{impl} ({reason})" for impl, reason in unavailable.items())
    lines.append(f"Not run on {backend}: {listed}.")
  return "\n".join(lines)
