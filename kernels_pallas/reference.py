"""Dense reference retrieval: the test oracle of every other implementation.

Materialises the [b, h, t, s] score matrix, masks it with the band and the documents, and takes a
softmax that returns 0 on empty rows. Memory is O(T^2): use it for tests and short sequences only.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import bands


def retrieve_reference(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    block_size: int | None = None,
    backend: str | None = None,
    pair_mask: Bool[Array, "b h t s"] | None = None,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h]; 0 if S(t) is empty.

  Inputs are assumed validated by `kernels_pallas.retrieve`. Computes in float32 at least (float64
  inputs stay float64) and returns the input dtype. `pair_mask`, if given, removes more pairs
  from S(t) (a block selection's, `select.retrieve_selected_reference`).
  """
  del block_size, backend  # Dense, and the same on every backend.
  dtype = q.dtype
  compute_dtype = jnp.promote_types(dtype, jnp.float32)
  q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
  highest = jax.lax.Precision.HIGHEST
  scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=highest)
  time = jnp.arange(q.shape[1], dtype=jnp.int32)
  mask = bands.band_mask(time[:, None], time[None, :], lo, hi)[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  if pair_mask is not None:
    mask = mask & pair_mask
  scores = jnp.where(mask, scores, -jnp.inf)
  # The shift cancels in the softmax, so it needs no gradient. An empty row has max -inf; shifting
  # it by 0 instead keeps every exp() at exp(-inf) = 0 and NaN-free.
  row_max = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  weights = jnp.exp(scores - row_max)
  total = weights.sum(axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  y = jnp.einsum("bhts,bshe->bthe", weights, v, precision=highest)
  return y.astype(dtype)
