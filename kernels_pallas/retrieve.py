"""The retrieval op of every associative memory (design.md, "Retrieval"): validation and dispatch.

    y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h]
    S(t) = { s : t - hi <= s <= t - lo,  segment_ids[b, s] == segment_ids[b, t] }

q is the query key already multiplied by its bandwidth beta; there is no other scaling. A row whose
band is empty outputs exactly 0, with finite gradients.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels_pallas import (
    bands,
    pallas_gpu,
    pallas_mosaic_gpu,
    pallas_tpu,
    reference,
    remat,
    select,
    shift,
    xla,
)

RetrieveFn = Callable[..., Float[Array, "b t h e"]]

# Every implementation takes (q, k, v, *, lo, hi, segment_ids, block_size, backend) as validated
# below. The Pallas kernels compile for their own backend and run in Pallas's interpreter for any
# other (that is how the CPU test suite runs them); "pallas_mosaic_gpu", the GPU kernels on Mosaic
# GPU (bfloat16 and float16 only), is chosen by name only until it has run on a GPU; "shift" is
# library attention (cuDNN, splash, XLA).
IMPLEMENTATIONS: dict[str, RetrieveFn] = {
    "reference": reference.retrieve_reference,
    "xla": xla.retrieve_xla,
    "pallas_tpu": pallas_tpu.retrieve_pallas_tpu,
    "pallas_gpu": pallas_gpu.retrieve_pallas_gpu,
    "pallas_mosaic_gpu": pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu,
    "shift": shift.retrieve_shift,
}
# Names that stand for an implementation of IMPLEMENTATIONS, chosen by the default backend.
ALIASES = ("auto", "pallas")


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """The name in IMPLEMENTATIONS that `impl` runs on `backend` (default: JAX's default backend).

  "auto" is the fastest exact path: the Pallas kernel on TPU and GPU, "xla" elsewhere. "pallas"
  is the platform's Pallas kernel, and on CPU the GPU kernel in interpret mode (a test path,
  not a fast one).
  """
  if impl in ALIASES:
    backend = backend or jax.default_backend()
    kernel = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    impl = kernel if impl == "pallas" or backend in ("tpu", "gpu") else "xla"
  if impl not in IMPLEMENTATIONS:
    valid = ", ".join(repr(name) for name in [*ALIASES, *sorted(IMPLEMENTATIONS)])
    raise ValueError(f"unknown retrieve impl {impl!r}; valid names are {valid}")
  return impl


def _check_arrays(q: Array, k: Array, v: Array, segment_ids: Array | None) -> None:
  """Raises if q, k, v or segment_ids have the wrong rank, shape or dtype."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [b, t, h, d], got shape {x.shape}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k in [b, t, h], got v {v.shape} and k {k.shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(
        f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype} and v {v.dtype}"
    )
  if segment_ids is not None:
    if segment_ids.shape != q.shape[:2]:
      raise ValueError(
          f"segment_ids must have shape [b, t] = {q.shape[:2]}, got {segment_ids.shape}"
      )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise TypeError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")


def _check_band(lo: object, hi: object) -> bands.IntLike:
  """Raises if (lo, hi) is not a valid band; returns lo as a Python int or an int32 scalar."""
  if hi is not None and (isinstance(hi, bool) or not isinstance(hi, (int, np.integer))):
    raise TypeError(f"hi must be a Python int or None, got {hi!r}")
  if hi is not None and hi < 0:
    raise ValueError(f"hi must be >= 0, got {hi}")
  if isinstance(lo, (int, np.integer)) and not isinstance(lo, bool):
    lo = int(lo)
    if lo < 0:
      raise ValueError(f"lo must be >= 0, got {lo}")
    if hi is not None and hi < lo:
      raise ValueError(f"hi must be >= lo, got lo={lo} and hi={hi}")
    return lo
  if not isinstance(lo, (jax.Array, np.ndarray)):
    raise TypeError(f"lo must be an int or an integer scalar array, got {lo!r}")
  if lo.shape != () or not jnp.issubdtype(lo.dtype, jnp.integer):
    raise TypeError(
        f"an array lo must be an integer scalar, got shape {lo.shape} and dtype {lo.dtype}"
    )
  return jnp.asarray(lo, jnp.int32)


# Validates its own inputs with errors that name the problem (tested); the test suite's jaxtyping
# hook would answer first with its own.
@typing.no_type_check
def retrieve(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    impl: str = "auto",
    block_size: int | None = None,
    backend: str | None = None,
) -> Float[Array, "b t h e"]:
  """Band-masked kernel regression of v on k at the queries q (see the module docstring).

  Args:
    q: query keys, already scaled by their bandwidth.
    k: stored keys, same shape and dtype as q.
    v: stored values, same [b, t, h] and dtype as k.
    lo: smallest delay t - s, >= 0 (>= 1 for a memory, whose pair (k_s, v_s) is complete only at
      time s + 1; 0 for causal self-attention). A Python int or an int32 scalar that may be
      traced (one compilation serves every value; it is then not checked to be >= 0).
    hi: largest delay t - s, a Python int >= max(lo, 0), or None for unbounded.
    segment_ids: document id of every position, or None for one document per row.
    impl: "auto", "pallas" (see `resolve_impl`) or a name in IMPLEMENTATIONS.
    block_size: time block of the blocked implementations; None picks a default.
    backend: the backend ("cpu", "gpu", "tpu") the op is compiled for; None is JAX's default
      backend. Another one compiles ahead of time for it: with "tpu" on a CPU host, "auto" lowers
      the TPU kernel, which libtpu compiles for a TPU topology (`mosaics_jax.aot`).

  Returns:
    y in the dtype of the inputs, computed with float32 softmax and sums.
  """
  backend = backend or jax.default_backend()
  fn = IMPLEMENTATIONS[resolve_impl(impl, backend)]
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
  _check_arrays(q, k, v, segment_ids)
  lo = _check_band(lo, hi)
  if block_size is not None and (
      isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
  ):
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
  return fn(
      q,
      k,
      v,
      lo=lo,
      hi=None if hi is None else int(hi),
      segment_ids=segment_ids,
      block_size=block_size,
      backend=backend,
  )


# Validates its own inputs, as `retrieve` does.
@typing.no_type_check
def retrieve_selected(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    selection: select.BlockSelection,
    impl: str = "auto",
    query_chunk: int | None = None,
    backend: str | None = None,
) -> Float[Array, "b t h e"]:
  """`retrieve` over the blocks `selection` picks for each query (`kernels_pallas.select`).

  Args:
    q, k, v, lo, hi, segment_ids: as `retrieve`.
    selection: K, B, R and the block summary.
    impl: "reference" (dense); "pallas_gpu", "pallas_mosaic_gpu", "pallas_tpu" or "pallas"
      (the platform's) the Pallas kernels, interpreted off their platform, with their
      constraints on B and dtype; any other name of `retrieve`, "auto" included, the XLA path:
      the kernels have not run on an accelerator yet (design.md, "Block selection").
    query_chunk: queries scored and read at once (default B): the temporaries are
      O(chunk (K + R) B).
    backend: as `retrieve`'s (the GPU kernels compile for "gpu" and are interpreted elsewhere).

  Returns:
    y in the dtype of the inputs, computed with float32 softmax and sums.
  """
  backend = backend or jax.default_backend()
  # "auto" is the XLA path here (see `impl`); any other name resolves as for `retrieve`, and an
  # unknown one is an error.
  name = "xla" if impl == "auto" else resolve_impl(impl, backend)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
  _check_arrays(q, k, v, segment_ids)
  lo = _check_band(lo, hi)
  if not isinstance(selection, select.BlockSelection):
    raise TypeError(f"selection must be a kernels_pallas.BlockSelection, got {selection!r}")
  if query_chunk is not None and (
      isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1
  ):
    raise ValueError(f"query_chunk must be a positive int or None, got {query_chunk!r}")
  # Named with the op's residuals (`remat`): a rematerialising backward keeps the choice.
  selected = remat.named(
      select.select_blocks(
          q, k, lo=lo, hi=hi, segment_ids=segment_ids, selection=selection, query_chunk=query_chunk
      )
  )
  band = dict(lo=lo, hi=hi, segment_ids=segment_ids, selected=selected)
  size = selection.block_size
  if name == "reference":
    return select.retrieve_selected_reference(q, k, v, block_size=size, **band)
  kernels = {
      "pallas_gpu": pallas_gpu.retrieve_pallas_gpu_selected,
      "pallas_mosaic_gpu": pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu_selected,
      "pallas_tpu": pallas_tpu.retrieve_pallas_tpu_selected,
  }
  if name in kernels:
    return kernels[name](q, k, v, block_size=size, backend=backend, **band)
  return select.retrieve_selected_xla(q, k, v, block_size=size, query_chunk=query_chunk, **band)
