"""The key recurrences of Memory Mosaics as one parallel linear scan (design.md, "Key recurrences").

Both key extractors are the recurrence

    h_t = a_t * h_{t-1} + x_t,   h_{-1} = 0,

with a scalar decay per head: v1's leaky average uses a constant `lambda` per head, v2 a
per-(time, head) `lambda_t` with a gated input `g_t * k~_t`. Where a document starts the state is
reset (h_t = x_t), so packed documents never see each other.

v2's gated input can exceed float32 (g_t = exp(w . x_t) overflows past w . x_t ~ 88), so
`gated_linear_scan` runs the same scan on the state divided by a running scale exp(m_t), m_t >= 0
the log-size of its largest term (`log_scale_scan`): every coefficient is then at most 1, for any
finite input, and where no term exceeds 1 the scale is 1 and the scan is the plain one, bit for bit.

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


def _max_plus(
    earlier: tuple[Float[Array, "*s h"], Float[Array, "*s h"]],
    later: tuple[Float[Array, "*s h"], Float[Array, "*s h"]],
) -> tuple[Float[Array, "*s h"], Float[Array, "*s h"]]:
  """Composes two steps m -> max(m + log_a, log_x), the earlier one applied first."""
  log_a1, log_x1 = earlier
  log_a2, log_x2 = later
  return log_a1 + log_a2, jnp.maximum(log_x1 + log_a2, log_x2)


def log_scale_scan(
    log_a: Float[Array, "b t h"],
    log_x: Float[Array, "b t h"],
    *,
    reset: Bool[Array, "b t"] | None = None,
    initial: Float[Array, "b h"] | None = None,
) -> Float[Array, "b t h"]:
  """m_t = max(m_{t-1} + log_a_t, log_x_t), m_{-1} = `initial` (default -inf), m_t = log_x_t at a
  reset: the log of the largest coefficient exp(log_x_s + log_a_{s+1} + ... + log_a_t) of the terms
  of h_t = a_t h_{t-1} + exp(log_x_t) x_t. A max-plus associative scan, float32."""
  log_a = log_a.astype(jnp.float32)
  log_x = log_x.astype(jnp.float32)
  if reset is not None:
    log_a = jnp.where(reset[..., None], -jnp.inf, log_a)
  if initial is not None:
    log_x = log_x.at[:, 0].max(initial.astype(jnp.float32) + log_a[:, 0])
  _, m = jax.lax.associative_scan(_max_plus, (log_a, log_x), axis=1)
  return m


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
    initial = initial.astype(jnp.float32)
    if reset is not None:
      # Dropped outright, not multiplied by 0: an overflowed state is inf (0 * inf = NaN).
      initial = jnp.where(reset[:, 0, None, None], 0.0, initial)
    # h_0 = a_0 h_{-1} + x_0: the initial state enters as part of the first input.
    x = x.at[:, 0].add(a[:, 0, :, None] * initial)
  if impl == "associative":
    return _associative_scan(a, x)
  return _chunked_scan(a, x, chunk_size)


# Validates its own inputs and, through `linear_scan`, the rest (tested).
@typing.no_type_check
def gated_linear_scan(
    log_a: Float[Array, "b t h"],
    log_g: Float[Array, "b t h"],
    x: Float[Array, "b t h d"],
    *,
    reset: Bool[Array, "b t"] | None = None,
    initial: Float[Array, "b h d"] | None = None,
    initial_log_scale: Float[Array, "b h"] | None = None,
    impl: str = "associative",
    chunk_size: int = 16,
) -> tuple[Float[Array, "b t h d"], Float[Array, "b t h"]]:
  """h_t = exp(log_a_t) h_{t-1} + exp(log_g_t) x_t, as (hhat, m) with h_t = exp(m_t) hhat_t.

  m_t = max(0, `log_scale_scan`(log_a, log_g)_t) bounds every coefficient of hhat_t by 1: hhat is
  finite for any finite inputs with log_a <= 0 (a decay), however large h is. Where m has been 0
  since the document's start (no coefficient of h above 1), hhat is `linear_scan`(exp(log_a),
  exp(log_g) x) bit for bit. m carries no gradient: any m gives the same h and gradients of h.

  Args:
    log_a: the log decay, <= 0.
    log_g: the log gate of each input.
    x: the input of each step.
    reset: as `linear_scan`'s.
    initial: the state before the first step, as hhat (default 0).
    initial_log_scale: its m (default 0: `initial` is the state itself).
    impl, chunk_size: as `linear_scan`'s.

  Returns:
    (hhat, m), float32.
  """
  for name, z in (("log_a", log_a), ("log_g", log_g)):
    if z.shape != x.shape[:3]:
      raise ValueError(f"{name} must be [b, t, h] = {x.shape[:3]}, got shape {z.shape}")
  if initial is None and initial_log_scale is not None:
    raise ValueError("initial_log_scale is the scale of an initial state: give initial too")
  log_a = log_a.astype(jnp.float32)
  log_g = log_g.astype(jnp.float32)
  m_initial = None
  if initial is not None:
    m_initial = jnp.zeros(initial.shape[:2], jnp.float32)
    if initial_log_scale is not None:
      m_initial = jax.lax.stop_gradient(initial_log_scale.astype(jnp.float32))
  m = log_scale_scan(
      jax.lax.stop_gradient(log_a), jax.lax.stop_gradient(log_g), reset=reset, initial=m_initial
  )
  # The floor leaves states whose terms are all <= 1 unscaled; with log_a <= 0 it keeps every
  # coefficient <= 1.
  m = jnp.maximum(m, 0.0)
  # m_{-1} only multiplies the initial state (0 without one).
  before = jnp.zeros_like(m[:, :1]) if m_initial is None else m_initial[:, None]
  m_prev = jnp.concatenate([before, m[:, :-1]], axis=1)
  # hhat_t = a_t exp(m_{t-1} - m_t) hhat_{t-1} + g_t exp(-m_t) x_t.
  scaled = linear_scan(
      jnp.exp(log_a + m_prev - m),
      jnp.exp(log_g - m)[..., None] * x.astype(jnp.float32),
      reset=reset,
      initial=initial,
      impl=impl,
      chunk_size=chunk_size,
  )
  return scaled, m
