"""The key recurrences of Memory Mosaics as one parallel linear scan (design.md, "Key recurrences").

Both key extractors are the recurrence

    h_t = a_t * h_{t-1} + x_t,   h_{-1} = 0,

with a scalar decay per head: v1's leaky average uses a constant `lambda` per head, v2 a
per-(time, head) `lambda_t` with a gated input `g_t * k~_t`. Where a document starts the state is
reset (h_t = x_t), so packed documents never see each other.

Two implementations, selected by `impl`:

- "associative": `jax.lax.associative_scan` over time on (a, x) pairs, O(T log T) elementwise work.
- "chunked": time is split into chunks of C steps. Inside a chunk the output is one matmul with a
  [C, C] lower-triangular decay matrix; a `jax.lax.scan` with one step per chunk carries the state
  from chunk to chunk. Never a T x T matrix.

Axis legend: b = batch, t = time, h = head, d = feature, n = chunk, c/i/j = step inside a chunk.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

SCAN_IMPLEMENTATIONS = ("associative", "chunked")


def _combine(
    earlier: tuple[Float[Array, "*s h"], Float[Array, "*s h d"]],
    later: tuple[Float[Array, "*s h"], Float[Array, "*s h d"]],
) -> tuple[Float[Array, "*s h"], Float[Array, "*s h d"]]:
  """Composes two affine steps h -> a * h + x, the earlier one applied first."""
  a1, x1 = earlier
  a2, x2 = later
  return a1 * a2, a2[..., None] * x1 + x2


def _associative_scan(
    a: Float[Array, "b t h"], x: Float[Array, "b t h d"]
) -> Float[Array, "b t h d"]:
  """The recurrence by a parallel prefix scan over time."""
  _, h = jax.lax.associative_scan(_combine, (a, x), axis=1)
  return h


def _chunked_scan(
    a: Float[Array, "b t h"], x: Float[Array, "b t h d"], chunk_size: int
) -> Float[Array, "b t h d"]:
  """The recurrence by intra-chunk matmuls and a sequential scan over chunks."""
  b, t, nh, d = x.shape
  c = min(chunk_size, t)
  n = -(-t // c)
  pad = n * c - t
  # Padding only appends steps after the last real one; causality keeps them out of the result.
  # Chunks lead and steps sit next to features so the scan walks axis 0 and the matmul needs no
  # transpose of its own.
  a = jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, nh).transpose(1, 0, 3, 2)
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, c, nh, d)
  x = x.transpose(1, 0, 3, 2, 4)  # [n, b, h, c, d]

  # decay[i, j] = a_{j+1} * ... * a_i for i >= j, built as a cumulative product down each column.
  # Products rather than differences of cumulative log-decays: a_t = 0 (a reset) and tiny a_t stay
  # exact, there is no cancellation between large log sums, and the gradient never divides by a.
  i = jnp.arange(c)[:, None]
  j = jnp.arange(c)[None, :]
  factors = jnp.where(i > j, a[..., :, None], 1.0)  # [n, b, h, c(i), c(j)]
  decay = jnp.where(i >= j, jax.lax.cumprod(factors, axis=3), 0.0)
  # intra [n, b, h, c, d]: the state each step would have if its chunk started from zero.
  # HIGHEST keeps the matmul in float32 on accelerators that would otherwise round to tf32/bf16.
  intra = jnp.einsum("nbhij,nbhjd->nbhid", decay, x, precision=jax.lax.Precision.HIGHEST)
  # from_start [n, b, h, c]: a_0 * ... * a_i, how much of the state entering the chunk survives.
  from_start = jax.lax.cumprod(a, axis=3)

  def carry_over(state, chunk):
    last_intra, last_decay = chunk
    return last_decay[..., None] * state + last_intra, state

  # entries [n, b, h, d]: the state entering each chunk.
  _, entries = jax.lax.scan(
      carry_over, jnp.zeros((b, nh, d), jnp.float32), (intra[..., -1, :], from_start[..., -1])
  )
  h = intra + from_start[..., None] * entries[..., None, :]
  return h.transpose(1, 0, 3, 2, 4).reshape(b, n * c, nh, d)[:, :t]


# Validates its own inputs with errors that name the problem (tested); the test suite's jaxtyping
# hook would answer first with its own.
@typing.no_type_check
def linear_scan(
    a: Float[Array, "b t h"] | Float[Array, " h"],
    x: Float[Array, "b t h d"],
    *,
    reset: Bool[Array, "b t"] | None = None,
    initial: Float[Array, "b h d"] | None = None,
    impl: str = "associative",
    chunk_size: int = 16,
) -> Float[Array, "b t h d"]:
  """h_t = a_t * h_{t-1} + x_t with h_{-1} = `initial` (default 0), computed in float32.

  Args:
    a: the decay, per (batch, time, head) or one constant per head (broadcast over b and t); it
      is broadcast over d.
    x: the input of each step.
    reset: where True the state is dropped before the step (h_t = x_t): document starts, e.g.
      `segment_starts(segment_ids)`.
    initial: the state before the first step, to continue a scan (decoding); a reset at t = 0
      drops it like any state.
    impl: "associative" or "chunked".
    chunk_size: C, the steps per chunk of the "chunked" implementation.

  Returns:
    h in float32 (the caller casts).
  """
  if impl not in SCAN_IMPLEMENTATIONS:
    raise ValueError(f"unknown impl {impl!r}; valid names: {', '.join(SCAN_IMPLEMENTATIONS)}")
  if x.ndim != 4:
    raise ValueError(f"x must be [b, t, h, d], got shape {x.shape}")
  b, t, nh, _ = x.shape
  if a.shape not in ((nh,), (b, t, nh)):
    raise ValueError(
        f"a must be [b, t, h] = {(b, t, nh)} or [h] = {(nh,)}, got shape {a.shape} for x of shape"
        f" {x.shape}"
    )
  if reset is not None and reset.shape != (b, t):
    raise ValueError(
        f"reset must be [b, t] = {(b, t)}, got shape {reset.shape} for x of shape {x.shape}"
    )
  if initial is not None and initial.shape != (b, nh, x.shape[-1]):
    raise ValueError(
        f"initial must be [b, h, d] = {(b, nh, x.shape[-1])}, got shape {initial.shape}"
    )
  if impl == "chunked" and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

  # float32 throughout: the v2 input g_t * k~_t has an unbounded gate g_t = exp(w . x_t).
  x = x.astype(jnp.float32)
  a = jnp.broadcast_to(a.astype(jnp.float32), (b, t, nh))
  if reset is not None:
    # A zero decay is a reset; `where` also gives a_t no gradient there: h_t does not depend on it.
    a = jnp.where(reset[..., None], 0.0, a)
  if initial is not None:
    # h_0 = a_0 h_{-1} + x_0: the initial state enters as part of the first input.
    x = x.at[:, 0].add(a[:, 0, :, None] * initial.astype(jnp.float32))
  if impl == "associative":
    return _associative_scan(a, x)
  return _chunked_scan(a, x, chunk_size)
