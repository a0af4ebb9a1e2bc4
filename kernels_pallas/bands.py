"""Band arithmetic shared by every retrieval implementation.

A band is the set of key positions a query at time t may read (design.md, "Bands"):

    S(t) = { s : t - hi <= s <= t - lo,  segment_ids[s] == segment_ids[t] }

with hi >= lo or unbounded (None). A memory has lo >= 1 (a pair (k_s, v_s) is complete only at time
s + 1); lo = 0 is causal self-attention (the Llama baseline).

Axis legend: b = batch, t = query time, s = key time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

IntLike = int | Int[Array, ""]


def band_mask(
    t: IntLike | Int[Array, "*q"], s: IntLike | Int[Array, "*k"], lo: IntLike, hi: int | None
) -> Bool[Array, "*qk"]:
  """True where key time s lies in the band of query time t (broadcasting t against s)."""
  delta = t - s
  inside = delta >= lo
  if hi is not None:
    inside &= delta <= hi
  return inside


def segment_starts(segment_ids: Int[Array | np.ndarray, "b t"]) -> Bool[Array, "b t"]:
  """True at the first position of every document (and at t = 0)."""
  first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def document_positions(
    segment_ids: Int[Array | np.ndarray, "b t"] | None, seq_len: int
) -> Int[Array, "b t"]:
  """Position of each token inside its document (documents are contiguous runs of one id)."""
  t = jnp.arange(seq_len, dtype=jnp.int32)
  if segment_ids is None:
    return t[None, :]
  starts = segment_starts(segment_ids)
  # The start index of the current document is a running maximum of the start positions seen.
  start_pos = jax.lax.cummax(jnp.where(starts, t[None, :], 0), axis=1)
  return t[None, :] - start_pos


def visible_counts(
    segment_ids: Int[Array | np.ndarray, "b t"] | None, seq_len: int, lo: IntLike, hi: int | None
) -> Int[Array, "b t"]:
  """n_t = |S(t)|: the number of pairs the query at time t can read, counted inside its document.

  v1 contextual (lo=1, hi=None): t; short-term (1, h-1): min(t, h-1); long-term (m, None):
  max(0, t-m+1), each with t the position inside the document.
  """
  return count_in_band(document_positions(segment_ids, seq_len), lo, hi)


def count_in_band(positions: Int[Array, "*s"], lo: IntLike, hi: int | None) -> Int[Array, "*s"]:
  """|S(t)| of queries at these positions in their documents: clip(pos - lo + 1, 0, hi - lo + 1)."""
  count = positions - lo + 1
  if hi is not None:
    count = jnp.minimum(count, hi - lo + 1)
  return jnp.maximum(count, 0)
